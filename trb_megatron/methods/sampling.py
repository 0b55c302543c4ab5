"""Behaviour log-probabilities and seeded sampling over a sharded vocabulary.

Legend: N rows (token positions), V local vocabulary columns, R ranks of the vocabulary group.

log mu_beta = (1-beta) log pi_S + beta log pi_T - log Z(beta), computed on each rank's shard
(`blend_logits`: the one place this formula lives; the megatron decode loop, the SGLang composite
model and the trainer's mismatch check all call it) with one all-gather of (max, sum) per row.
Sampling is Gumbel-max: token = argmax_v (log mu(v) / temperature + g(seed, row, v)), where the
Gumbel noise g comes from a counter-based hash of (seed, row id, GLOBAL column id) (seeds.py).
Each rank draws noise for its own columns only, and the winner is found with one all-gather of
(value, id, log-prob) triples per row, so the sampled ids are identical on every rank and for any
sharding of the same vocabulary.
"""

from dataclasses import dataclass, replace

import torch

from .seeds import gumbel_noise
from .vocab import (Shard, all_gather_rows, column_values, combine_weighted, describe_shard,
                    logsumexp, lse_stats, merge_stops, prepare_logits)


@dataclass(frozen=True)
class SampledTokens:
    """token_ids [N] int64 global ids (identical on every rank); log_prob [N]: log-probability
    of each token under the distribution it was drawn from (log mu at temperature 1)."""

    token_ids: torch.Tensor
    log_prob: torch.Tensor


def blend_logits(s_NV, t_NV, beta_N, shard: Shard) -> torch.Tensor:
    """[N, V] (1 - beta) s + beta t on this shard with excluded columns -inf: log mu_beta up to a
    per-row constant, which is all a softmax sampler (and its log_softmax log-probs) needs.

    s_NV, t_NV: stop-merged logits (`merge_stops`) in the compute dtype; t_NV None: the student
    alone (beta ignored). No host decision: safe inside a captured CUDA graph."""
    mixed = prepare_logits(s_NV, shard, s_NV.dtype)
    if t_NV is not None:
        t_NV = prepare_logits(t_NV, shard, s_NV.dtype)
        # (1-beta) s + beta t, keeping -inf (not NaN) on excluded columns.
        mixed = torch.lerp(mixed, t_NV, beta_N.to(s_NV.dtype).unsqueeze(1))
        excluded = shard.excluded(mixed.device)
        if excluded is not None:
            mixed = mixed.masked_fill(excluded, float("-inf"))
    return mixed


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
    """Validated, normalised `blend_logits` of raw (unmerged) logits."""
    beta_N = torch.as_tensor(beta, dtype=dtype, device=student_logits.device).expand(shard.rows)
    if bool(((beta_N < 0) | (beta_N > 1) | torch.isnan(beta_N)).any()):
        raise ValueError("beta must lie in [0, 1]")
    if teacher_logits is None and bool((beta_N != 0).any()):
        raise ValueError("teacher_logits is None but beta > 0 for some rows")
    merged = [None if x is None else merge_stops(x.to(dtype), shard)
              for x in (student_logits, teacher_logits)]
    return normalise(blend_logits(*merged, beta_N, shard), shard)


def normalise(logits_NV, shard: Shard) -> torch.Tensor:
    """[N, V] log-probabilities of logits over the whole (sharded) vocabulary; ValueError when a
    row has no finite mass (non-finite logits in real columns)."""
    lse = logsumexp(logits_NV, shard)
    if not bool(torch.isfinite(lse).all()):
        raise ValueError("logits must be finite in every real (non-padded) vocabulary column")
    return logits_NV - lse.unsqueeze(1)


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
    return sample_log_probs(log_mu, shard, seed=seed, row_ids=row_ids, temperature=temperature)


def sample_log_probs(log_mu_NV, shard: Shard, *, seed: int, row_ids=None,
                     temperature=1.0) -> SampledTokens:
    """Draw one token per row from normalised log-probabilities log_mu_NV (this rank's shard):
    the Gumbel-max draw behind `sample_tokens`, for callers that built log mu themselves."""
    rows = log_mu_NV.shape[0]
    row_ids = torch.arange(rows) if row_ids is None else torch.as_tensor(row_ids)
    if row_ids.shape != (rows,):
        raise ValueError(f"row_ids must have shape [{rows}], got {tuple(row_ids.shape)}")
    scores = log_mu_NV if temperature in (0, 1) else log_mu_NV / temperature
    if temperature > 0:
        cols = shard.global_ids(log_mu_NV.device)
        scores = scores + gumbel_noise(seed, row_ids.to(log_mu_NV.device), cols)
    best_val, best_local = scores.max(dim=1)
    picked_log = log_mu_NV.gather(1, best_local.unsqueeze(1)).squeeze(1)
    local = torch.stack([best_val, (best_local + shard.offset).to(best_val.dtype), picked_log], 1)
    if temperature not in (0, 1):
        local = torch.cat([local, lse_stats(log_mu_NV / temperature)], dim=1)
    gathered = all_gather_rows(local, shard.group)  # [R, N, 3 or 5]
    winner = gathered[..., 0].argmax(0)  # first rank wins ties -> smallest global id
    pick = gathered.gather(0, winner.view(1, rows, 1).expand(1, rows, gathered.shape[-1]))[0]
    token_ids = pick[:, 1].to(torch.int64)
    log_prob = pick[:, 2]
    if temperature not in (0, 1):
        m, z = combine_weighted(gathered[..., 3:]).unbind(1)
        log_prob = log_prob / temperature - (m + torch.log(z))
    return SampledTokens(token_ids=token_ids, log_prob=log_prob)
