"""Rollout engines: the RolloutBatch they return, the RolloutEngine protocol, and the "megatron"
backend (the trainer's own student and teacher decoding in lockstep with KV caches)."""

from .megatron_engine import MegatronRolloutEngine
from .types import RolloutBatch, RolloutEngine

__all__ = ["MegatronRolloutEngine", "RolloutBatch", "RolloutEngine"]
