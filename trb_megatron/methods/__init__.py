"""The distillation methods in pure torch (no Megatron or SGLang imports), each working on a
vocabulary sharded over an optional torch.distributed process group, never gathering it.

- kernels: vocab.py (sharding, padding, the canonical stop event), solver.py (the TRB
  trust-region solve), sampling.py (the blend's log-probabilities, seeded sampling), seeds.py
  (every seed and counter-based random number), token_terms.py (per-token loss terms);
- behaviour: behaviour.py (BehaviourStep and the per-token law both rollout backends apply),
  policies.py (student, trb_blend, teacher_prefix), schedules.py;
- objectives: objectives.py (the interface, reverse_kl), reverse_kl.py (its estimators),
  tropd.py (TrOPD);
- presets.py: methods by name (`method.name`).
"""

from .behaviour import (BLEND_STATS, SOURCE_POLICY, SOURCE_TEACHER, BehaviourStep,
                        TokenBehaviour, token_behaviour)
from .objectives import ObjectiveTerms, ReverseKL, TokenInputs
from .presets import BEHAVIOURS, OBJECTIVES, PRESETS, Method, build_method
from .reverse_kl import ESTIMATORS, per_token_reverse_kl, reverse_kl_loss
from .sampling import (SampledTokens, blend_logits, blended_log_probs, blended_token_log_probs,
                       sample_log_probs, sample_tokens)
from .schedules import Constant, CosineAnneal, LinearAnneal
from .seeds import counter_uniform, derive_seed, gumbel_noise
from .solver import BetaSolution, solve_beta
from .token_terms import teacher_topk_forward_kl, token_log_probs
from .tropd import OUTLIERS, TrOPD
from .vocab import Shard, VocabLayout, canonicalize_eos, describe_shard

__all__ = [
    "BEHAVIOURS", "BLEND_STATS", "BehaviourStep", "BetaSolution", "Constant", "CosineAnneal",
    "ESTIMATORS", "LinearAnneal", "Method", "OBJECTIVES", "OUTLIERS", "ObjectiveTerms",
    "PRESETS", "ReverseKL", "SOURCE_POLICY", "SOURCE_TEACHER", "SampledTokens", "Shard",
    "TokenBehaviour", "TokenInputs", "TrOPD", "VocabLayout", "blend_logits",
    "blended_log_probs", "blended_token_log_probs", "build_method", "canonicalize_eos",
    "counter_uniform", "derive_seed", "describe_shard", "gumbel_noise", "per_token_reverse_kl",
    "reverse_kl_loss", "sample_log_probs", "sample_tokens", "solve_beta",
    "teacher_topk_forward_kl", "token_behaviour", "token_log_probs",
]
