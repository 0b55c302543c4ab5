"""What a rollout engine returns to the trainer, and the protocol every backend implements.

Legend: B sampled sequences (prompts x samples per prompt), L = longest prompt + max new tokens.
Sequences are right-padded: row b holds its prompt tokens, then its response tokens (ending with
the student's EOS when it stopped), then `pad_id`.
"""

import dataclasses
from typing import Mapping, Protocol, Sequence

import torch

from trb_megatron.methods import SOURCE_TEACHER, BehaviourStep


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """tokens: [B, L] int64; prompt_lengths, response_lengths: [B] int64;
    response_mask: [B, L] bool, True at response token positions (EOS included);
    behaviour_logprobs: [B, L] float32, log-prob of each response token under the distribution
    it was drawn from (log mu; 0 elsewhere);
    source: [B, L] int8, methods.SOURCE_TEACHER at teacher-prefix response tokens,
    SOURCE_POLICY elsewhere;
    stats: name -> [B, L] float32 per-token statistics of the behaviour (methods.BLEND_STATS:
    beta, KL(mu || pi_S), KL(pi_S || pi_T) at the prefix that produced each response token, 0
    elsewhere), present when the teacher ran in the rollout, empty otherwise;
    finish_reasons: ("stop" | "length") per row; prompt_index: [B] int64 position of each row's
    prompt in the request; row_ids: [B] int64 global row ids (the noise keys); behaviour: the
    BehaviourStep the batch was sampled with."""

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    response_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    source: torch.Tensor
    stats: Mapping[str, torch.Tensor]
    finish_reasons: tuple[str, ...]
    prompt_index: torch.Tensor
    row_ids: torch.Tensor
    behaviour: BehaviourStep

    def stat(self, name: str) -> torch.Tensor:
        """[B, L] float32 statistic `name`, zeros when the rollout did not report it (the
        teacher did not run: beta and the KLs are 0)."""
        if name in self.stats:
            return self.stats[name]
        return torch.zeros(self.tokens.shape, dtype=torch.float32, device=self.tokens.device)

    @property
    def from_teacher(self) -> torch.Tensor:
        """[B, L] bool: teacher-prefix response tokens."""
        return (self.source == SOURCE_TEACHER) & self.response_mask


class RolloutEngine(Protocol):
    """A rollout backend ("megatron": the trainer's own models; "sglang": an SGLang engine)."""

    def generate(self, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                 max_new_tokens: int, behaviour: BehaviourStep, seed: int,
                 prompt_offset: int = 0) -> RolloutBatch:
        """Sample `samples_per_prompt` responses per prompt as `behaviour` says (methods.
        behaviour: a teacher prefix of up to behaviour.prefix_max tokens per row, then the TRB
        blend with budget behaviour.eps, the student alone when eps == 0, at
        behaviour.temperature). Deterministic in `seed` and each row's global id (prompt_offset
        + prompt index, times samples_per_prompt, plus the sample); identical on every rank of
        the model replica."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the trainer's current student weights (a no-op for the
        megatron backend, which decodes the trainer's own model)."""
        ...

    def release_teacher(self) -> None:
        """The behaviour no longer needs the teacher, for good (every schedule is
        non-increasing): the engine may free the teacher and sample from the student alone."""
        ...

    def shutdown(self) -> None:
        """Free what the engine holds outside the trainer's models (SGLang: its processes);
        a no-op for the megatron backend."""
        ...
