"""Blended log-probabilities and seeded sampling over a sharded vocabulary.

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group.

log mu_beta = (1-beta) log pi_S + beta log pi_T - log Z(beta), computed on each rank's shard
with one all-gather of (max, sum) per row. Sampling is Gumbel-max: token = argmax_v
(log mu(v) / temperature + g(seed, row, v)), where the Gumbel noise g comes from a counter-based
hash of (seed, row id, GLOBAL column id). Each rank draws noise for its own columns only, and
the winner is found with one all-gather of (value, id, log-prob) triples per row, so the
sampled ids are identical on every rank and for any sharding of the same vocabulary.
"""

from dataclasses import dataclass, replace

import torch

from .vocab import (all_gather_rows, column_values, combine_weighted, describe_shard, logsumexp,
                    lse_stats, merge_stops, prepare_logits)

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SampledTokens:
    """token_ids [N] int64 global ids (identical on every rank); log_prob [N]: log-probability
    of each token under the distribution it was drawn from (log mu at temperature 1)."""

    token_ids: torch.Tensor
    log_prob: torch.Tensor


def blended_log_probs(student_logits, teacher_logits, beta, *, group=None, vocab=None,
                      dtype=torch.float32):
    """[N, V_local] log mu_beta on this rank's shard; excluded columns are -inf.

    beta: [N] or float in [0, 1]. teacher_logits may be None when beta is 0 everywhere (pure
    student: the teacher need not run).
    """
    pair = (student_logits,) if teacher_logits is None else (student_logits, teacher_logits)
    shard = describe_shard(*pair, group=group, vocab=vocab)
    return _log_mu(shard, student_logits, teacher_logits, beta, dtype)


def blended_token_log_probs(student_logits, teacher_logits, beta, tokens, *, group=None,
                            vocab=None, dtype=torch.float32, chunk_rows=None):
    """[N] log mu_beta(tokens[n]) of row n: the `blended_log_probs` value at each row's token
    (a global id), identical on every rank, computed in row chunks (~4 MiB each, the same count
    on every rank) so no [N, V] temporary is made. beta: [N] or float; teacher_logits may be
    None when beta is 0 everywhere. What the trainer compares with the rollout engine's
    log-probs (the train-inference mismatch)."""
    pair = (student_logits,) if teacher_logits is None else (student_logits, teacher_logits)
    shard = describe_shard(*pair, group=group, vocab=vocab)
    beta_N = torch.as_tensor(beta, dtype=dtype, device=student_logits.device).expand(shard.rows)
    step = chunk_rows or max(1, (1 << 20) // max(shard.total // shard.world, 1))
    out = []
    for start in range(0, shard.rows, step):
        rows = slice(start, min(start + step, shard.rows))
        part = replace(shard, rows=rows.stop - rows.start)
        log_mu = _log_mu(part, student_logits[rows],
                         None if teacher_logits is None else teacher_logits[rows],
                         beta_N[rows], dtype)
        out.append(column_values(log_mu, tokens[rows].unsqueeze(1), part)[:, 0])
    return torch.cat(out) if out else beta_N.new_zeros(0)


def _log_mu(shard, student_logits, teacher_logits, beta, dtype):
    s_NV = prepare_logits(merge_stops(student_logits.to(dtype), shard), shard, dtype)
    beta_N = torch.as_tensor(beta, dtype=dtype, device=s_NV.device).expand(shard.rows)
    if bool(((beta_N < 0) | (beta_N > 1) | torch.isnan(beta_N)).any()):
        raise ValueError("beta must lie in [0, 1]")
    if teacher_logits is None:
        if bool((beta_N != 0).any()):
            raise ValueError("teacher_logits is None but beta > 0 for some rows")
        mixed = s_NV
    else:
        t_NV = prepare_logits(merge_stops(teacher_logits.to(dtype), shard), shard, dtype)
        # (1-beta) s + beta t, keeping -inf (not NaN) on excluded columns.
        mixed = torch.lerp(s_NV, t_NV, beta_N.unsqueeze(1))
        excluded = shard.excluded(mixed.device)
        if excluded is not None:
            mixed[:, excluded] = float("-inf")
    lse = logsumexp(mixed, shard)
    if not bool(torch.isfinite(lse).all()):
        raise ValueError("logits must be finite in every real (non-padded) vocabulary column")
    return mixed - lse.unsqueeze(1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2^32.

    Multipliers stay below 2^31 so no int64 product overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def gumbel_noise(seed: int, row_ids: torch.Tensor, col_ids: torch.Tensor, dtype=torch.float64):
    """[N, V] standard Gumbel noise, a pure function of (seed, row id, global column id)."""
    seed_t = torch.tensor((seed ^ (seed >> 32)) & _MASK32, dtype=torch.int64)
    row_key = _mix32((row_ids.to(torch.int64) & _MASK32) ^ _mix32(seed_t)).unsqueeze(1)
    cols = (col_ids.to(torch.int64) & _MASK32).unsqueeze(0)
    h = _mix32(_mix32(cols ^ row_key) ^ (row_key >> 7))
    u = (h.to(dtype) + 0.5) / 4294967296.0
    return -torch.log(-torch.log(u))


def sample_tokens(student_logits, teacher_logits=None, beta=0.0, *, seed: int, row_ids=None,
                  group=None, vocab=None, temperature=1.0) -> SampledTokens:
    """Draw one token per row from mu_beta (or pi_S when teacher_logits is None).

    seed: int; row_ids: [N] int64 stable ids of the rows (e.g. sequence index in the global
    batch; default arange(N)) so that the same (seed, row) draws the same noise on any rank or
    layout. temperature > 0 samples softmax(log mu / temperature); temperature == 0 is greedy.
    Returns global token ids and log-probs under the sampling distribution (log mu(token) at
    temperature 1 and when greedy).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    pair = (student_logits,) if teacher_logits is None else (student_logits, teacher_logits)
    shard = describe_shard(*pair, group=group, vocab=vocab)
    log_mu = _log_mu(shard, student_logits, teacher_logits, beta, torch.float64)
    rows = shard.rows
    row_ids = torch.arange(rows) if row_ids is None else torch.as_tensor(row_ids)
    if row_ids.shape != (rows,):
        raise ValueError(f"row_ids must have shape [{rows}], got {tuple(row_ids.shape)}")
    scores = log_mu if temperature in (0, 1) else log_mu / temperature
    if temperature > 0:
        cols = shard.global_ids(log_mu.device)
        scores = scores + gumbel_noise(seed, row_ids.to(log_mu.device), cols)
    best_val, best_local = scores.max(dim=1)
    picked_log = log_mu.gather(1, best_local.unsqueeze(1)).squeeze(1)
    local = torch.stack([best_val, (best_local + shard.offset).to(best_val.dtype), picked_log], 1)
    if temperature not in (0, 1):
        local = torch.cat([local, lse_stats(log_mu / temperature)], dim=1)
    gathered = all_gather_rows(local, shard.group)  # [R, N, 3 or 5]
    winner = gathered[..., 0].argmax(0)  # first rank wins ties -> smallest global id
    pick = gathered.gather(0, winner.view(1, rows, 1).expand(1, rows, gathered.shape[-1]))[0]
    token_ids = pick[:, 1].to(torch.int64)
    log_prob = pick[:, 2]
    if temperature not in (0, 1):
        m, z = combine_weighted(gathered[..., 3:]).unbind(1)
        log_prob = log_prob / temperature - (m + torch.log(z))
    return SampledTokens(token_ids=token_ids, log_prob=log_prob)
