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
                    prepare_logits)


@dataclass(frozen=True)
class BetaSolution:
    """Per-row solution of the trust-region problem (all tensors [N], float in compute dtype).

    beta: the blend weight; kl_to_student: KL(mu_beta || pi_S) (<= eps + tol);
    reverse_kl: KL(pi_S || pi_T), the per-prefix distillation loss value, free from the solve;
    teacher_feasible: KL(pi_T || pi_S) <= eps with eps > 0, i.e. beta = 1;
    token_iterations: Newton evaluations spent on each row; iterations: their maximum.
    """

    beta: torch.Tensor
    kl_to_student: torch.Tensor
    reverse_kl: torch.Tensor
    teacher_feasible: torch.Tensor
    token_iterations: torch.Tensor
    iterations: int


def blend_moments(s_NV: torch.Tensor, diff_NV: torch.Tensor, beta_N: torch.Tensor):
    """[N, 4] local (max l, sum w, sum w*diff, sum w*diff^2) with l = s + beta*diff, w = e^(l-max).

    The hot loop of the solver: one read of s and diff per evaluation.
    """
    l_NV = torch.addcmul(s_NV, diff_NV, beta_N.unsqueeze(1))
    m_N = l_NV.amax(dim=1)
    w_NV = torch.exp(l_NV - finite_shift(m_N).unsqueeze(1))
    wd_NV = w_NV * diff_NV
    return torch.stack([m_N, w_NV.sum(1), wd_NV.sum(1), (wd_NV * diff_NV).sum(1)], dim=1)


class _Blend:
    """Evaluates the blend statistics of one batch of rows for any beta (collectives inside)."""

    def __init__(self, s_NV, diff_NV, shard: Shard):
        self.s_NV, self.diff_NV, self.shard = s_NV, diff_NV, shard

    def at(self, beta_N):
        """(A(beta), E_mu[diff], Var_mu[diff]) per row, over the whole vocabulary."""
        local = blend_moments(self.s_NV, self.diff_NV, beta_N)
        m, s0, s1, s2 = combine_weighted(all_gather_rows(local, self.shard.group)).unbind(1)
        mean = s1 / s0
        return m + torch.log(s0), mean, (s2 / s0 - mean * mean).clamp_min(0.0)


def _eps_tensor(eps, rows, dtype, device):
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


def _check_finite(stats, s_NV, t_NV, shard: Shard):
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


def solve_beta(student_logits, teacher_logits, eps, *, group=None, tol=1e-6, rtol=1e-3,
               max_iters=30, vocab=None, dtype=torch.float64) -> BetaSolution:
    """Largest beta with KL(mu_beta || pi_S) <= eps, per row, over a possibly sharded vocabulary.

    student_logits, teacher_logits: [N, V_local] raw logits (any float dtype), the vocabulary
    sharded over `group` in contiguous rank order (None: all local). eps: float or [N] (>= 0).
    vocab: true vocab size (int) or a VocabLayout (padding and merged stop tokens excluded).
    Converged when |KL - eps| <= min(tol, rtol * eps); rows still open after max_iters return
    the feasible end of their bracket, so kl_to_student <= eps + tol always.
    Statistics are computed in `dtype` (float64 by default: the constraint is checked to ~1e-12;
    float32 halves the time and keeps ~1e-6).
    """
    if max_iters < 1 or tol <= 0 or rtol <= 0:
        raise ValueError(f"need max_iters >= 1, tol > 0, rtol > 0; got {max_iters}, {tol}, {rtol}")
    shard = describe_shard(student_logits, teacher_logits, group=group, vocab=vocab)
    eps_N = _eps_tensor(eps, shard.rows, dtype, student_logits.device)
    s_NV = prepare_logits(student_logits, shard, dtype)
    t_NV = prepare_logits(teacher_logits, shard, dtype)
    diff_NV = t_NV - s_NV
    del t_NV
    excluded = shard.excluded(diff_NV.device)
    if excluded is not None:
        diff_NV[:, excluded] = 0.0  # both -inf there: keep l_beta = -inf, not NaN
    blend = _Blend(s_NV, diff_NV, shard)
    zero_N, one_N = torch.zeros_like(eps_N), torch.ones_like(eps_N)
    lse_s, mean_s, var_s = blend.at(zero_N)
    lse_t, mean_t, _ = blend.at(one_N)
    _check_finite((lse_s, mean_s, var_s, lse_t, mean_t), student_logits, teacher_logits, shard)
    reverse_kl = (lse_t - lse_s) - mean_s
    kl_teacher = (mean_t - (lse_t - lse_s)).clamp_min(0.0)

    def kl_at(beta_N, lse_b, mean_b):
        return (beta_N * mean_b - (lse_b - lse_s)).clamp_min(0.0)

    positive = eps_N > 0
    feasible = positive & (kl_teacher <= eps_N)
    active = positive & ~feasible
    converged = torch.zeros_like(active)
    beta = torch.where(feasible, one_N, zero_N)
    kl = torch.where(feasible, kl_teacher, zero_N)
    lo, kl_lo, hi = zero_N.clone(), zero_N.clone(), one_N.clone()
    atol = torch.minimum(torch.full_like(eps_N, tol), rtol * eps_N)
    iters_N = torch.zeros(shard.rows, dtype=torch.int64, device=eps_N.device)
    # Initial guess: sqrt(KL) ~ a beta + b beta^2 matched to its slope at 0 and value at 1.
    a = torch.sqrt(var_s / 2)
    c = torch.sqrt(eps_N)
    b = torch.sqrt(kl_teacher) - a
    disc = (a * a + 4 * b * c).clamp_min(0.0)
    guess = (2 * c / (a + torch.sqrt(disc))).nan_to_num(0.5)
    trial = torch.where(active, guess.clamp(1e-6, 1 - 1e-6), zero_N)
    iterations = 0
    while bool(active.any()) and iterations < max_iters:
        iterations += 1
        lse_b, mean_b, var_b = blend.at(trial)
        kl_trial = kl_at(trial, lse_b, mean_b)
        iters_N += active.long()
        gap = kl_trial - eps_N
        done = active & (gap.abs() <= atol)
        converged |= done
        beta = torch.where(done, trial, beta)
        kl = torch.where(done, kl_trial, kl)
        below = active & (gap <= 0)
        lo = torch.where(below, trial, lo)
        kl_lo = torch.where(below, kl_trial, kl_lo)
        hi = torch.where(active & (gap > 0), trial, hi)
        active = active & ~done & (hi - lo > 1e-12)
        # Newton step on sqrt(KL) - sqrt(eps); bisection when it leaves the bracket.
        root = torch.sqrt(kl_trial)
        slope = trial * var_b / (2 * root)
        step = trial - (root - c) / slope
        inside = torch.isfinite(step) & (step > lo) & (step < hi)
        trial = torch.where(inside, step, (lo + hi) / 2)
    unresolved = positive & ~feasible & ~converged
    beta = torch.where(unresolved, lo, beta)
    kl = torch.where(unresolved, kl_lo, kl)
    return BetaSolution(beta=beta, kl_to_student=kl, reverse_kl=reverse_kl,
                        teacher_feasible=feasible, token_iterations=iters_N,
                        iterations=iterations)
