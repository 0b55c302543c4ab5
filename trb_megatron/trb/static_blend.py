"""The TRB blend with static shapes and no host synchronisation (CUDA-graph safe).

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group,
K per-row statistics.

`solve_beta` (solver.py) stops when every row has converged and inspects its inputs on the host;
an engine that captures its decode step in a CUDA graph can do neither. Here every decision
that depends on the vocabulary layout is made once on the host (`StaticVocab`), and the solve
runs a fixed number of safeguarded Newton iterations with torch.where in place of branches:
rows that converged (|KL - eps| <= min(tol, rtol * eps)) keep their iterate, the others return
the feasible end of their bracket, exactly solve_beta's acceptance rule. Every cross-rank
exchange is one all-gather of K scalars per row into a preallocated [R * N, K] tensor.
"""

import dataclasses

import torch
import torch.distributed as dist

from .solver import blend_moments, initial_beta, newton_step
from .vocab import Shard, VocabLayout, combine_weighted, owned_stops

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class StaticVocab:
    """This rank's contiguous slice [offset, offset + width) of a vocabulary of `total` padded
    columns, with the decisions the blend needs precomputed.

    excluded: [V] bool, padding (global id >= layout.size) and stop tokens merged away;
    stops: (position in layout.stop_ids, local column) for the stop tokens this rank owns;
    world: ranks in the vocabulary group.
    """

    offset: int
    width: int
    world: int
    layout: VocabLayout
    excluded: torch.Tensor
    stops: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, *, rank: int, world: int, width: int, layout: VocabLayout,
              device=None) -> "StaticVocab":
        """Equal shards of `width` columns per rank in rank order (SGLang's ParallelLMHead and
        Megatron's vocab-parallel output layer both shard the padded vocabulary this way)."""
        if not (0 <= rank < world and width >= 1):
            raise ValueError(f"need 0 <= rank < world and width >= 1; got rank={rank}, "
                             f"world={world}, width={width}")
        offset, total = rank * width, world * width
        if layout.size is not None and not 1 <= layout.size <= total:
            raise ValueError(f"vocab size {layout.size} must be in [1, {total}] (the padded "
                             "vocabulary across the group)")
        limit = total if layout.size is None else layout.size
        if any(not 0 <= s < limit for s in layout.stop_ids):
            raise ValueError(f"stop ids {layout.stop_ids} must lie in [0, {limit})")
        shard = Shard(group=None, rank=rank, world=world, rows=0, offset=offset, width=width,
                      total=total, layout=layout)
        excluded = shard.excluded(device)
        if excluded is None:
            excluded = torch.zeros(width, dtype=torch.bool, device=device)
        return cls(offset, width, world, layout, excluded, tuple(owned_stops(shard)))


@dataclasses.dataclass(frozen=True)
class StaticSolution:
    """[N] beta, kl_to_student = KL(mu_beta || pi_S) and reverse_kl = KL(pi_S || pi_T)."""

    beta: torch.Tensor
    kl_to_student: torch.Tensor
    reverse_kl: torch.Tensor


def gather_rows(x_NK: torch.Tensor, group, world: int) -> torch.Tensor:
    """[R, N, K] per-rank statistics from every rank of `group` (a torch ProcessGroup, e.g.
    SGLang's GroupCoordinator.device_group; None: one rank) via all_gather_into_tensor, the
    collective SGLang itself captures in CUDA graphs."""
    if group is None or world == 1:
        return x_NK.unsqueeze(0)
    out = torch.empty(world * x_NK.shape[0], *x_NK.shape[1:], dtype=x_NK.dtype,
                      device=x_NK.device)
    dist.all_gather_into_tensor(out, x_NK.contiguous(), group=group)
    return out.view(world, *x_NK.shape)


def merge_stops_static(x_NV: torch.Tensor, vocab: StaticVocab, group) -> torch.Tensor:
    """trb.canonicalize_eos without host decisions: stop_ids[0] takes logsumexp over every
    stop column (wherever it lives), the other stop columns -inf. One all-gather of
    len(stop_ids) values per row."""
    count = len(vocab.layout.stop_ids)
    if count < 2:
        return x_NV
    values = torch.full((x_NV.shape[0], count), _NEG_INF, dtype=x_NV.dtype, device=x_NV.device)
    for pos, col in vocab.stops:
        values[:, pos] = x_NV[:, col]
    merged_N = torch.logsumexp(gather_rows(values, group, vocab.world).amax(0), dim=1)
    out = x_NV.clone()
    for pos, col in vocab.stops:
        out[:, col] = merged_N if pos == 0 else _NEG_INF
    return out


