"""The TRB method in pure torch (no Megatron or SGLang imports): the trust-region blend solver,
blended sampling, EOS canonicalisation, eps schedules and the reverse-KL distillation losses,
each working on a vocabulary sharded over an optional torch.distributed process group."""

from .losses import ESTIMATORS, per_token_reverse_kl, reverse_kl_loss
from .sampling import (SampledTokens, blended_log_probs, blended_token_log_probs, gumbel_noise,
                       sample_tokens)
from .schedules import METHODS, EpsSchedule
from .solver import BetaSolution, solve_beta
from .vocab import VocabLayout, canonicalize_eos

__all__ = [
    "BetaSolution", "ESTIMATORS", "EpsSchedule", "METHODS", "SampledTokens", "VocabLayout",
    "blended_log_probs", "blended_token_log_probs", "canonicalize_eos", "gumbel_noise", "per_token_reverse_kl",
    "reverse_kl_loss", "sample_tokens", "solve_beta",
]
