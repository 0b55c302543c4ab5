"""What the composite model needs to know, passed to SGLang as json_model_override_args on the
student's config: the architecture switch to TRBForCausalLM, the KV pool sized for both models'
layers, and a "trb" section (teacher path, layer split, vocabulary layout, solver settings).

Sharing one KV pool puts the teacher's attention layers after the student's (layer ids offset
by the student's layer count), so both models must have the same KV head count and head dim.
"""

import dataclasses

ARCHITECTURE = "TRBForCausalLM"


@dataclasses.dataclass(frozen=True)
class TRBSettings:
    """student_architecture: the student's own HF architecture name; student_layers: its layer
    count; teacher_path: HF directory ("" for a student-only engine); vocab_size, stop_ids: the
    shared VocabLayout (student's EOS first); iterations: fixed solver iterations; max_rows:
    rows of the static per-row buffers (>= the engine's max running requests); default_eps:
    budget of requests without custom_params["trb_eps"] (wire.py)."""

    student_architecture: str
    student_layers: int
    teacher_path: str
    vocab_size: int
    stop_ids: tuple[int, ...]
    iterations: int
    max_rows: int
    default_eps: float = 0.0


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def composite_overrides(student_cfg: dict, teacher_cfg: dict | None, settings: TRBSettings
                        ) -> dict:
    """json_model_override_args for the student's config.json (teacher_cfg None: the student
    alone in the composite class, which keeps the trainer's EOS merge and padding mask).
    ValueError when the models cannot share one KV pool."""
    section = {"trb": {**dataclasses.asdict(settings), "stop_ids": list(settings.stop_ids)}}
    if teacher_cfg is None:
        return {"architectures": [ARCHITECTURE], **section}
    for key, value in (("num_key_value_heads", lambda c: c.get("num_key_value_heads",
                                                                 c["num_attention_heads"])),
                       ("head_dim", _head_dim)):
        if value(student_cfg) != value(teacher_cfg):
            raise ValueError(
                f"student and teacher differ in {key} ({value(student_cfg)} vs "
                f"{value(teacher_cfg)}): the SGLang composite model keeps both models' KV "
                "cache in one pool, which needs equal KV heads and head dim; use "
                "rollout.backend=megatron for this pair")
    layers = student_cfg["num_hidden_layers"] + teacher_cfg["num_hidden_layers"]
    return {"architectures": [ARCHITECTURE], "num_hidden_layers": layers, **section}


def read_settings(hf_config) -> TRBSettings:
    """The TRBSettings stored in an (overridden) HF config object's "trb" attribute."""
    raw = dict(getattr(hf_config, "trb", None) or {})
    if not raw:
        raise ValueError(f"{ARCHITECTURE} needs the 'trb' section of json_model_override_args "
                         "(trb_megatron.rollout.sglang_engine builds it)")
    raw["stop_ids"] = tuple(raw["stop_ids"])
    return TRBSettings(**raw)