def _stats(s_NV, diff_NV, beta_N, vocab: StaticVocab, group):
    """(A(beta), E_mu[diff], Var_mu[diff]) per row over the whole vocabulary."""
    local = blend_moments(s_NV, diff_NV, beta_N, None, vocab.excluded)
    m, s0, s1, s2 = combine_weighted(gather_rows(local, group, vocab.world)).unbind(1)
    mean = s1 / s0
    return m + torch.log(s0), mean, (s2 / s0 - mean * mean).clamp_min(0.0)


def solve_beta_static(student_NV, teacher_NV, eps_N, *, vocab: StaticVocab, group=None,
                      iterations: int = 8, tol: float = 1e-6, rtol: float = 1e-3,
                      dtype=torch.float32) -> StaticSolution:
    """Largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps per row, in `iterations` Newton
    steps on sqrt(KL) (bisection when a step leaves the bracket) and 2 + iterations all-gathers.

    student_NV, teacher_NV: [N, V] raw logits shards (stop tokens not yet merged); eps_N: [N]
    budgets >= 0 (0: beta = 0; teacher within budget: beta = 1). Same formulas, starting point
    and acceptance rule as trb.solve_beta: a row whose iterate reached |KL - eps| <=
    min(tol, rtol * eps) returns it, any other row the largest feasible iterate, so
    kl_to_student <= eps + tol always; a row that needs more iterations than given gets a
    smaller (still feasible) beta than solve_beta.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    s_NV = merge_stops_static(student_NV.to(dtype), vocab, group)
    diff_NV = merge_stops_static(teacher_NV.to(dtype), vocab, group) - s_NV
    diff_NV = diff_NV.masked_fill(vocab.excluded, 0.0)
    eps_N = eps_N.to(dtype)
    zero_N, one_N = torch.zeros_like(eps_N), torch.ones_like(eps_N)
    lse_s, mean_s, var_s = _stats(s_NV, diff_NV, zero_N, vocab, group)
    lse_t, mean_t, _ = _stats(s_NV, diff_NV, one_N, vocab, group)
    reverse_kl = (lse_t - lse_s) - mean_s
    kl_teacher = (mean_t - (lse_t - lse_s)).clamp_min(0.0)
    positive = eps_N > 0
    feasible = positive & (kl_teacher <= eps_N)
    active = positive & ~feasible
    atol = torch.minimum(torch.full_like(eps_N, tol), rtol * eps_N)
    c = torch.sqrt(eps_N)
    trial = torch.where(active, initial_beta(var_s, kl_teacher, c), zero_N)
    lo, kl_lo, hi = zero_N, zero_N, one_N
    done = torch.zeros_like(active)
    beta_done, kl_done = zero_N, zero_N
    for _ in range(iterations):
        lse_b, mean_b, var_b = _stats(s_NV, diff_NV, trial, vocab, group)
        kl_trial = (trial * mean_b - (lse_b - lse_s)).clamp_min(0.0)
        gap = kl_trial - eps_N
        hit = active & ~done & (gap.abs() <= atol)
        beta_done = torch.where(hit, trial, beta_done)
        kl_done = torch.where(hit, kl_trial, kl_done)
        done = done | hit
        below = gap <= 0
        lo = torch.where(below, trial, lo)
        kl_lo = torch.where(below, kl_trial, kl_lo)
        hi = torch.where(below, hi, trial)
        trial = newton_step(trial, kl_trial, var_b, c, lo, hi)
    beta = torch.where(feasible, one_N, torch.where(done, beta_done, lo))
    kl = torch.where(feasible, kl_teacher, torch.where(done, kl_done, kl_lo))
    beta = torch.where(active | feasible, beta, zero_N)
    kl = torch.where(active | feasible, kl, zero_N)
    return StaticSolution(beta=beta, kl_to_student=kl, reverse_kl=reverse_kl)


def blended_logits_static(student_NV, teacher_NV, beta_N, *, vocab: StaticVocab,
                          group=None) -> torch.Tensor:
    """[N, V] (1 - beta) s + beta t on this shard, stops merged, excluded columns -inf: log mu
    up to a per-row constant, which is all a softmax sampler (and its log_softmax log-probs)
    needs. teacher_NV None: the student alone (beta ignored)."""
    s_NV = merge_stops_static(student_NV.float(), vocab, group)
    if teacher_NV is None:
        mixed = s_NV
    else:
        t_NV = merge_stops_static(teacher_NV.float(), vocab, group)
        mixed = torch.lerp(s_NV, t_NV, beta_N.float().unsqueeze(1))
    return mixed.masked_fill(vocab.excluded, _NEG_INF)

