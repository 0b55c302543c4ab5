"""Print the configuration reference table of README.md from the config dataclasses.

    python tools/config_reference.py

tests/unit/test_config.py checks that README.md contains exactly this table.
"""

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trb_megatron import config  # noqa: E402


def _field_docs(cls) -> dict:
    """The docstring written under each field of a dataclass."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(nxt.value.value.split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)}


def reference_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    hints = typing.get_type_hints(config.Config)
    for section in dataclasses.fields(config.Config):
        cls = hints[section.name]
        docs = _field_docs(cls)
        for field in dataclasses.fields(cls):
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)
            default = "required" if required else f"`{field.default!r}`"
            lines.append(f"| `{section.name}.{field.name}` | {default} | {docs[field.name]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
