"""Per-token loss terms that need only a few values per row, vocab-parallel, analytic backward,
and the helpers the loss modules share.

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group,
K a top-k support. x: logits of one model (stop-merged), p = softmax(x).

  token_log_probs(x, y):  log p(y_n) per row; d/dx_v = onehot(y)_v - p_v.
  reinforce(a, log_p):     value a, gradient a * d log_p (a policy-gradient term with a
                           detached advantage, e.g. the K1 reverse KL a = log pi_S - log pi_T).
  teacher_topk_forward_kl: sum over v in topK_T(h) of pi_T(v) (log pi_T(v) - log pi_S(v)), the
                           teacher's top-k found per rank and merged from R x k candidates;
                           d/ds_j = P_T(K) pi_S(j) - pi_T(j) 1[j in K], P_T(K) = sum_K pi_T.
Collectives move a few scalars (or k triples) per row, never the vocabulary.
"""

import torch

from .vocab import (Shard, all_gather_rows, column_values, combine_weighted, lse_stats,
                    prepare_logits)

_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of fp32 per chunk: the eager passes over it stay in cache


def row_chunks(shard: Shard, chunk_rows=None):
    """Row slices of about 4 MiB of logits each (the same count on every rank)."""
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(shard.width, 1))
    return [slice(i, min(i + step, shard.rows)) for i in range(0, shard.rows, step)]


