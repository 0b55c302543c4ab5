"""SGLang requests for a RolloutRequest and the RolloutBatch assembled from SGLang's outputs.

Legend: B rows (prompts x samples per prompt, prompt-major as in RolloutRequest), L = longest
prompt + max_new_tokens.

Each row is one SGLang request at the behaviour's temperature, no truncation, its behaviour
parameters in custom_params (sglang_plugin/wire.py: the budget and the end of its teacher
prefix), a per-row seed, and stopping on the canonical EOS only (the composite model merges the
teacher's stop tokens into the student's EOS, so no other stop token can be drawn). An output
dict carries output_ids and meta_info with output_token_logprobs (one (log-prob, token id, text)
entry per drawn token: log mu), the per-token statistics of wire.REPORTED (the composite
model's customized info) and finish_reason. The batch has exactly the megatron backend's layout
and EOS convention.
"""

import torch

from trb_megatron.methods import BLEND_STATS, VocabLayout
from trb_megatron.methods.seeds import row_seed
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.sglang_plugin.wire import EPS_KEY, REPORTED, TEACHER_UNTIL_KEY, meta_key

STAT_KEYS = tuple(meta_key(name) for name in REPORTED)


def sampling_params(request: RolloutRequest, vocab: VocabLayout) -> list[dict]:
    """One SGLang sampling_params dict per row of `request`."""
    behaviour = request.behaviour
    return [{
        "temperature": behaviour.temperature, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
        "max_new_tokens": request.max_new_tokens, "stop_token_ids": [vocab.stop_ids[0]],
        "ignore_eos": False, "skip_special_tokens": False, "no_stop_trim": True,
        "sampling_seed": row_seed(request.seed, row_id),
        "custom_params": {EPS_KEY: behaviour.eps, TEACHER_UNTIL_KEY: until},
    } for row_id, until in zip(request.row_ids_B.tolist(), request.teacher_until_B.tolist())]


def prompt_ids(request: RolloutRequest) -> list[list[int]]:
    """The token ids of every row (prompt-major)."""
    return [request.prompts[i].tolist() for i in request.prompt_index_B.tolist()]


def _row(output: dict, b: int, max_new: int, vocab: VocabLayout, teacher_ran: bool):
    """(tokens [R], log mu [R], {name: [R]} of REPORTED or None, stopped) of a row."""
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
    stats = None
    if teacher_ran:
        stats = {}
        for name in REPORTED:
            values = meta.get(meta_key(name))
            if values is None or len(values) != len(tokens):
                raise ValueError(f"SGLang output {b}: meta_info[{meta_key(name)!r}] must hold "
                                 f"one value per token ({len(tokens)}), got {values!r:.80}")
            stats[name] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    log_mu = torch.tensor([float(e[0]) for e in entries], dtype=torch.float64)
    return torch.tensor(tokens), log_mu, stats, tokens[-1] == vocab.stop_ids[0]


def assemble_batch(request: RolloutRequest, outputs: list[dict], *, vocab: VocabLayout,
                   pad_id: int, device="cpu") -> RolloutBatch:
    """The RolloutBatch of `request` from its SGLang outputs (one per row, in row order).

    Batches of a behaviour that does not run the teacher have no statistics (beta and KLs 0),
    as in the megatron backend. ValueError names the row of any malformed output."""
    if len(outputs) != request.rows:
        raise ValueError(f"{len(outputs)} SGLang outputs for {request.rows} rows")
    teacher_ran = request.behaviour.teacher_runs
    tokens = request.initial_tokens(pad_id)
    shape = tokens.shape
    log_mu = torch.zeros(shape, dtype=torch.float64)
    values = {name: torch.zeros(shape, dtype=torch.float64) for name in REPORTED}
    mask = torch.zeros(shape, dtype=torch.bool)
    lengths = request.prompt_lengths_B
    response = torch.zeros_like(lengths)
    finish = []
    for b, output in enumerate(outputs):
        ids, lp, stats, stopped = _row(output, b, request.max_new_tokens, vocab, teacher_ran)
        p, r = int(lengths[b]), len(ids)
        span = slice(p, p + r)
        tokens[b, span], log_mu[b, span] = ids, lp
        for name, row_values in (stats or {}).items():
            values[name][b, span] = row_values
        mask[b, span] = True
        response[b] = r
        if not stopped and r != request.max_new_tokens:
            raise ValueError(f"SGLang output {b} ended after {r} tokens without EOS "
                             f"(finish_reason {output['meta_info'].get('finish_reason')!r})")
        finish.append("stop" if stopped else "length")
    source = values["source"].round().to(torch.int8)
    return RolloutBatch(
        tokens=tokens.to(device), prompt_lengths=lengths.to(device),
        response_lengths=response.to(device), response_mask=mask.to(device),
        behaviour_logprobs=log_mu.float().to(device), source=source.to(device),
        stats={name: values[name].float().to(device) for name in BLEND_STATS}
        if teacher_ran else {},
        finish_reasons=tuple(finish), prompt_index=request.prompt_index_B.to(device),
        row_ids=request.row_ids_B.to(device), behaviour=request.behaviour)
