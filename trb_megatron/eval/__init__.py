"""pass@1 evaluation of a student with the rollout engine (the student alone), and the answer
verifiers ("math": last boxed answer via math-verify, "exact", "toy"). CLI:
python -m trb_megatron.eval."""

from .pass1 import EvalResult, ProblemResult, decode_responses, dp_share, evaluate_pass1
from .verify import VERIFIERS, get_verifier, last_boxed, verify_exact, verify_math

__all__ = ["VERIFIERS", "EvalResult", "ProblemResult", "decode_responses", "dp_share",
           "evaluate_pass1", "get_verifier", "last_boxed", "verify_exact", "verify_math"]
