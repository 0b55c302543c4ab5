"""Per-prefix reverse KL(pi_S || pi_T) distillation losses, vocab-parallel, analytic backward.

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group,
K top-k support size. s, t: student and teacher logits; p = softmax(s), q = softmax(t).

Estimators (method.md "OPEN"; the gradient is always with respect to the student logits only):
  full:    KL_n = sum_v p (log p - log q), exact; dKL/ds_v = p_v ((log p_v - log q_v) - KL_n).
           Processed in row chunks (~4 MiB) so only chunk-sized temporaries ever live; one
           collective for all rows in the forward, none in the backward.
  topk:    the paper's estimator on the student's top-k support K_n: weights p~ = p / p(K_n),
           value sum_{v in K} p~_v (log p_v - log q_v); policy-gradient surrogate gradient
           p~_v (delta_v - value) on v in K (zero elsewhere). With K = the whole vocabulary it
           equals the full estimator, value and gradient.
  sampled: K1 at the rollout token y: A = log p_y - log q_y as a detached advantage; value A,
           gradient A (onehot(y) - p) (token_terms.reinforce of token_terms.token_log_probs).
Under a group every rank returns the same loss and the gradient of its own shard; collectives
move a few scalars (or K triples) per row, never the vocabulary.
"""

import torch

from .token_terms import (check_tokens, compute_dtype, finite_or_raise, global_lse, reinforce,
                          row_chunks, scatter_owned, token_log_probs, topk_support)
from .vocab import describe_shard, finite_shift, lse_stats, merge_stops, prepare_logits

ESTIMATORS = ("full", "topk", "sampled")


def kl_chunk_stats(s_NV, t_NV, excluded_V, dtype):
    """[n, 5] local (max s, sum e^(s - max s), max t, sum e^(t - max t), sum e^(s - max s)(s - t))
    of a row chunk; excluded columns ([V] bool or None) count as -inf in both models."""
    s, t = s_NV.to(dtype), t_NV.to(dtype)
    gap = s - t
    if excluded_V is not None:
        s = torch.where(excluded_V, float("-inf"), s)
        t = torch.where(excluded_V, float("-inf"), t)
        gap = torch.where(excluded_V, 0.0, gap)
    m_s, m_t = s.amax(dim=1), t.amax(dim=1)
    e_s = torch.exp(s - finite_shift(m_s).unsqueeze(1))
    z_t = torch.exp(t - finite_shift(m_t).unsqueeze(1)).sum(1)
    return torch.stack([m_s, e_s.sum(1), m_t, z_t, (e_s * gap).sum(1)], dim=1)


def kl_chunk_grad(s_NV, t_NV, lse_s_n, shift_n, grad_n, excluded_V, dtype):
    """[n, V] dKL/ds * upstream grad = p (s - t - shift) g, shift = lse_s - lse_t + KL per row."""
    s = s_NV.to(dtype)
    p = torch.exp(s - lse_s_n.unsqueeze(1))
    coeff = (s - t_NV.to(dtype) - shift_n.unsqueeze(1)) * grad_n.unsqueeze(1)
    if excluded_V is not None:
        p = torch.where(excluded_V, 0.0, p)
        coeff = torch.where(excluded_V, 0.0, coeff)
    return (p * coeff).to(s_NV.dtype)


_FUSED = {}


def _kernel(fn, fused):
    """fn itself, or (fused=True) fn compiled by torch.compile into one pass per chunk."""
    if not fused:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


class _FullReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_NV, t_NV, shard, chunk_rows, fused):
        excluded, dtype = shard.excluded(s_NV.device), compute_dtype(s_NV)
        stats = _kernel(kl_chunk_stats, fused)
        local = torch.cat([stats(s_NV[rows], t_NV[rows], excluded, dtype)
                           for rows in row_chunks(shard, chunk_rows)])
        lse_s, lse_t, sums = global_lse(local, shard)  # one collective for all rows
        kl_N = sums[:, 0] - lse_s + lse_t
        finite_or_raise(kl_N)
        ctx.save_for_backward(s_NV, t_NV, lse_s, lse_s - lse_t + kl_N)
        ctx.shard, ctx.chunk_rows, ctx.fused = shard, chunk_rows, fused
        return kl_N.clamp_min(0.0)

    @staticmethod
    def backward(ctx, grad_N):
        s_NV, t_NV, lse_s, shift = ctx.saved_tensors
        excluded, dtype = ctx.shard.excluded(s_NV.device), compute_dtype(s_NV)
        grad_fn = _kernel(kl_chunk_grad, ctx.fused)
        grad_NV = torch.empty_like(s_NV)
        for rows in row_chunks(ctx.shard, ctx.chunk_rows):
            grad_NV[rows] = grad_fn(s_NV[rows], t_NV[rows], lse_s[rows], shift[rows],
                                    grad_N[rows].to(dtype), excluded, dtype)
        return grad_NV, None, None, None, None


