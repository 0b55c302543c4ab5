"""The embedded toy default: a CPU-sized distillation task (4-digit addition with a carry
scratchpad), its character-level tokenizer, and the teacher/student Qwen3 models
(build them with `python tools/make_toy_models.py`).

The task functions import nothing heavy; the builder (torch, transformers) loads on first use.
"""

from trb_megatron.toy.task import (extract_answer, is_correct, is_well_formed, make_problem,
                                   make_splits, read_jsonl, write_jsonl)
from trb_megatron.toy.tokenizer import build_tokenizer

_LAZY = {"ToyBuildSpec": "trb_megatron.toy.build", "build_toy_models": "trb_megatron.toy.build",
         "ModelSize": "trb_megatron.toy.train"}

__all__ = ["ModelSize", "ToyBuildSpec", "build_tokenizer", "build_toy_models", "extract_answer",
           "is_correct", "is_well_formed", "make_problem", "make_splits", "read_jsonl",
           "write_jsonl"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
