"""How the trainer scores rollout tokens: the objective interface and the reverse-KL objective.

Legend: N rows (token positions of one microbatch, flattened), V local vocabulary columns.

An objective turns the student's logits (differentiable), the frozen teacher's logits and a few
per-token inputs into a per-token loss [N] (the trainer takes its token-mean over the global
batch's response tokens) and named per-token quantities [N] that the trainer sums over the
global batch and hands back to `metrics` (fractions, mean rewards, the loss split by part).
Objectives are pure torch, vocab-parallel over `group`, and never gather the vocabulary.
"""

import dataclasses

import torch

from .reverse_kl import ESTIMATORS, per_token_reverse_kl


@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """Per-token inputs of one microbatch, [N] each: tokens (int64 global ids of the scored
    tokens), from_teacher (bool, teacher-prefix tokens: RolloutBatch.source), uniforms (float64
    U(0, 1) draws keyed by (seed, step, row, position) for stochastic objectives, else None)."""

    tokens: torch.Tensor
    from_teacher: torch.Tensor
    uniforms: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveTerms:
    """loss: [N] per-token loss, differentiable w.r.t. the student logits; sums: name -> [N]
    detached per-token quantities (the objective's `sum_names`), summed by the trainer over the
    global batch's response tokens."""

    loss: torch.Tensor
    sums: dict


@dataclasses.dataclass(frozen=True)
class ReverseKL:
    """The per-prefix reverse KL(pi_S || pi_T) of OPD and TRB with one estimator (full | topk |
    sampled; reverse_kl.py). Scores every token alike, whatever drew it."""

    estimator: str = "topk"
    topk: int = 16
    name = "reverse_kl"
    settings = ("estimator", "topk")
    sum_names = ()
    stochastic = False

    @classmethod
    def from_settings(cls, settings) -> "ReverseKL":
        return cls(**{key: settings[key] for key in cls.settings})

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    @property
    def exact(self) -> bool:
        """Whether the loss is the exact reverse KL (the trainer then skips recomputing it)."""
        return self.estimator == "full"

    def terms(self, student_NV, teacher_NV, inputs: TokenInputs, *, group, vocab,
              fused=False) -> ObjectiveTerms:
        loss = per_token_reverse_kl(student_NV, teacher_NV, group=group,
                                    estimator=self.estimator, vocab=vocab, topk=self.topk,
                                    tokens=inputs.tokens, fused=fused)
        return ObjectiveTerms(loss=loss, sums={})

    def metrics(self, totals: dict, tokens: float) -> dict:
        return {}

    def describe(self) -> str:
        k = f" (k={self.topk})" if self.estimator == "topk" else ""
        return f"reverse_kl: per-prefix reverse KL, estimator {self.estimator}{k}"

