"""Check a converted Megatron checkpoint against its Hugging Face source: same random batch,
max absolute logit difference (float32 on both sides, the Megatron side at any TP/PP)."""

import torch
import torch.distributed as dist

from trb_megatron.checkpoint.convert import load_megatron
from trb_megatron.models.forward import full_logits


def max_logit_difference(hf_dir, megatron_dir, groups, *, batch=2, seq=16, seed=0) -> float:
    """Collective over the model's ranks; every rank returns the same number."""
    from transformers import AutoModelForCausalLM

    arch, model = load_megatron(megatron_dir, groups, params_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq), generator=generator)
    logits = full_logits(model, tokens.to(next(model.parameters()).device), groups,
                         arch.vocab_size).cpu()
    diff = torch.zeros(1)
    if not dist.is_initialized() or dist.get_rank() == 0:
        reference = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            expected = reference(tokens).logits
        diff[0] = (logits - expected).abs().max()
    if dist.is_initialized():
        dist.broadcast(diff, src=0)
    return float(diff[0])
