"""The trust-region budget of each request: `sampling_params.custom_params["trb_eps"]` (nats),
or the engine's default for requests without it, written into the model's static per-row eps
buffer before each forward (CUDA-graph replays read that buffer)."""

import math
from typing import Sequence

import torch

EPS_KEY = "trb_eps"


def request_eps(custom_params, default: float) -> float:
    """The budget of one request: custom_params[EPS_KEY] if given, else `default`."""
    if not custom_params or EPS_KEY not in custom_params:
        return default
    eps = custom_params[EPS_KEY]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps >= 0):
        raise ValueError(f"custom_params[{EPS_KEY!r}] must be a finite number >= 0 (a KL "
                         f"budget in nats), got {eps!r}")
    return float(eps)


def fill_eps_rows(buffer_N: torch.Tensor, custom_params: Sequence | None, rows: int,
                  default: float) -> None:
    """Write the budgets of a batch's `rows` requests (in batch order) into buffer_N[:rows]
    and 0 into the rest (padded CUDA-graph rows: pure student, no work for the solver)."""
    if rows > buffer_N.shape[0]:
        raise ValueError(f"batch of {rows} rows exceeds the eps buffer ({buffer_N.shape[0]})")
    params = list(custom_params) if custom_params is not None else [None] * rows
    if len(params) != rows:
        raise ValueError(f"{len(params)} custom_params entries for a batch of {rows} rows")
    values = torch.tensor([request_eps(p, default) for p in params] + [0.0] * (
        buffer_N.shape[0] - rows), dtype=buffer_N.dtype)
    buffer_N.copy_(values.to(buffer_N.device, non_blocking=True))
