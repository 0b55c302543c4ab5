"""What a rollout engine returns to the trainer, and the protocol every backend implements.

Legend: B sampled sequences (prompts x samples per prompt), L = longest prompt + max new tokens.
Sequences are right-padded: row b holds its prompt tokens, then its response tokens (ending with
the student's EOS when it stopped), then `pad_id`.
"""

import dataclasses
from typing import Protocol, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """tokens: [B, L] int64; prompt_lengths, response_lengths: [B] int64;
    response_mask: [B, L] bool, True at response token positions (EOS included);
    behaviour_logprobs: [B, L] float32, log mu(y_t) of each response token (0 elsewhere);
    beta, kl_to_student: [B, L] float32, the blend weight and the realised KL(mu || pi_S) at the
    prefix that produced each response token (0 when eps was 0);
    teacher_feasible: [B, L] bool, beta = 1 at that prefix;
    reverse_kl: [B, L] float32 or None, KL(pi_S || pi_T) at each response prefix when the teacher
    ran during decoding (it comes free with the solve);
    finish_reasons: ("stop" | "length") per row; prompt_index: [B] int64 position of each row's
    prompt in the request; eps: the budget the batch was sampled with."""

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    response_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    beta: torch.Tensor
    kl_to_student: torch.Tensor
    teacher_feasible: torch.Tensor
    reverse_kl: torch.Tensor | None
    finish_reasons: tuple[str, ...]
    prompt_index: torch.Tensor
    eps: float


class RolloutEngine(Protocol):
    """A rollout backend ("megatron": the trainer's own models; "sglang": an SGLang engine)."""

    def generate(self, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                 max_new_tokens: int, eps: float, seed: int, prompt_offset: int = 0,
                 temperature: float = 1.0) -> RolloutBatch:
        """Sample `samples_per_prompt` responses per prompt from the TRB blend with budget
        `eps` (pure student when eps == 0) at `temperature` (1: the blend itself, 0: greedy).
        Deterministic in `seed` and each row's global id (prompt_offset + prompt index, times
        samples_per_prompt, plus the sample); identical on every rank of the model replica."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the trainer's current student weights (a no-op for the
        megatron backend, which decodes the trainer's own model)."""
        ...

    def release_teacher(self) -> None:
        """eps has reached 0 for good (every eps schedule is non-increasing): the engine may
        free the teacher and sample from the student alone from now on."""
        ...

    def shutdown(self) -> None:
        """Free what the engine holds outside the trainer's models (SGLang: its processes);
        a no-op for the megatron backend."""
        ...