class _TopkReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_NV, t_NV, shard, k):
        s = prepare_logits(s_NV, shard, compute_dtype(s_NV))
        t = prepare_logits(t_NV, shard, compute_dtype(s_NV))
        lse_s, lse_t, _ = global_lse(torch.cat([lse_stats(s), lse_stats(t)], 1), shard)
        s_k, t_k, ids_k = topk_support(s, t, shard, k)
        if not bool(torch.isfinite(s_k).all()):
            raise ValueError(f"topk loss: k={k} exceeds the number of real vocabulary columns")
        delta = (s_k - lse_s[:, None]) - (t_k - lse_t[:, None])
        weights = torch.softmax(s_k, dim=1)
        value = (weights * delta).sum(1)
        finite_or_raise(value)
        ctx.save_for_backward(weights * (delta - value[:, None]), ids_k)
        ctx.shard, ctx.like = shard, s_NV
        return value

    @staticmethod
    def backward(ctx, grad_N):
        coeff_NK, ids_NK = ctx.saved_tensors
        shard = ctx.shard
        grad = torch.zeros(shard.rows, shard.width, dtype=coeff_NK.dtype, device=coeff_NK.device)
        scatter_owned(grad, coeff_NK * grad_N[:, None], ids_NK, shard)
        return grad.to(ctx.like.dtype), None, None, None


def per_token_reverse_kl(student_logits, teacher_logits, *, group=None, estimator="full",
                         vocab=None, topk=16, tokens=None, chunk_rows=None, fused=False):
    """[N] per-prefix reverse KL(pi_S || pi_T) estimates, differentiable w.r.t. student_logits.

    student_logits, teacher_logits: [N, V_local] (vocabulary sharded over `group`); the teacher
    never receives a gradient. estimator: "full" | "topk" (k=`topk`) | "sampled" (needs
    `tokens`: [N] global ids of the rollout tokens). vocab: true vocab size or VocabLayout.
    fused=True compiles the "full" estimator's per-chunk passes with torch.compile.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    shard = describe_shard(student_logits, teacher_logits, group=group, vocab=vocab)
    # Stop tokens merged once, differentiably: the merged column's gradient reaches both.
    student = merge_stops(student_logits, shard)
    teacher = merge_stops(teacher_logits.detach(), shard)
    if estimator == "full":
        return _FullReverseKL.apply(student, teacher, shard, chunk_rows, fused)
    if estimator == "topk":
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        return _TopkReverseKL.apply(student, teacher, shard, topk)
    if tokens is None:
        raise ValueError('estimator="sampled" needs tokens: the [N] rollout token ids')
    tokens = check_tokens(tokens, shard, student_logits.device)
    with torch.no_grad():
        teacher_log_p = token_log_probs(teacher, tokens, shard, chunk_rows)
    student_log_p = token_log_probs(student, tokens, shard, chunk_rows)
    return reinforce(student_log_p - teacher_log_p, student_log_p)


def reverse_kl_loss(student_logits, teacher_logits, *, mask=None, group=None, estimator="full",
                    vocab=None, topk=16, tokens=None, chunk_rows=None, fused=False):
    """Token-mean over `mask` ([N], bool or 0/1; None: all rows) of per_token_reverse_kl."""
    per_token = per_token_reverse_kl(student_logits, teacher_logits, group=group,
                                     estimator=estimator, vocab=vocab, topk=topk,
                                     tokens=tokens, chunk_rows=chunk_rows, fused=fused)
    if mask is None:
        return per_token.mean()
    mask = torch.as_tensor(mask, device=per_token.device).to(per_token.dtype)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask must have shape {tuple(per_token.shape)}, got {tuple(mask.shape)}")
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
