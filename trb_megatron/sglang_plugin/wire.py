"""What travels between the rollout client and the composite model (pure: no sglang import).

In, per request, in `sampling_params.custom_params`, written into the model's static per-row
buffers before each forward (CUDA-graph replays read those buffers):
- "trb_eps" (EPS_KEY): the TRB trust-region budget in nats (the engine's default without it);
- "trb_teacher_until" (TEACHER_UNTIL_KEY): the first absolute position the row draws from the
  blend; tokens at earlier positions come from the teacher (a TrOPD teacher prefix; 0 without).
Out, per drawn token, as SGLang customized info: meta_info[meta_key(name)] for each name of
REPORTED (the token's source and the blend's statistics, methods.BLEND_STATS).
"""

import math
from typing import Sequence

import torch

from trb_megatron.methods import BLEND_STATS

REPORTED = ("source", *BLEND_STATS)

EPS_KEY = "trb_eps"
TEACHER_UNTIL_KEY = "trb_teacher_until"


def meta_key(name: str) -> str:
    """The meta_info key of reported statistic `name` ("beta" -> "trb_beta")."""
    return f"trb_{name}"


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


def request_teacher_until(custom_params) -> int:
    """The first position of one request not drawn from the teacher (0: no teacher prefix)."""
    if not custom_params or TEACHER_UNTIL_KEY not in custom_params:
        return 0
    until = custom_params[TEACHER_UNTIL_KEY]
    if isinstance(until, bool) or not isinstance(until, int) or until < 0:
        raise ValueError(f"custom_params[{TEACHER_UNTIL_KEY!r}] must be an int >= 0 (an "
                         f"absolute position), got {until!r}")
    return until


def fill_rows(eps_N: torch.Tensor, until_N: torch.Tensor, custom_params: Sequence | None,
              rows: int, default_eps: float) -> None:
    """Write the budgets and teacher-prefix ends of a batch's `rows` requests (in batch order)
    into eps_N[:rows] and until_N[:rows], and 0 into the rest (padded CUDA-graph rows: pure
    student, no work for the solver)."""
    if rows > eps_N.shape[0]:
        raise ValueError(f"batch of {rows} rows exceeds the per-row buffers ({eps_N.shape[0]})")
    params = list(custom_params) if custom_params is not None else [None] * rows
    if len(params) != rows:
        raise ValueError(f"{len(params)} custom_params entries for a batch of {rows} rows")
    padding = [0] * (eps_N.shape[0] - rows)
    eps = torch.tensor([request_eps(p, default_eps) for p in params] + padding,
                       dtype=eps_N.dtype)
    until = torch.tensor([request_teacher_until(p) for p in params] + padding,
                         dtype=until_N.dtype)
    eps_N.copy_(eps.to(eps_N.device, non_blocking=True))
    until_N.copy_(until.to(until_N.device, non_blocking=True))
