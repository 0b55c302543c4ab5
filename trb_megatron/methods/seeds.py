"""Every seed and every counter-based random number of the methods, in one place.

Randomness is a pure function of integers (the run's seed, the optimiser step, a row's global
id, a token's absolute position, a vocabulary column), never of a generator's state, so a run
draws the same numbers on any rank, under any parallel layout and batching, and again after a
resume from a checkpoint.

- `derive_seed(*keys)`: a 64-bit seed from a key path (blake2b of "k1/k2/...").
- `rollout_seed(seed, step)`: the sampling seed of one optimiser step's rollouts.
- `position_seed(seed, position)`: the megatron backend's Gumbel seed of the tokens at one
  absolute position; `row_seed(seed, row)`: the SGLang backend's per-request sampling seed.
- `counter_uniform(seed, a, b)`: U(0, 1) per element of broadcast integer tensors a, b (a 32-bit
  counter hash); `gumbel_noise` builds the sampler's noise on it, the TrOPD trust mask its draws.
"""

import hashlib

import torch

_MASK32 = 0xFFFFFFFF


def derive_seed(*keys) -> int:
    """A 64-bit integer determined by the key path `keys` (ints or strings)."""
    digest = hashlib.blake2b("/".join(str(k) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rollout_seed(seed: int, step: int) -> int:
    """Sampling seed of a step's rollouts; rows are told apart by their global position in the
    step's prompts (prompt_offset), so rollouts do not depend on the data-parallel size."""
    return (seed * 1_000_003 + step * 7_919) & 0x7FFFFFFF


def position_seed(seed: int, position: int) -> int:
    """The `sample_tokens` seed of the tokens at absolute sequence position `position`."""
    return derive_seed(seed, position)


def row_seed(seed: int, row_id: int) -> int:
    """A 63-bit sampling seed of one row (the same row always draws the same noise)."""
    return derive_seed(seed, row_id) >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2^32.

    Multipliers stay below 2^31 so no int64 product overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def counter_uniform(seed: int, a: torch.Tensor, b: torch.Tensor, dtype=torch.float64):
    """U(0, 1) (never 0 or 1) per element of broadcast(a, b): a pure function of (seed, a, b)
    for integer tensors a, b (e.g. row ids [N, 1] and columns [1, V])."""
    seed_t = torch.tensor((seed ^ (seed >> 32)) & _MASK32, dtype=torch.int64)
    key = _mix32((a.to(torch.int64) & _MASK32) ^ _mix32(seed_t))
    h = _mix32(_mix32((b.to(torch.int64) & _MASK32) ^ key) ^ (key >> 7))
    return (h.to(dtype) + 0.5) / 4294967296.0


def gumbel_noise(seed: int, row_ids: torch.Tensor, col_ids: torch.Tensor, dtype=torch.float64):
    """[N, V] standard Gumbel noise, a pure function of (seed, row id, global column id)."""
    u = counter_uniform(seed, row_ids.unsqueeze(1), col_ids.unsqueeze(0), dtype)
    return -torch.log(-torch.log(u))
