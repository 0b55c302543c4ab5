"""The toy task: 4-digit addition with a carry scratchpad, character level.

A problem a + b (both operands 1000..9999) has the prompt `a+b=` and the target response: one
step per column, least-significant first, `x+y+c=ss` (the two digits, the incoming carry and the
two-digit column sum, whose tens digit is the next carry), steps joined by `,`; then `#` and the
sum read back from the scratchpad in reverse (final carry first), five digits:

    prompt    3472+2859=
    response  2+9+0=11,7+5+1=13,4+8+1=13,3+2+1=06#06331      (then EOS)
    answer    6331

A response is correct when the text after `#` is all digits and equals the sum (leading zeros
ignored). Prompt 10 characters (11 tokens with BOS), response 41 characters (42 tokens with EOS).
"""

import json
import random
import re
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARS = tuple("0123456789+=,#")
PROMPT_CHARS, RESPONSE_CHARS = 10, 41

_FORMAT = re.compile(r"(\d\+\d\+[01]=\d\d,){3}\d\+\d\+[01]=\d\d#\d{5}")


def make_problem(a: int, b: int) -> dict:
    """{"prompt", "response", "answer"} for a + b (4-digit operands)."""
    if not (1000 <= a <= 9999 and 1000 <= b <= 9999):
        raise ValueError(f"operands must have 4 digits, got {a} and {b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for x, y in zip(xs, ys):
        column = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={column:02d}")
        digits.append(column % 10)
        carry = column // 10
    readback = str(carry) + "".join(str(d) for d in reversed(digits))
    return {"prompt": f"{a}+{b}=", "response": ",".join(steps) + "#" + readback,
            "answer": str(a + b)}


def _strip_special(text: str) -> str:
    text = text.strip()
    changed = True
    while changed:  # a decode with skip_special_tokens=False may end in <eos><pad><pad>...
        changed = False
        for token in (EOS, PAD):
            if text.endswith(token):
                text, changed = text[: -len(token)].rstrip(), True
    return text


def extract_answer(response: str) -> str | None:
    """The final answer of a generated response (the text after `#`, leading zeros dropped),
    or None when there is none: no `#`, nothing or anything but ASCII digits after it (a
    second `#` included). Surrounding whitespace and trailing EOS/PAD token text are ignored;
    the scratchpad before `#` is not checked (see is_well_formed)."""
    text = _strip_special(response)
    _, sep, tail = text.partition("#")
    tail = tail.strip()
    if not sep or not tail.isascii() or not tail.isdigit():
        return None
    return str(int(tail))


def is_correct(response: str, answer: str | int) -> bool:
    """Exact match of the response's final answer with `answer` ("6331" or 6331)."""
    got = extract_answer(response)
    return got is not None and got == str(int(str(answer).strip()))


def is_well_formed(response: str) -> bool:
    """True when the response has the full scratchpad format (right or wrong arithmetic)."""
    return _FORMAT.fullmatch(_strip_special(response)) is not None


def make_splits(seed: int, *, n_train: int, n_test: int = 512, n_val: int = 0):
    """Disjoint lists of problems (train, test, val), deterministic in `seed`. No problem occurs
    twice in or across the splits; a + b and b + a count as different problems."""
    total = n_train + n_test + n_val
    if min(n_train, n_test, n_val) < 0 or total > 9000 * 9000:
        raise ValueError(f"split sizes must be >= 0 and fit 81M problems, got "
                         f"{n_train}/{n_test}/{n_val}")
    rng = random.Random(f"trb-toy-addition/{seed}")
    seen, pairs = set(), []
    while len(pairs) < total:
        pair = (rng.randint(1000, 9999), rng.randint(1000, 9999))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    problems = [make_problem(a, b) for a, b in pairs]
    # test first: the held-out set of a seed does not depend on the train size
    test, val = problems[:n_test], problems[n_test:n_test + n_val]
    return problems[n_test + n_val:], test, val


def write_jsonl(path, problems) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p["prompt"], "answer": p["answer"],
                                "response": p["response"]}) + "\n")


def read_jsonl(path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
