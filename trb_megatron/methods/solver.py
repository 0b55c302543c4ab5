"""The trust-region blend: mu_beta ∝ pi_S^(1-beta) pi_T^beta with the largest feasible beta.

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group.

With s, t the student and teacher logits and diff = t - s (any per-row constant shift is
harmless: it cancels in every normalised quantity),

    l_beta = s + beta * diff,   A(beta) = logsumexp(l_beta),   mu_beta = softmax(l_beta)
    KL(mu_beta || pi_S) = beta * E_mu[diff] - (A(beta) - A(0))
    d/dbeta KL          = beta * Var_mu[diff]  >= 0

beta* is the largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps (method.md): 1 when the
teacher itself is inside the budget, 0 exactly when eps = 0, otherwise the root of
KL(beta) = eps, found by safeguarded Newton on sqrt(KL) (nearly linear in beta for small beta;
bracket kept, bisection fallback, the feasible end returned when iterations run out). One
evaluation is one pass over the local vocabulary plus one all-gather of 4 scalars per row.
"""

from dataclasses import dataclass

import torch

from .vocab import (Shard, all_gather_rows, combine_weighted, describe_shard, finite_shift,
                    merge_stops)


@dataclass(frozen=True)
class BetaSolution:
    """Per-row solution of the trust-region problem (all tensors [N], float in compute dtype).

    beta: the blend weight; kl_to_student: KL(mu_beta || pi_S) (<= eps + tol);
    reverse_kl: KL(pi_S || pi_T), the per-prefix distillation loss value, free from the solve;
    teacher_feasible: KL(pi_T || pi_S) <= eps with eps > 0, i.e. beta = 1;
    token_iterations: Newton evaluations spent on each row; iterations: the evaluations made
    (their maximum for the early-exit solve, the fixed count for the graph-safe one).
    """

    beta: torch.Tensor
    kl_to_student: torch.Tensor
    reverse_kl: torch.Tensor
    teacher_feasible: torch.Tensor
    token_iterations: torch.Tensor
    iterations: int


def blend_moments(s_NV, diff_NV, beta_M, rows_M, excluded_V):
    """[M, 4] local (max l, sum w, sum w*diff, sum w*diff^2) for rows `rows_M` ([M] indices, or
    None for all N rows), where l = s + beta*diff and w = exp(l - max l); excluded columns ([V]
    bool or None; diff must be 0 there) get l = -inf whatever s holds.

    The hot loop of the solver. Compiled (torch.compile, `fused=True`) it is one pass over the
    selected rows of s and diff with no [N, V] temporaries.
    """
    if rows_M is not None:
        s_NV, diff_NV = s_NV[rows_M], diff_NV[rows_M]
    l_NV = s_NV + beta_M.unsqueeze(1) * diff_NV
    if excluded_V is not None:
        l_NV = torch.where(excluded_V, float("-inf"), l_NV)
    m_N = l_NV.amax(dim=1)
    w_NV = torch.exp(l_NV - finite_shift(m_N).unsqueeze(1))
    wd_NV = w_NV * diff_NV
    return torch.stack([m_N, w_NV.sum(1), wd_NV.sum(1), (wd_NV * diff_NV).sum(1)], dim=1)


_FUSED = {}
_EAGER_CHUNK_ELEMENTS = 1 << 18  # eager temporaries of ~2 MiB stay in cache, no page faults


