"""One model's part in lockstep decoding: this rank's GPTModel stage with a KV cache.

Legend: B rows of the decode batch, S tokens fed in one step (the prefill window, then 1),
H hidden size, V_full the padded vocabulary, V = V_full / TP this rank's vocabulary shard.

KV cache: megatron's StaticInferenceContext, one per model and decode batch. It keeps a single
sequence offset for the whole batch, so every row of a batch must be fed the same positions;
the engine guarantees it by starting all rows at position 0 (no padding, see
MegatronRolloutEngine). Rotary positions come from the cache offset, not from position_ids.

Logits: GPTModel runs its inference path only when it knows it serves inference: before
megatron-core 0.18 in eval mode with an inference context, from 0.18 on only inside megatron's
process-wide InferenceMode, which `inference_mode()` enters (megatron's own engines do the same).
Outside it a prefill returns the logits of EVERY fed token, [B, S, V_full] instead of [B, 1,
V_full]: right values, but a B x S x V tensor per prefill on a GPU. On its inference path
GPTModel asserts runtime_gather_output=True and all-gathers the vocabulary over TP (B x V_full
values per step); `own_vocab_shard` slices this rank's contiguous shard back out, which is what
the vocab-parallel `trb` functions take (tests/distributed/test_rollout_megatron.py pins both the
[B, 1, V_full] prefill and the gather).

Pipeline parallelism: megatron's inference p2p helpers assert CUDA tensors, so stages exchange
the [S, B, H] hidden states with plain torch.distributed send/recv over the pipeline group
(each TP rank talks to the same TP rank of the next stage); only the last stage has logits.
"""

import contextlib

import torch
import torch.distributed as dist


def inference_mode():
    """Context in which GPTModel takes its inference path for a forward with an inference context:
    megatron's InferenceMode.active() (megatron-core >= 0.18); before 0.18 eval mode and the
    context decide, so there is nothing to enter."""
    from megatron.core.inference import utils

    mode = getattr(utils, "InferenceMode", None)
    return contextlib.nullcontext() if mode is None else mode.active()


def own_vocab_shard(logits_BVfull: torch.Tensor, tp_group) -> torch.Tensor:
    """[B, V] this TP rank's contiguous slice of TP-gathered [B, V_full] logits."""
    size, rank = tp_group.size(), tp_group.rank()
    full = logits_BVfull.shape[-1]
    assert full % size == 0, f"gathered vocabulary {full} is not divisible by TP={size}"
    width = full // size
    return logits_BVfull[:, rank * width:(rank + 1) * width]


class CachedStage:
    """A GPTModel stage (in eval mode) decoding a batch of `batch_size` rows of at most
    `max_length` tokens with a KV cache. Every rank of the model replica calls `step` alike."""

    def __init__(self, model, groups, *, batch_size: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.tp, self.pp = groups.tp, groups.pp
        self.first = self.pp.rank() == 0
        self.last = self.pp.rank() == self.pp.size() - 1
        self.context = StaticInferenceContext(batch_size, max_length)
        self.device = next(model.parameters()).device

    def step(self, tokens_BS: torch.Tensor) -> torch.Tensor | None:
        """Feed the next S tokens of every row (continuing the cached prefix) and return the
        [B, V] logits shard predicting the token after them: on the last pipeline stage; None
        on the others."""
        batch, width = tokens_BS.shape
        start = self.context.sequence_len_offset
        positions_BS = torch.arange(start, start + width, device=self.device).expand(batch, width)
        if not self.first:
            self.model.set_input_tensor(self._receive(width, batch))
        with inference_mode():
            out = self.model(tokens_BS, positions_BS, None, inference_context=self.context,
                             runtime_gather_output=True)
        self.context.increment_sequence_len_offset(width)
        self.context.enable_decode_mode()
        if not self.last:
            dist.send(out.contiguous(), group=self.pp, group_dst=self.pp.rank() + 1)
            return None
        return own_vocab_shard(out[:, -1, :], self.tp)

    def _receive(self, width: int, batch: int) -> torch.Tensor:
        """[S, B, H] hidden states from the previous pipeline stage."""
        config = self.model.config
        hidden = torch.empty(width, batch, config.hidden_size, device=self.device,
                             dtype=config.pipeline_dtype or config.params_dtype)
        dist.recv(hidden, group=self.pp, group_src=self.pp.rank() - 1)
        return hidden
