"""What a rollout token is drawn from: the behaviour step of an optimiser step, and the per-token
law every backend applies (the megatron decode loop, the SGLang composite model's forward) and the
trainer replays for its mismatch check.

Legend: N rows drawing a token, V local vocabulary columns, B rollout rows.

The behaviours of the product's methods are all members of one family, the geometric blend
mu_beta ∝ pi_S^(1-beta) pi_T^beta with a per-token beta:
- the student alone: beta = 0 (the teacher need not run);
- the TRB trust region: the largest beta with KL(mu_beta || pi_S) <= eps (solver.py);
- a teacher-prefix token (TrOPD's off-policy guidance): beta = 1, which is the trust region with
  an unbounded budget (eps = +inf), so it goes through the same solve and reports the same
  statistics (kl_to_student is then KL(pi_T || pi_S)).
A rollout row b draws its tokens at absolute positions [P_b, teacher_until_b) from the teacher
and the rest from the step's blend (teacher_until_b = P_b + l_b, l_b drawn per row by
`BehaviourStep.prefix_lengths`).
"""

import dataclasses
import math

import torch

from .sampling import blend_logits
from .seeds import derive_seed
from .solver import Blend, newton_solve
from .vocab import Shard, merge_stops

SOURCE_POLICY = 0
"""RolloutBatch.source of a token drawn from the step's blend (the student, or TRB's mu)."""
SOURCE_TEACHER = 1
"""RolloutBatch.source of a teacher-prefix token (drawn from pi_T, TrOPD's guidance)."""
BLEND_STATS = ("beta", "kl_to_student", "reverse_kl")
"""Per-token statistics a rollout reports when the teacher ran: beta, KL(mu || pi_S) and the
per-prefix reverse KL(pi_S || pi_T) (free from the solve)."""


@dataclasses.dataclass(frozen=True)
class BehaviourStep:
    """How the rollout tokens of one optimiser step are drawn; the same on every rank.

    eps: TRB trust-region budget KL(mu || pi_S) in nats (0: no blend, beta = 0);
    prefix_max: L_max, the longest teacher prefix a row may get (0: none); each row's length is
    uniform on {0, ..., prefix_max} (`prefix_lengths`);
    temperature: tokens are drawn from softmax(log mu / temperature) (1: mu itself, as
    distillation needs; 0: greedy; evaluation sets it).
    """

    eps: float = 0.0
    prefix_max: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite float >= 0 (a KL budget in nats), got "
                             f"{self.eps!r}")
        if isinstance(self.prefix_max, bool) or not isinstance(self.prefix_max, int) or \
                self.prefix_max < 0:
            raise ValueError(f"prefix_max must be an int >= 0 (the longest teacher prefix in "
                             f"tokens), got {self.prefix_max!r}")
        if isinstance(self.temperature, bool) or not isinstance(
                self.temperature, (int, float)) or not (
                math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0 (1: sample the blend "
                             f"itself, 0: greedy), got {self.temperature!r}")

    @property
    def teacher_runs(self) -> bool:
        """Whether rollouts at this step need the teacher: the one place this is decided."""
        return self.eps > 0 or self.prefix_max > 0

    def prefix_lengths(self, seed: int, row_ids_B: torch.Tensor) -> torch.Tensor:
        """[B] int64 teacher-prefix length of each row: uniform on {0, ..., prefix_max}, a pure
        function of (seed, row id) (the paper does not say how the length is drawn under its
        maximum; docs/method.md)."""
        if self.prefix_max == 0:
            return torch.zeros_like(row_ids_B)
        return torch.tensor([derive_seed(seed, "prefix", int(r)) % (self.prefix_max + 1)
                             for r in row_ids_B.tolist()], dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class TokenBehaviour:
    """The behaviour at N rows: logits [N, V] (log mu up to a per-row constant, stops merged,
    excluded columns -inf), source [N] int64 (SOURCE_TEACHER or SOURCE_POLICY) and per-row beta,
    kl_to_student, reverse_kl [N] (BLEND_STATS)."""

    logits: torch.Tensor
    source: torch.Tensor
    beta: torch.Tensor
    kl_to_student: torch.Tensor
    reverse_kl: torch.Tensor

    def stats(self) -> dict:
        return {name: getattr(self, name) for name in BLEND_STATS}


def token_behaviour(student_NV, teacher_NV, eps_N, from_teacher_N, *, shard: Shard,
                    iterations: int | None = None, max_iters: int = 30, tol: float = 1e-6,
                    rtol: float = 1e-3, dtype=torch.float64, fused: bool = False
                    ) -> TokenBehaviour:
    """The blend each of N rows draws its next token from.

    student_NV, teacher_NV: [N, V] raw logits shards (teacher None: the student alone, beta 0);
    eps_N: [N] budgets >= 0; from_teacher_N: [N] bool, rows drawing a teacher-prefix token
    (beta = 1), or None. iterations: None solves with early exit (at most max_iters evaluations,
    host synchronisation: the megatron backend); an int runs exactly that many Newton
    evaluations with no host decision (CUDA-graph safe: the SGLang composite model). Statistics
    and logits in `dtype`.
    """
    s_NV = merge_stops(student_NV.to(dtype), shard)
    source = torch.full((s_NV.shape[0],), SOURCE_POLICY, dtype=torch.int64, device=s_NV.device)
    if teacher_NV is None:
        zeros = torch.zeros(s_NV.shape[0], dtype=dtype, device=s_NV.device)
        return TokenBehaviour(blend_logits(s_NV, None, None, shard), source, zeros, zeros, zeros)
    t_NV = merge_stops(teacher_NV.to(dtype), shard)
    eps_N = eps_N.to(dtype)
    if from_teacher_N is not None:
        eps_N = torch.where(from_teacher_N, torch.full_like(eps_N, math.inf), eps_N)
        source = torch.where(from_teacher_N, SOURCE_TEACHER, source)
    solution = newton_solve(Blend(s_NV, t_NV, shard, fused), eps_N, tol=tol, rtol=rtol,
                            iterations=max_iters if iterations is None else iterations,
                            early_exit=iterations is None)
    return TokenBehaviour(blend_logits(s_NV, t_NV, solution.beta, shard), source,
                          solution.beta, solution.kl_to_student, solution.reverse_kl)
