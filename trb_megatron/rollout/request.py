"""A validated rollout request: one row per sample, its prompt, its stable id and its noise seed.

Legend: B rows (prompts x samples per prompt), P_b the prompt length of row b.

Sampling noise is a pure function of (seed, row id, position): row b of prompt i (its s-th
sample) has the id (prompt_offset + i) * samples_per_prompt + s, and the token at absolute
position p of every row is drawn with `seeds.position_seed(seed, p)`. Because every row starts
at position 0 (prompts are not padded), a row's tokens do not depend on the other rows of the
batch, on how rows are split into decode batches, or on the tensor-parallel size. Data-parallel
ranks pass the same `seed` and their first prompt's global index as `prompt_offset`, so no two
rows of a step share noise. A row's teacher prefix (behaviour.prefix_lengths) is keyed the same
way: row b draws its tokens at positions [P_b, teacher_until_b) from the teacher.
"""

import dataclasses
import hashlib
from typing import Sequence

import torch
import torch.distributed as dist

from trb_megatron.methods import BehaviourStep


@dataclasses.dataclass(frozen=True)
class RolloutRequest:
    """prompts: one [P_i] int64 tensor per prompt; prompt_index_B, row_ids_B, prompt_lengths_B:
    [B] int64 (rows ordered prompt-major: all samples of prompt 0, then prompt 1, ...);
    teacher_until_B: [B] int64, the first absolute position of each row not drawn from the
    teacher (P_b + its teacher-prefix length)."""

    prompts: tuple[torch.Tensor, ...]
    samples_per_prompt: int
    max_new_tokens: int
    behaviour: BehaviourStep
    seed: int
    prompt_offset: int
    prompt_index_B: torch.Tensor
    row_ids_B: torch.Tensor
    prompt_lengths_B: torch.Tensor
    teacher_until_B: torch.Tensor

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
              max_new_tokens: int, behaviour: BehaviourStep, seed: int, prompt_offset: int,
              vocab_size: int, max_positions: int) -> "RolloutRequest":
        """Validate a generate() call (ValueError naming the problem) and lay out its rows."""
        _check_int("samples_per_prompt", samples_per_prompt, minimum=1)
        _check_int("max_new_tokens", max_new_tokens, minimum=1)
        _check_int("seed", seed)
        _check_int("prompt_offset", prompt_offset, minimum=0)
        if not isinstance(behaviour, BehaviourStep):
            raise ValueError(f"behaviour must be a methods.BehaviourStep, got {behaviour!r}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt (a sequence of token ids)")
        tensors = tuple(_prompt_tensor(i, p, vocab_size) for i, p in enumerate(prompts))
        for i, p in enumerate(tensors):
            if len(p) + max_new_tokens > max_positions:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} its "
                    f"sequence needs {len(p) + max_new_tokens} positions, more than the models' "
                    f"max_position_embeddings={max_positions}: shorten or drop the prompt, or "
                    "lower max_new_tokens")
        lengths = torch.tensor([len(p) for p in tensors], dtype=torch.int64)
        prompt_index = torch.arange(len(tensors)).repeat_interleave(samples_per_prompt)
        samples = torch.arange(samples_per_prompt).repeat(len(tensors))
        row_ids = (prompt_offset + prompt_index) * samples_per_prompt + samples
        return cls(
            prompts=tensors, samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens, behaviour=behaviour, seed=seed,
            prompt_offset=prompt_offset, prompt_index_B=prompt_index, row_ids_B=row_ids,
            prompt_lengths_B=lengths[prompt_index],
            teacher_until_B=lengths[prompt_index] + behaviour.prefix_lengths(seed, row_ids))

    @property
    def rows(self) -> int:
        return self.row_ids_B.numel()

    @property
    def width(self) -> int:
        """L: longest prompt + max_new_tokens, the width of every [B, L] result tensor."""
        return int(self.prompt_lengths_B.max()) + self.max_new_tokens

    def initial_tokens(self, pad_id: int) -> torch.Tensor:
        """[B, L] int64: each row's prompt, then pad_id."""
        tokens = torch.full((self.rows, self.width), pad_id, dtype=torch.int64)
        for b, i in enumerate(self.prompt_index_B.tolist()):
            tokens[b, :len(self.prompts[i])] = self.prompts[i]
        return tokens

    def decode_batches(self, max_batch_size: int | None) -> list[torch.Tensor]:
        """Row indices of each decode batch: rows sorted by prompt length (stable), then cut into
        batches of at most max_batch_size (None: one batch), so a batch's prompts are close in
        length (fewer prompt tokens fed one step at a time, see MegatronRolloutEngine)."""
        order = torch.sort(self.prompt_lengths_B, stable=True).indices
        return list(order.split(max_batch_size or self.rows))

    def check_same_on(self, group, device) -> None:
        """Raise ValueError on every rank unless all ranks of `group` passed this same request.

        The ranks of a model replica (tensor- and pipeline-parallel peers) decode one batch
        together; a rank with other prompts would silently corrupt the others' tokens or hang.
        """
        if group is None or group.size() == 1:
            return
        described = repr(([p.tolist() for p in self.prompts], self.samples_per_prompt,
                          self.max_new_tokens, self.behaviour, self.seed, self.prompt_offset))
        digest = int.from_bytes(hashlib.blake2b(described.encode(), digest_size=7).digest(),
                                "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(group.size())]
        dist.all_gather(every, mine, group=group)
        if any(int(x) != digest for x in every):
            raise ValueError(
                "the ranks of one model replica (tensor- and pipeline-parallel peers) passed "
                "different generate() requests; pass the same prompts, samples_per_prompt, "
                "max_new_tokens, behaviour, seed and prompt_offset on all of them (shard "
                "prompts by data-parallel rank, not by global rank)")


def _check_int(name: str, value, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _prompt_tensor(index: int, prompt, vocab_size: int) -> torch.Tensor:
    """[P] int64 token ids of prompt `index`, checked against the vocabulary."""
    tokens = torch.as_tensor(prompt)
    if tokens.dim() != 1 or (tokens.numel() and tokens.is_floating_point()):
        raise ValueError(f"prompt {index} must be a 1-D sequence of integer token ids, got "
                         f"shape {tuple(tokens.shape)} and dtype {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"prompt {index} is empty; every prompt needs at least one token "
                         "(e.g. a BOS token)")
    tokens = tokens.to(torch.int64)
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.numel():
        raise ValueError(f"prompt {index} holds token id {int(bad[0])}, outside the vocabulary "
                         f"[0, {vocab_size})")
    return tokens
