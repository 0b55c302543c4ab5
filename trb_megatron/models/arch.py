"""Hugging Face config.json -> the architecture Megatron-Core builds (Qwen3, Qwen2, Llama 3.x).

`ModelArch.from_hf_config` reads both config styles (transformers < 5: rope_theta/rope_scaling at
the top level; transformers >= 5: rope_parameters) and rejects, by name, every option the
Megatron local/Transformer Engine GPT layers would silently compute differently.
"""

import dataclasses
import json
import math
from pathlib import Path

FAMILIES = ("qwen3", "qwen2", "llama")
VOCAB_MULTIPLE = 128  # padding multiple; TP-independent so a checkpoint loads at any TP <= 128

# Megatron's Llama 3 rope scaling hard-codes these (rotary_pos_embedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelArch:
    """Everything about a decoder-only model that decides its weights and its numerics."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @classmethod
    def of_model_dir(cls, path, fallback_dir=None) -> "ModelArch":
        """The architecture of a Megatron checkpoint (PATH/hf/config.json) or a Hugging Face
        directory (PATH/config.json); else, when given, FALLBACK_DIR/<name of PATH>.json (a
        published config, for validating a layout without the weights)."""
        path = Path(path)
        for candidate in (path / "hf" / "config.json", path / "config.json"):
            if candidate.is_file():
                return cls.from_hf_config(json.loads(candidate.read_text()))
        if fallback_dir is not None:
            known = Path(fallback_dir) / f"{path.name.lower()}.json"
            if known.is_file():
                return cls.from_hf_config(json.loads(known.read_text()))
        raise ValueError(f"{path} is neither a Megatron checkpoint nor a Hugging Face model "
                         "directory (no hf/config.json or config.json)")

    @classmethod
    def from_hf_dir(cls, hf_dir) -> "ModelArch":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{path} does not exist: point at a Hugging Face model directory")
        return cls.from_hf_config(json.loads(path.read_text()))

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArch":
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"unsupported architecture model_type={family!r} "
                             f"(architectures={cfg.get('architectures')}); supported: {FAMILIES}")
        _require(cfg, "hidden_act", "silu", family)
        for flag in ("mlp_bias", "use_sliding_window"):
            if cfg.get(flag):
                raise ValueError(f"{family}: {flag}=True is not supported by the Megatron layers")
        if family == "llama" and cfg.get("attention_bias"):
            raise ValueError("llama: attention_bias=True is not supported")
        if family == "qwen3" and cfg.get("attention_bias"):
            raise ValueError("qwen3: attention_bias=True is not supported")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                              else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_hidden_size=cfg["intermediate_size"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=float(theta),
            rope_scaling_factor=_llama3_factor(scaling, family),
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=eos_ids,
        )

    def check_parallel(self, tensor_parallel: int, pipeline_parallel: int) -> None:
        """Reject a TP/PP layout this model cannot be split into, with the numbers."""
        checks = (("TP", tensor_parallel, "num_attention_heads", self.num_heads),
                  ("TP", tensor_parallel, "num_key_value_heads", self.num_kv_heads),
                  ("TP", tensor_parallel, "the padded vocabulary", self.padded_vocab_size),
                  ("PP", pipeline_parallel, "num_hidden_layers", self.num_layers))
        problems = [f"{kind}={size} does not divide {what}={value}"
                    for kind, size, what, value in checks if value % size]
        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))


def _require(cfg, key, value, family):
    if cfg.get(key, value) != value:
        raise ValueError(f"{family}: {key}={cfg.get(key)!r} is not supported (only {value!r})")


def _llama3_factor(scaling, family):
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if family != "llama" or kind != "llama3":
        raise ValueError(f"{family}: rope scaling {kind!r} is not supported (only Llama 3's "
                         "'llama3' scaling)")
    for key, fixed in _LLAMA3_FIXED.items():
        if float(scaling.get(key, fixed)) != fixed:
            raise ValueError(f"llama3 rope scaling with {key}={scaling[key]} is not supported: "
                             f"Megatron-Core fixes it at {fixed}")
    return float(scaling["factor"])
