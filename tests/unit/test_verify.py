"""Answer verifiers: the last \\boxed{} checked by math-verify (equivalent forms accepted; no box,
garbage and unbalanced braces are incorrect, never an error), exact match, the registry.

Run: .venv/bin/python -m pytest tests/unit/test_verify.py -q
"""

import threading

import pytest

from trb_megatron.eval.verify import VERIFIERS, get_verifier, last_boxed, verify_math


@pytest.mark.parametrize("response, answer", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{1/2}", "$\\frac12$"),
    ("first \\boxed{3}, corrected: \\boxed{4}", "4"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
    ("\\boxed{x=3}", "3"),
    ("\\boxed{10}", "the answer is \\boxed{10}"),  # a boxed reference is unboxed
    ("\\fbox{7}", "7"),
])
def test_equivalent_boxed_answers_are_correct(response, answer):
    assert verify_math(response, answer)


@pytest.mark.parametrize("response, answer", [
    ("first \\boxed{3}, corrected: \\boxed{4}", "3"),  # only the last box counts
    ("the answer is 0.5", "0.5"),  # no box
    ("", "1"),
    ("\\boxed{}", "0"),
    ("\\boxed{\\frac{1}{2", "0.5"),  # never closed
    ("\\boxed{5}", "6"),
    ("\\boxed{0.333}", "\\frac13"),
    ("\\boxed{@#$%^&\\\\}", "2"),  # garbage
    ("\\boxed{2}", "garbage \\\\ {"),  # a reference that does not parse
    ("\\boxed{asdf}}}{{", "3"),
])
def test_wrong_missing_or_garbage_answers_are_incorrect(response, answer):
    assert not verify_math(response, answer)


def test_last_boxed():
    assert last_boxed("a \\boxed{b{c}d} e") == "b{c}d"
    assert last_boxed("\\boxed{1} and \\boxed {2}") == "2"
    assert last_boxed("\\boxedx{1}") is None and last_boxed("no box") is None
    assert last_boxed("\\boxed{1} \\boxed{2") == "1"  # an unclosed last box: the one before


def test_math_verify_off_the_main_thread():
    """math-verify's signal timeout only works in the main thread; elsewhere it runs without."""
    out = []
    thread = threading.Thread(target=lambda: out.append(verify_math("\\boxed{0.5}", "1/2")))
    thread.start()
    thread.join()
    assert out == [True]


def test_registry():
    assert VERIFIERS == ("math", "exact", "toy")
    exact = get_verifier("exact")
    assert exact(" w5 w6\n", "w5 w6") and not exact("w5 w6 w7", "w5 w6")
    assert get_verifier("math")("\\boxed{2}", "2")
    with pytest.raises(ValueError, match="verifier must be one of math, exact, toy, got 'gsm'"):
        get_verifier("gsm")


def test_toy_verifier_is_the_toy_task_rule():
    task = pytest.importorskip("trb_megatron.toy.task",
                               reason="the toy task module is not in this checkout yet")
    assert get_verifier("toy") is task.is_correct
