"""The newcomer's path: README.md opens with the two Quickstart commands (the second is what CI
runs), stays short and links every page of docs/; every relative link in README.md and docs/
reaches an existing file and, with #anchor, one of its headings. (The configuration reference
in docs/configuration.md is checked against the code in test_config.py.)"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
QUICKSTART = ["bash examples/run_trb_distill.sh", "bash scripts/test.sh"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    assert re.findall(r"^## (.*)$", text, flags=re.M)[0] == "Quickstart"
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert block.start() < text.index("\n## ", text.index("## Quickstart") + 1)
    assert [line.split("#")[0].strip() for line in block.group(1).splitlines()] == QUICKSTART
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == QUICKSTART[1]


def test_readme_is_short_and_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(text)}
    assert PAGES and not {page.resolve() for page in PAGES} - linked


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: link {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, \
                f"{page.name}: link {target}: no such heading in {linked.name}"