def compute_dtype(x):
    """Compute dtype: float64 for float64 inputs, float32 otherwise (bf16/fp16 upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def finite_or_raise(*values):
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise ValueError("logits must be finite in every real (non-padded) vocabulary column")


def global_lse(stats_NK, shard):
    """Combine per-rank statistics [N, 4 + E]: (max_s, sum e^(s-max_s), max_t, sum e^(t-max_t),
    E extra sums of e^(s-max_s) * f). Returns global lse_s [N], lse_t [N] and the extra sums as
    sums over p = softmax(s) ([N, E]); one all-gather."""
    gathered = all_gather_rows(stats_NK, shard.group)
    m_s, z_s = combine_weighted(gathered[..., 0:2]).unbind(1)
    m_t, z_t = combine_weighted(gathered[..., 2:4]).unbind(1)
    lse_s, lse_t = m_s + torch.log(z_s), m_t + torch.log(z_t)
    extra = combine_weighted(torch.cat([gathered[..., 0:1], gathered[..., 4:]], dim=-1))
    return lse_s, lse_t, extra[:, 1:] * torch.exp(extra[:, 0:1] - lse_s.unsqueeze(1))


def topk_support(primary_NV, other_NV, shard: Shard, k: int):
    """The global top-k of `primary` per row: (primary values, other's values at those ids,
    global ids), each [N, k]; one all-gather of R x k triples per row (a shard narrower than k
    pads its candidates with -inf, so every rank sends the same count)."""
    limit = shard.layout.size or shard.total
    if k > limit:
        raise ValueError(f"top-k support: k={k} exceeds the {limit} tokens of the vocabulary")
    local_k = min(k, shard.width)
    p_vals, local_ids = primary_NV.topk(local_k, dim=1)
    o_vals = other_NV.gather(1, local_ids)
    cand = torch.stack([p_vals, o_vals, (local_ids + shard.offset).to(p_vals.dtype)], -1)
    if local_k < k:
        pad = torch.full((cand.shape[0], k - local_k, 3), float("-inf"), dtype=cand.dtype,
                         device=cand.device)
        cand = torch.cat([cand, pad.index_fill_(2, torch.tensor([2], device=cand.device),
                                                 0.0)], dim=1)
    cand = all_gather_rows(cand.flatten(1), shard.group)  # [R, N, k * 3]
    rows = primary_NV.shape[0]
    cand = cand.view(shard.world, rows, k, 3).transpose(0, 1).reshape(rows, -1, 3)
    order = cand[..., 0].topk(k, dim=1).indices
    best = cand.gather(1, order.unsqueeze(-1).expand(-1, -1, 3))
    return best[..., 0], best[..., 1], best[..., 2].to(torch.int64)


def scatter_owned(grad_NV, coeff_NK, ids_NK, shard: Shard):
    """grad_NV[n, id - offset] += coeff_NK[n, j] for the global ids this rank owns (in place)."""
    local = ids_NK - shard.offset
    owned = (local >= 0) & (local < shard.width)
    contrib = torch.where(owned, coeff_NK, torch.zeros_like(coeff_NK)).to(grad_NV.dtype)
    grad_NV.scatter_add_(1, local.clamp(0, shard.width - 1), contrib)
    return grad_NV


def check_tokens(tokens, shard: Shard, device) -> torch.Tensor:
    """[N] int64 token ids; ValueError unless one per row and inside the vocabulary."""
    tokens = torch.as_tensor(tokens, dtype=torch.int64, device=device)
    if tokens.shape != (shard.rows,):
        raise ValueError(f"tokens must have shape [{shard.rows}], got {tuple(tokens.shape)}")
    limit = shard.layout.size or shard.total
    if bool(((tokens < 0) | (tokens >= limit)).any()):
        raise ValueError(f"tokens must be vocabulary ids in [0, {limit})")
    return tokens


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NV, tokens_N, shard, chunk_rows):
        x = prepare_logits(x_NV, shard, compute_dtype(x_NV))
        m, z = combine_weighted(all_gather_rows(lse_stats(x), shard.group)).unbind(1)
        lse = m + torch.log(z)
        value = column_values(x, tokens_N.unsqueeze(1), shard)[:, 0] - lse
        finite_or_raise(value)
        ctx.save_for_backward(x_NV, lse, tokens_N)
        ctx.shard, ctx.chunk_rows = shard, chunk_rows
        return value

    @staticmethod
    def backward(ctx, grad_N):
        x_NV, lse, tokens_N = ctx.saved_tensors
        shard = ctx.shard
        grad_NV = torch.empty_like(x_NV)
        for rows in row_chunks(shard, ctx.chunk_rows):
            p = (prepare_logits(x_NV[rows], shard, compute_dtype(x_NV)) - lse[rows, None]).exp_()
            grad_NV[rows] = p.mul_(-grad_N[rows, None])
        local = tokens_N - shard.offset
        hit = ((local >= 0) & (local < shard.width)).nonzero().squeeze(1)
        grad_NV[hit, local[hit]] += grad_N[hit].to(grad_NV.dtype)
        return grad_NV, None, None, None


def token_log_probs(x_NV, tokens_N, shard: Shard, chunk_rows=None) -> torch.Tensor:
    """[N] log p(tokens_N[n]) of stop-merged logits x_NV (this rank's shard), identical on every
    rank, differentiable w.r.t. x_NV (analytic backward, in row chunks)."""
    return _TokenLogProb.apply(x_NV, tokens_N, shard, chunk_rows)


def reinforce(advantage_N, log_prob_N):
    """Value `advantage_N` (detached), gradient advantage * d log_prob_N."""
    advantage_N = advantage_N.detach()
    return advantage_N + advantage_N * (log_prob_N - log_prob_N.detach())


class _TeacherTopkForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_NV, t_NV, shard, k):
        dtype = compute_dtype(s_NV)
        s, t = prepare_logits(s_NV, shard, dtype), prepare_logits(t_NV, shard, dtype)
        lse_s, lse_t, _ = global_lse(torch.cat([lse_stats(s), lse_stats(t)], 1), shard)
        t_k, s_k, ids_k = topk_support(t, s, shard, k)
        log_pt, log_ps = t_k - lse_t[:, None], s_k - lse_s[:, None]
        p_t = log_pt.exp()
        # 0 log 0 = 0 where k reaches past the real columns (merged-away stop ids)
        value = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(1)
        finite_or_raise(value)
        ctx.save_for_backward(s_NV, lse_s, p_t, ids_k)
        ctx.shard = shard
        return value

    @staticmethod
    def backward(ctx, grad_N):
        s_NV, lse_s, p_t, ids_k = ctx.saved_tensors
        shard = ctx.shard
        dtype = compute_dtype(s_NV)
        mass_N = p_t.sum(1) * grad_N.to(dtype)
        grad_NV = torch.empty_like(s_NV, dtype=dtype)
        for rows in row_chunks(shard):
            p = (prepare_logits(s_NV[rows], shard, dtype) - lse_s[rows, None]).exp_()
            grad_NV[rows] = p.mul_(mass_N[rows, None])
        scatter_owned(grad_NV, -p_t * grad_N.to(dtype)[:, None], ids_k, shard)
        return grad_NV.to(s_NV.dtype), None, None, None


def teacher_topk_forward_kl(s_NV, t_NV, shard: Shard, k: int) -> torch.Tensor:
    """[N] forward KL over the teacher's top-k at each row, sum_{v in topK_T} pi_T(v)
    (log pi_T(v) - log pi_S(v)) with pi_T, pi_S normalised over the whole vocabulary (not
    renormalised within the top-k), differentiable w.r.t. the stop-merged student logits s_NV
    only. O(N k) saved state."""
    return _TeacherTopkForwardKL.apply(s_NV, t_NV.detach(), shard, k)
