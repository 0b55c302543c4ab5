"""Scalar schedules over optimiser steps k: the values a method's behaviour or objective takes
at each step. Every schedule is non-increasing in k, so a quantity that reaches 0 stays 0 (the
trainer relies on it: once a behaviour no longer needs the teacher, it never will again).

Constant(value):           value at every step
LinearAnneal(start, K):    start * (1 - k / K) for k < K, then 0   (TRB's eps schedule)
CosineAnneal(start, K):    start * (1 + cos(pi k / K)) / 2 for k < K, then 0   (TrOPD's prefix)
"""

import dataclasses
import math


def _check(start, steps):
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"a schedule's start value must be finite and >= 0, got {start}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a schedule's anneal steps must be an int >= 1, got {steps!r}")


def _step(k):
    if k < 0:
        raise ValueError(f"step must be >= 0, got {k}")
    return k


@dataclasses.dataclass(frozen=True)
class Constant:
    value: float

    def __post_init__(self):
        _check(self.value, 1)

    def __call__(self, k: int) -> float:
        _step(k)
        return self.value

    def describe(self) -> str:
        return f"fixed at {self.value:g}"


@dataclasses.dataclass(frozen=True)
class _Anneal:
    """start * shape(k / steps) for k < steps, then 0."""

    start: float
    steps: int

    def __post_init__(self):
        _check(self.start, self.steps)

    def __call__(self, k: int) -> float:
        return self.start * self.shape(_step(k) / self.steps) if k < self.steps else 0.0

    def describe(self) -> str:
        return f"{self.start:g} {self.how} to 0 over {self.steps} steps"


class LinearAnneal(_Anneal):
    how = "annealed linearly"

    @staticmethod
    def shape(x: float) -> float:
        return 1.0 - x


class CosineAnneal(_Anneal):
    how = "cosine-annealed"

    @staticmethod
    def shape(x: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * x))
