"""The student's weights as Hugging Face tensors, for pushing into a rollout engine after each
optimiser step: full (tensor-parallel gathered) tensors under the exact names of the checkpoint
converter's map (checkpoint.hf_names), grouped in buckets of bounded byte size.

Tensor-parallel layouts (Megatron-Core): the vocabulary tables and linear_qkv (whole query
groups) are split by rows, linear_proj and linear_fc2 by columns, and linear_fc1 holds this
rank's [gate_r; up_r] (so the full [gate; up] interleaves the ranks' halves); norms are
replicated. Pipeline stages each hold a contiguous block of layers (global layer number from
TransformerLayer.layer_number); a stage yields only the tensors it holds.
"""

from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from trb_megatron.checkpoint.hf_names import param_specs, resolve_name
from trb_megatron.models.arch import ModelArch

_ROW_SPLIT = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
              "linear_qkv.bias")
_COLUMN_SPLIT = ("linear_proj.weight", "linear_fc2.weight")


def _gather(x: torch.Tensor, tp_group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(tp_group.size())]
    dist.all_gather(parts, x.contiguous(), group=tp_group)
    return parts


def full_tensor(name: str, local: torch.Tensor, tp_group) -> torch.Tensor:
    """The TP=1 tensor of Megatron parameter `name` from this rank's shard `local`."""
    if tp_group is None or tp_group.size() == 1:
        return local
    if name.endswith(_ROW_SPLIT):
        return torch.cat(_gather(local, tp_group), dim=0)
    if name.endswith(_COLUMN_SPLIT):
        return torch.cat(_gather(local, tp_group), dim=1)
    if name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in _gather(local, tp_group)]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return local  # norms: replicated on every TP rank


def _local_names(model) -> dict[str, str]:
    """Global local-spec parameter name -> this stage's parameter name."""
    decoder_layers = model.decoder.layers
    renamed = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
               for i, layer in enumerate(decoder_layers)}
    out = {}
    for name, _ in model.named_parameters():
        global_name = name
        for local_prefix, global_prefix in renamed.items():
            if name.startswith(local_prefix):
                global_name = global_prefix + name[len(local_prefix):]
                break
        out[global_name] = name
    return out


def hf_tensors(model, arch: ModelArch, tp_group) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every weight of `arch` held by this pipeline stage
    of `model` (an unwrapped GPTModel stage), in the converter's order. Collective over
    `tp_group`: every TP rank of the stage iterates alike and receives the full tensors."""
    params = dict(model.named_parameters())
    local = _local_names(model)
    for spec in param_specs(arch):
        try:
            name = local[resolve_name(spec.megatron, local)]
        except KeyError:
            continue  # held by another pipeline stage
        full = full_tensor(spec.megatron, params[name].detach(), tp_group)
        yield from zip(spec.hf, spec.to_hf(full))


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int
            ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of (name, tensor) of at most `max_bytes` each (a tensor larger than
    that travels alone), so an update never holds more than one bucket of extra memory."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
