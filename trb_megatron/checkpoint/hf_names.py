"""Hugging Face <-> Megatron-Core weight names and layouts (pure functions, TP=1 tensors).

Each `ParamSpec` maps one Megatron parameter (local layer-spec name, global layer index) to the
Hugging Face tensors it is made of, with the two reshape functions between them:
- linear_qkv: per query group g, rows [q heads of g; k_g; v_g] (TP then splits whole groups);
- linear_fc1: [gate; up] (Megatron's SwiGLU checkpoint factory reshards it for any TP);
- word embeddings and output layer: vocabulary rows zero-padded to the padded vocabulary.
Transformer Engine specs fuse the norms into the following linear layers; `TE_ALIASES` names them.
"""

import dataclasses
from typing import Callable

import torch

from trb_megatron.models.arch import ModelArch

# local-spec parameter name suffix -> Transformer Engine spec name suffix
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_megatron: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _same(x):
    return x


def _one(x):
    return (x,)


def _qkv_merge(arch: ModelArch):
    groups, per_group = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads
    hd = arch.head_dim

    def merge(q, k, v):
        rest = q.shape[1:]
        q = q.reshape(groups, per_group * hd, *rest)
        k = k.reshape(groups, hd, *rest)
        v = v.reshape(groups, hd, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def split(qkv):
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, (per_group + 2) * hd, *rest).split(
            [per_group * hd, hd, hd], dim=1)
        return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))

    return merge, split


def _vocab_rows(arch: ModelArch):
    def pad(x):
        if x.shape[0] != arch.vocab_size:
            raise ValueError(f"vocabulary tensor has {x.shape[0]} rows, config vocab_size is "
                             f"{arch.vocab_size}")
        out = x.new_zeros(arch.padded_vocab_size, *x.shape[1:])
        out[: arch.vocab_size] = x
        return out

    def unpad(x):
        return (x[: arch.vocab_size].contiguous(),)

    return pad, unpad


def _gate_up(ffn):
    def merge(gate, up):
        return torch.cat([gate, up], dim=0)

    def split(fc1):
        gate, up = fc1.split([ffn, ffn], dim=0)
        return gate.contiguous(), up.contiguous()

    return merge, split


def param_specs(arch: ModelArch) -> list[ParamSpec]:
    """Every Megatron parameter of `arch` at TP=1/PP=1 and its Hugging Face source tensors."""
    pad, unpad = _vocab_rows(arch)
    qkv_merge, qkv_split = _qkv_merge(arch)
    fc1_merge, fc1_split = _gate_up(arch.ffn_hidden_size)
    h_, f_, v_ = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
    q_, kv_ = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    specs = [ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                       ((v_, h_),), pad, unpad)]
    for i in range(arch.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = f"{h}self_attn."
        specs += [
            ParamSpec(m + "input_layernorm.weight", (h + "input_layernorm.weight",), ((h_,),),
                      _same, _one),
            ParamSpec(m + "self_attention.linear_qkv.weight",
                      tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                      ((q_, h_), (kv_, h_), (kv_, h_)), qkv_merge, qkv_split),
            ParamSpec(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",),
                      ((h_, q_),), _same, _one),
            ParamSpec(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",),
                      ((h_,),), _same, _one),
            ParamSpec(m + "mlp.linear_fc1.weight",
                      (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                      ((f_, h_), (f_, h_)), fc1_merge, fc1_split),
            ParamSpec(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), ((h_, f_),),
                      _same, _one),
        ]
        if arch.qkv_bias:
            specs.append(ParamSpec(m + "self_attention.linear_qkv.bias",
                                   tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                                   ((q_,), (kv_,), (kv_,)), qkv_merge, qkv_split))
        if arch.qk_norm:
            hd = (arch.head_dim,)
            specs += [ParamSpec(m + "self_attention.q_layernorm.weight",
                                (attn + "q_norm.weight",), (hd,), _same, _one),
                      ParamSpec(m + "self_attention.k_layernorm.weight",
                                (attn + "k_norm.weight",), (hd,), _same, _one)]
    specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",), ((h_,),),
                           _same, _one))
    if not arch.tie_word_embeddings:
        specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), ((v_, h_),), pad,
                               unpad))
    return specs


def resolve_name(name: str, model_names) -> str:
    """The model's own name for a local-spec parameter name (Transformer Engine aliases)."""
    if name in model_names:
        return name
    for local, te in TE_ALIASES.items():
        if name.endswith(local) and name[: -len(local)] + te in model_names:
            return name[: -len(local)] + te
    raise KeyError(f"the Megatron model has no parameter {name!r}")


def ignorable_hf_name(name: str, arch: ModelArch) -> bool:
    """HF tensors that carry no weights Megatron needs (recomputed buffers, a tied lm_head)."""
    return name.endswith("rotary_emb.inv_freq") or (
        arch.tie_word_embeddings and name == "lm_head.weight")
