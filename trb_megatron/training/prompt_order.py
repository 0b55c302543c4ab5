"""Deterministic, resumable prompt order: a fresh seeded permutation of the prompt set every
epoch, consumed as one global stream; each data-parallel rank takes its contiguous slice of
every step's prompts. The whole state is one integer (prompts consumed so far)."""

import torch


class PromptOrder:
    def __init__(self, num_prompts: int, seed: int, position: int = 0):
        if num_prompts < 1:
            raise ValueError("the prompt set is empty")
        self.num_prompts, self.seed, self.position = num_prompts, seed, position
        self._epoch, self._perm = -1, None

    def _index(self, k: int) -> int:
        epoch, offset = divmod(k, self.num_prompts)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_prompts, generator=generator).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def take(self, per_step: int, dp_rank: int, dp_size: int) -> list[int]:
        """Prompt indices of this data-parallel rank for the next step; advances the stream."""
        if per_step % dp_size:
            raise ValueError(f"train.prompts_per_step={per_step} must be divisible by the "
                             f"data-parallel size {dp_size}")
        share = per_step // dp_size
        start = self.position + dp_rank * share
        indices = [self._index(k) for k in range(start, start + share)]
        self.position += per_step
        return indices
