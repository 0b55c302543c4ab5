"""A fixed RolloutBatch (random prompts and responses of unequal lengths) for trainer tests."""

import torch

from trb_megatron.rollout.types import RolloutBatch


def fixed_batch(vocab_size: int, rows: int = 4, length: int = 10, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (rows, length), generator=g)
    prompt_lengths = torch.randint(2, 5, (rows,), generator=g)
    response_lengths = torch.randint(1, length - 4, (rows,), generator=g)
    positions = torch.arange(length).expand(rows, length)
    response = (positions >= prompt_lengths[:, None]) & (
        positions < (prompt_lengths + response_lengths)[:, None])
    tokens = torch.where(positions < (prompt_lengths + response_lengths)[:, None], tokens, 1)
    zeros = torch.zeros(rows, length)
    return RolloutBatch(tokens=tokens, prompt_lengths=prompt_lengths,
                        response_lengths=response_lengths, response_mask=response,
                        behaviour_logprobs=zeros, beta=zeros, kl_to_student=zeros,
                        teacher_feasible=response & False, reverse_kl=None,
                        finish_reasons=("length",) * rows, prompt_index=torch.arange(rows),
                        eps=0.0)


def rows_of(batch: RolloutBatch, index) -> RolloutBatch:
    """The sub-batch of rows `index` (a slice), e.g. one data-parallel rank's share."""
    pick = {name: getattr(batch, name)[index] for name in (
        "tokens", "prompt_lengths", "response_lengths", "response_mask", "behaviour_logprobs",
        "beta", "kl_to_student", "teacher_feasible", "prompt_index")}
    return RolloutBatch(**pick, reverse_kl=None, finish_reasons=batch.finish_reasons[index],
                        eps=batch.eps)
