"""SGLang requests for a RolloutRequest and the RolloutBatch assembled from SGLang's outputs.

Legend: B rows (prompts x samples per prompt, prompt-major as in RolloutRequest), L = longest
prompt + max_new_tokens.

Each row is one SGLang request with temperature 1 (or the requested one), no truncation, its
budget in custom_params["trb_eps"], a per-row seed, and stopping on the canonical EOS only (the
composite model merges the teacher's stop tokens into the student's EOS, so no other stop token
can be drawn). An output dict carries output_ids and meta_info with output_token_logprobs (one
(log-prob, token id, text) entry per drawn token: log mu under the blend), the per-token
trb_beta, trb_kl and trb_reverse_kl lists (the composite model's customized info) and
finish_reason. The batch has exactly the megatron backend's layout and EOS convention.
"""

import hashlib

import torch

from trb_megatron.sglang_plugin.eps import EPS_KEY
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.trb import VocabLayout

STAT_KEYS = ("trb_beta", "trb_kl", "trb_reverse_kl")


def row_seed(seed: int, row_id: int) -> int:
    """A 63-bit sampling seed of one row (the same row always draws the same noise)."""
    digest = hashlib.blake2b(f"{seed}/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_params(request: RolloutRequest, vocab: VocabLayout) -> list[dict]:
    """One SGLang sampling_params dict per row of `request`."""
    return [{
        "temperature": request.temperature, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "max_new_tokens": request.max_new_tokens, "stop_token_ids": [vocab.stop_ids[0]],
        "ignore_eos": False, "skip_special_tokens": False, "no_stop_trim": True,
        "sampling_seed": row_seed(request.seed, row_id),
        "custom_params": {EPS_KEY: request.eps},
    } for row_id in request.row_ids_B.tolist()]


def prompt_ids(request: RolloutRequest) -> list[list[int]]:
    """The token ids of every row (prompt-major)."""
    return [request.prompts[i].tolist() for i in request.prompt_index_B.tolist()]


def _row(output: dict, b: int, max_new: int, vocab: VocabLayout, teacher_ran: bool):
    """(tokens [R], log mu [R], beta [R], kl [R], reverse_kl [R] or None, stopped) of a row."""
    meta = output.get("meta_info")
    if not isinstance(meta, dict) or "output_token_logprobs" not in meta:
        raise ValueError(f"SGLang output {b} has no meta_info.output_token_logprobs: the "
                         "engine must be called with return_logprob=True")
    entries = meta["output_token_logprobs"]
    tokens = [int(e[1]) for e in entries]
    if not 1 <= len(tokens) <= max_new:
        raise ValueError(f"SGLang output {b} holds {len(tokens)} tokens; expected 1.."
                         f"{max_new} (max_new_tokens)")
    if list(output.get("output_ids", tokens))[: len(tokens)] != tokens:
        raise ValueError(f"SGLang output {b}: output_ids disagree with output_token_logprobs")
    merged_away = set(vocab.stop_ids[1:])
    if merged_away & set(tokens) or vocab.stop_ids[0] in tokens[:-1]:
        raise ValueError(f"SGLang output {b} holds a stop token inside the response or a "
                         f"merged-away stop id {sorted(merged_away)}: the engine is not "
                         "running the TRB composite model (EOS canonicalisation)")
    stats = []
    for key in STAT_KEYS if teacher_ran else ():
        values = meta.get(key)
        if values is None or len(values) != len(tokens):
            raise ValueError(f"SGLang output {b}: meta_info[{key!r}] must hold one value per "
                             f"token ({len(tokens)}), got {values!r:.80}")
        stats.append(torch.tensor([float(v) for v in values], dtype=torch.float64))
    zeros = torch.zeros(len(tokens), dtype=torch.float64)
    beta, kl, reverse = stats if teacher_ran else (zeros, zeros, None)
    log_mu = torch.tensor([float(e[0]) for e in entries], dtype=torch.float64)
    return torch.tensor(tokens), log_mu, beta, kl, reverse, tokens[-1] == vocab.stop_ids[0]


def assemble_batch(request: RolloutRequest, outputs: list[dict], *, vocab: VocabLayout,
                   pad_id: int, device="cpu") -> RolloutBatch:
    """The RolloutBatch of `request` from its SGLang outputs (one per row, in row order).

    eps == 0 batches ran without the teacher: beta and KLs are 0 and reverse_kl is None, as in
    the megatron backend. ValueError names the row of any malformed output."""
    if len(outputs) != request.rows:
        raise ValueError(f"{len(outputs)} SGLang outputs for {request.rows} rows")
    teacher_ran = request.eps > 0
    tokens = request.initial_tokens(pad_id)
    shape = tokens.shape
    log_mu, beta, kl = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
    reverse = torch.zeros(shape, dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    lengths = request.prompt_lengths_B
    response = torch.zeros_like(lengths)
    finish = []
    for b, output in enumerate(outputs):
        ids, lp, be, k, rk, stopped = _row(output, b, request.max_new_tokens, vocab, teacher_ran)
        p, r = int(lengths[b]), len(ids)
        span = slice(p, p + r)
        tokens[b, span], log_mu[b, span], beta[b, span], kl[b, span] = ids, lp, be, k
        if rk is not None:
            reverse[b, span] = rk
        mask[b, span] = True
        response[b] = r
        if not stopped and r != request.max_new_tokens:
            raise ValueError(f"SGLang output {b} ended after {r} tokens without EOS "
                             f"(finish_reason {output['meta_info'].get('finish_reason')!r})")
        finish.append("stop" if stopped else "length")
    return RolloutBatch(
        tokens=tokens.to(device), prompt_lengths=lengths.to(device),
        response_lengths=response.to(device), response_mask=mask.to(device),
        behaviour_logprobs=log_mu.float().to(device), beta=beta.float().to(device),
        kl_to_student=kl.float().to(device), teacher_feasible=(beta == 1.0).to(device),
        reverse_kl=reverse.float().to(device) if teacher_ran else None,
        finish_reasons=tuple(finish), prompt_index=request.prompt_index_B.to(device),
        eps=request.eps)
