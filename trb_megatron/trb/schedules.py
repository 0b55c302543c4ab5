"""Rollout trust-region budgets eps_k per optimiser step k (method.md "Schedule").

trb:       eps0 * (1 - k / K) for k < K, then 0 (pure student rollouts, teacher released)
fixed_eps: eps0 at every step (the fixed-eps blending baseline)
opd:       0 at every step (vanilla on-policy distillation)
"""

import math
from dataclasses import dataclass

METHODS = ("trb", "opd", "fixed_eps")


@dataclass(frozen=True, kw_only=True)
class EpsSchedule:
    """method: one of METHODS. eps0: initial budget in nats (paper default 0.02; ignored by
    opd). anneal_steps: K, optimiser steps of the linear anneal (paper default 50; trb only)."""

    method: str = "trb"
    eps0: float = 0.02
    anneal_steps: int = 50

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"eps schedule method {self.method!r} is not one of {METHODS}")
        if not (math.isfinite(self.eps0) and self.eps0 >= 0):
            raise ValueError(f"eps0 must be a finite budget >= 0 nats, got {self.eps0}")
        if self.method == "trb" and self.anneal_steps < 1:
            raise ValueError(f"anneal_steps (K) must be >= 1 for trb, got {self.anneal_steps}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.method == "opd":
            return 0.0
        if self.method == "fixed_eps":
            return self.eps0
        return self.eps0 * (1.0 - step / self.anneal_steps) if step < self.anneal_steps else 0.0

    def teacher_in_rollouts(self, step: int) -> bool:
        """Whether rollouts at `step` need the teacher (eps > 0)."""
        return self(step) > 0.0
