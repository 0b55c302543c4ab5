"""A fixed RolloutBatch (random prompts and responses of unequal lengths) for trainer tests."""

import dataclasses

import torch

from trb_megatron.methods import SOURCE_POLICY, SOURCE_TEACHER, BehaviourStep
from trb_megatron.rollout.types import RolloutBatch


def fixed_batch(vocab_size: int, rows: int = 4, length: int = 10, seed: int = 0,
                teacher_prefix: bool = False) -> RolloutBatch:
    """Student-only rollouts; teacher_prefix: each row's first response token marked as drawn
    from the teacher (a TrOPD batch)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (rows, length), generator=g)
    prompt_lengths = torch.randint(2, 5, (rows,), generator=g)
    response_lengths = torch.randint(1, length - 4, (rows,), generator=g)
    positions = torch.arange(length).expand(rows, length)
    response = (positions >= prompt_lengths[:, None]) & (
        positions < (prompt_lengths + response_lengths)[:, None])
    tokens = torch.where(positions < (prompt_lengths + response_lengths)[:, None], tokens, 1)
    source = torch.full((rows, length), SOURCE_POLICY, dtype=torch.int8)
    if teacher_prefix:
        source[positions == prompt_lengths[:, None]] = SOURCE_TEACHER
    return RolloutBatch(tokens=tokens, prompt_lengths=prompt_lengths,
                        response_lengths=response_lengths, response_mask=response,
                        behaviour_logprobs=torch.zeros(rows, length), source=source, stats={},
                        finish_reasons=("length",) * rows, prompt_index=torch.arange(rows),
                        row_ids=torch.arange(rows) + 100 * seed,
                        behaviour=BehaviourStep(prefix_max=1 if teacher_prefix else 0))


def rows_of(batch: RolloutBatch, index) -> RolloutBatch:
    """The sub-batch of rows `index` (a slice), e.g. one data-parallel rank's share."""
    pick = {name: getattr(batch, name)[index] for name in (
        "tokens", "prompt_lengths", "response_lengths", "response_mask", "behaviour_logprobs",
        "source", "prompt_index", "row_ids")}
    return dataclasses.replace(batch, **pick, finish_reasons=batch.finish_reasons[index],
                               stats={k: v[index] for k, v in batch.stats.items()})
