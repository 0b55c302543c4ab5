"""Answer verifiers: is a decoded response correct for a reference answer?

    from trb_megatron.eval.verify import get_verifier, last_boxed
    check = get_verifier("math")            # "math" | "exact" | "toy"
    check("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5")   # True

Tests: .venv/bin/python -m pytest tests/unit/test_verify.py -q

- "math": the last \\boxed{...} of the response, checked against the reference with math-verify
  (math_verify.parse + math_verify.verify: equal numbers, fractions, expressions, sets...). A
  response without a box, anything that does not parse and any error count as incorrect.
- "exact": the response equals the reference after stripping surrounding whitespace.
- "toy": trb_megatron.toy.task.is_correct (the toy task's own rule), imported on first use.
Every verifier is a function (response_text, answer) -> bool that never raises on bad text.
"""

import importlib
import logging
import threading
from typing import Callable

Verifier = Callable[[str, str], bool]
# math-verify bounds each parse/verify with signal.alarm, which only works in the main thread.
_TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) of `text`, braces balanced; None when
    there is none or it is not closed."""
    starts = [i for marker in ("\\boxed", "\\fbox") for i in _find_all(text, marker)]
    for start in sorted(starts, reverse=True):
        i = text.find("{", start)
        if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
            continue
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
    return None


def _find_all(text: str, marker: str):
    i = text.find(marker)
    while i >= 0:
        yield i
        i = text.find(marker, i + 1)


def verify_math(response: str, answer: str) -> bool:
    """The last boxed expression of `response` equals `answer` (plain LaTeX or text, or itself
    holding a \\boxed{}) by math-verify; False when anything is missing, unparsable or fails."""
    from math_verify import parse, verify

    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
        return False
    reference = last_boxed(answer)
    reference = answer if reference is None else reference
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception as err:  # noqa: BLE001 - a verifier failure is an incorrect answer
        logging.getLogger(__name__).debug("math-verify failed on %r vs %r: %s", boxed, answer, err)
        return False


def verify_exact(response: str, answer: str) -> bool:
    """response.strip() == answer.strip()."""
    return response.strip() == answer.strip()


def _toy_verifier() -> Verifier:
    try:
        task = importlib.import_module("trb_megatron.toy.task")
    except ImportError as err:
        raise ImportError(f"verifier 'toy' needs trb_megatron.toy.task ({err})") from err
    return task.is_correct


def _math_verifier() -> Verifier:
    try:
        importlib.import_module("math_verify")
    except ImportError as err:
        raise ImportError("verifier 'math' needs math-verify: pip install 'math-verify==0.9.0' "
                          "(an install requirement of trb-megatron)") from err
    return verify_math


# name -> factory of the verifier (factories import heavy or optional modules at first use)
_VERIFIERS: dict[str, Callable[[], Verifier]] = {
    "math": _math_verifier,
    "exact": lambda: verify_exact,
    "toy": _toy_verifier,
}
VERIFIERS = tuple(_VERIFIERS)


def get_verifier(name: str) -> Verifier:
    """The verifier called `name` (one of VERIFIERS); ValueError for an unknown name."""
    if name not in _VERIFIERS:
        raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}, got {name!r} "
                         "(math: boxed answer via math-verify; exact: string match; toy: the "
                         "toy task's rule)")
    return _VERIFIERS[name]()
