"""Weight names of the composite model: teacher tensors carry the "teacher." prefix (loaded once
as SGLang secondary weights), everything else is the student's (and is what the trainer pushes
after each step). The teacher's vocabulary rows are aligned to the student's padded vocabulary.
"""

import torch

TEACHER_PREFIX = "teacher."
VOCAB_ROW_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def route(name: str) -> tuple[str, str]:
    """("teacher" | "student", the name inside that model) of a composite checkpoint name."""
    if name.startswith(TEACHER_PREFIX):
        return "teacher", name[len(TEACHER_PREFIX):]
    return "student", name


def align_vocab_rows(name: str, tensor: torch.Tensor, rows: int, true_size: int) -> torch.Tensor:
    """A teacher tensor with its vocabulary rows (embedding, lm_head) made `rows` long: rows
    past the shared true vocabulary (`true_size`, never sampled: their logits are masked) are
    sliced off or zero-padded; other tensors pass unchanged. The teacher must have a row for
    every real token: ValueError otherwise."""
    if name not in VOCAB_ROW_NAMES or tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] < true_size:
        raise ValueError(f"teacher tensor {name} has {tensor.shape[0]} vocabulary rows, fewer "
                         f"than the {true_size} tokens of the shared vocabulary; student and "
                         "teacher must share one tokenizer")
    if tensor.shape[0] > rows:
        return tensor[:rows]
    out = tensor.new_zeros(rows, *tensor.shape[1:])
    out[: tensor.shape[0]] = tensor
    return out