def _chunked_moments(s_NV, diff_NV, beta_M, rows_M, excluded_V):
    """blend_moments in row chunks: the eager path's [chunk, V] temporaries stay small."""
    step = max(1, _EAGER_CHUNK_ELEMENTS // max(s_NV.shape[1], 1))
    parts = []
    for a in range(0, beta_M.shape[0], step):
        chunk = slice(a, a + step)
        if rows_M is None:
            parts.append(blend_moments(s_NV[chunk], diff_NV[chunk], beta_M[chunk], None,
                                       excluded_V))
        else:
            parts.append(blend_moments(s_NV, diff_NV, beta_M[chunk], rows_M[chunk], excluded_V))
    return torch.cat(parts)


def initial_beta(var_s, kl_teacher, sqrt_eps):
    """First Newton iterate: sqrt(KL) ~ a beta + b beta^2 matched to its slope at 0 and its
    value at 1, solved for sqrt(eps), kept strictly inside (0, 1)."""
    a = torch.sqrt(var_s / 2)
    b = torch.sqrt(kl_teacher) - a
    disc = (a * a + 4 * b * sqrt_eps).clamp_min(0.0)
    return (2 * sqrt_eps / (a + torch.sqrt(disc))).nan_to_num(0.5).clamp(1e-6, 1 - 1e-6)


def newton_step(trial, kl_trial, var_b, sqrt_eps, lo, hi):
    """Next iterate: a Newton step on sqrt(KL) - sqrt(eps) (d/dbeta KL = beta Var_mu[diff]),
    bisection of the bracket (lo, hi) when the step leaves it."""
    root = torch.sqrt(kl_trial)
    step = trial - (root - sqrt_eps) / (trial * var_b / (2 * root))
    inside = torch.isfinite(step) & (step > lo) & (step < hi)
    return torch.where(inside, step, (lo + hi) / 2)


def _moments_fn(fused: bool):
    if not fused:
        return _chunked_moments
    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(blend_moments, dynamic=True)
    return _FUSED["fn"]


class Blend:
    """The blend statistics of one batch of rows at any beta (collectives inside).

    s_NV, t_NV: stop-merged logits shards in the compute dtype (kernels on same-dtype inputs
    vectorise far better than ones that upcast on the fly); holds s and diff = t - s, with
    diff = 0 on excluded columns. fused: the compiled per-iteration pass (GPUs, large
    vocabularies).
    """

    def __init__(self, s_NV, t_NV, shard: Shard, fused: bool = False):
        self.s_NV = s_NV
        self.excluded = shard.excluded(s_NV.device)
        self.diff_NV = t_NV - s_NV
        if self.excluded is not None:
            self.diff_NV = self.diff_NV.masked_fill(self.excluded, 0.0)
        self.shard = shard
        self.moments = _moments_fn(fused)

    def at(self, beta_N, rows=None):
        """(A(beta), E_mu[diff], Var_mu[diff]) per row, over the whole vocabulary.

        rows: optional [M] indices to evaluate (the same on every rank); other rows get 0.
        Late iterations of the early-exit solve touch only the few rows still open.
        """
        beta = beta_N if rows is None else beta_N[rows]
        local = self.moments(self.s_NV, self.diff_NV, beta, rows, self.excluded)
        m, s0, s1, s2 = combine_weighted(all_gather_rows(local, self.shard.group)).unbind(1)
        mean = s1 / s0
        out = torch.stack([m + torch.log(s0), mean, (s2 / s0 - mean * mean).clamp_min(0.0)])
        if rows is not None:
            out = torch.zeros(3, beta_N.shape[0], dtype=out.dtype, device=out.device).index_copy_(
                1, rows, out)
        return out.unbind(0)


def newton_solve(blend: Blend, eps_N, *, tol: float, rtol: float, iterations: int,
                 early_exit: bool, check=None) -> BetaSolution:
    """The trust-region solve, written once for both loop forms.

    eps_N: [N] budgets >= 0, +inf allowed (beta = 1: the teacher itself, e.g. a teacher-prefix
    token). early_exit=True stops when every row has converged and evaluates only open rows
    (host synchronisation each iteration: the megatron backend, the trainer); False runs exactly
    `iterations` evaluations on every row with no host decision (CUDA-graph safe: the SGLang
    composite model). Either way a row whose iterate reached |KL - eps| <= min(tol, rtol * eps)
    returns it and any other row the feasible end of its bracket, so kl_to_student <= eps + tol.
    check: optional callable on the first statistics (the validating entry point's NaN check).
    """
    zero_N, one_N = torch.zeros_like(eps_N), torch.ones_like(eps_N)
    lse_s, mean_s, var_s = blend.at(zero_N)
    lse_t, mean_t, _ = blend.at(one_N)
    if check is not None:
        check((lse_s, mean_s, var_s, lse_t, mean_t))
    reverse_kl = (lse_t - lse_s) - mean_s
    kl_teacher = (mean_t - (lse_t - lse_s)).clamp_min(0.0)
    positive = eps_N > 0
    feasible = positive & (kl_teacher <= eps_N)
    active = positive & ~feasible
    open_N = active
    converged = torch.zeros_like(active)
    beta = torch.where(feasible, one_N, zero_N)
    kl = torch.where(feasible, kl_teacher, zero_N)
    lo, kl_lo, hi = zero_N.clone(), zero_N.clone(), one_N.clone()
    atol = torch.minimum(torch.full_like(eps_N, tol), rtol * eps_N)
    iters_N = torch.zeros(eps_N.shape[0], dtype=torch.int64, device=eps_N.device)
    c = torch.sqrt(eps_N)
    trial = torch.where(active, initial_beta(var_s, kl_teacher, c), zero_N)
    done_iterations = 0
    for _ in range(iterations):
        rows = None
        if early_exit:
            if not bool(open_N.any()):
                break
            rows = open_N.nonzero().squeeze(1)
            rows = None if rows.numel() == eps_N.shape[0] else rows
        done_iterations += 1
        lse_b, mean_b, var_b = blend.at(trial, rows)
        kl_trial = (trial * mean_b - (lse_b - lse_s)).clamp_min(0.0)
        iters_N += open_N.long()
        gap = kl_trial - eps_N
        hit = open_N & (gap.abs() <= atol)
        converged |= hit
        beta = torch.where(hit, trial, beta)
        kl = torch.where(hit, kl_trial, kl)
        below = open_N & (gap <= 0)
        lo = torch.where(below, trial, lo)
        kl_lo = torch.where(below, kl_trial, kl_lo)
        hi = torch.where(open_N & (gap > 0), trial, hi)
        open_N = open_N & ~hit & (hi - lo > 1e-12)
        trial = newton_step(trial, kl_trial, var_b, c, lo, hi)
    unresolved = active & ~converged
    beta = torch.where(unresolved, lo, beta)
    kl = torch.where(unresolved, kl_lo, kl)
    return BetaSolution(beta=beta, kl_to_student=kl, reverse_kl=reverse_kl,
                        teacher_feasible=feasible, token_iterations=iters_N,
                        iterations=done_iterations)


def budgets(eps, rows, dtype, device):
    """[N] budgets from a float or an [N] tensor; ValueError unless finite and >= 0."""
    eps_N = torch.as_tensor(eps, dtype=dtype, device=device)
    if eps_N.dim() == 0:
        eps_N = eps_N.expand(rows)
    if eps_N.shape != (rows,):
        raise ValueError(f"eps must be a float or a [N] tensor with N={rows}, got shape "
                         f"{tuple(eps_N.shape)}")
    if bool(torch.isnan(eps_N).any()) or bool((eps_N < 0).any()) or bool(torch.isinf(eps_N).any()):
        raise ValueError("eps must be finite and >= 0 (it is a KL budget in nats); got "
                         f"min={eps_N.min().item()}, max={eps_N.max().item()}")
    return eps_N.clone()


def finite_check(s_NV, t_NV, shard: Shard):
    """A `newton_solve` check: ValueError naming the logits when the statistics are not finite."""
    def check(stats):
        if all(bool(torch.isfinite(x).all()) for x in stats):
            return
        bad = []
        for name, x in (("student_logits", s_NV), ("teacher_logits", t_NV)):
            excluded = shard.excluded(x.device)
            valid = x if excluded is None else x[:, ~excluded]
            count = int((~torch.isfinite(valid)).sum())
            if count:
                bad.append(f"{name}: {count} NaN/inf values in real vocabulary columns on rank "
                           f"{shard.rank}")
        raise ValueError("logits must be finite in every real (non-padded) vocabulary column; "
                         + ("; ".join(bad) or "another rank of the vocabulary group holds NaN/inf"))
    return check


def solve_beta(student_logits, teacher_logits, eps, *, group=None, tol=1e-6, rtol=1e-3,
               max_iters=30, vocab=None, dtype=torch.float64, fused=False) -> BetaSolution:
    """Largest beta with KL(mu_beta || pi_S) <= eps, per row, over a possibly sharded vocabulary.

    student_logits, teacher_logits: [N, V_local] raw logits (any float dtype), the vocabulary
    sharded over `group` in contiguous rank order (None: all local). eps: float or [N] (>= 0).
    vocab: true vocab size (int) or a VocabLayout (padding and merged stop tokens excluded).
    Converged when |KL - eps| <= min(tol, rtol * eps); rows still open after max_iters return
    the feasible end of their bracket, so kl_to_student <= eps + tol always.
    Statistics are computed in `dtype`: float64 by default (KL resolved to ~1e-12); float32 is
    2-3x faster but resolves KL only to ~1e-6 on peaked logits, so pair it with tol >= 1e-5.
    fused=True compiles the per-iteration pass with torch.compile (one pass over both logits per
    iteration; the first call compiles for seconds). Validates its input (host checks); the
    graph-safe form is `newton_solve(..., early_exit=False)` (behaviour.token_behaviour).
    """
    if max_iters < 1 or tol <= 0 or rtol <= 0:
        raise ValueError(f"need max_iters >= 1, tol > 0, rtol > 0; got {max_iters}, {tol}, {rtol}")
    shard = describe_shard(student_logits, teacher_logits, group=group, vocab=vocab)
    eps_N = budgets(eps, shard.rows, dtype, student_logits.device)
    s_NV, t_NV = (merge_stops(x.to(dtype), shard) for x in (student_logits, teacher_logits))
    return newton_solve(Blend(s_NV, t_NV, shard, fused), eps_N, tol=tol, rtol=rtol,
                        iterations=max_iters, early_exit=True,
                        check=finite_check(student_logits, teacher_logits, shard))
