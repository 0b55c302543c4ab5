"""A student and a teacher must share one tokenizer and vocabulary layout; their stop tokens
may differ (a base student ends with <|endoftext|>, a chat teacher with <|im_end|>)."""

import json
from pathlib import Path

from trb_megatron.models.arch import ModelArch
from trb_megatron.methods import VocabLayout


def _tokenizer_vocab(hf_dir: Path) -> dict:
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: student and teacher need a fast tokenizer "
                         "(tokenizer.json) to be checked for a shared vocabulary")
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def stop_ids(hf_dir) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what generation stops on), else config.json."""
    hf_dir = Path(hf_dir)
    for name in ("generation_config.json", "config.json"):
        path = hf_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    raise ValueError(f"{hf_dir} declares no eos_token_id in generation_config.json or config.json")


def shared_vocab_layout(student_dir, teacher_dir) -> VocabLayout:
    """Check that both models share a tokenizer and vocabulary; return the layout the TRB
    functions need: the true vocab size and the stop ids (student's EOS first, merged)."""
    student_dir, teacher_dir = Path(student_dir), Path(teacher_dir)
    student, teacher = ModelArch.from_hf_dir(student_dir), ModelArch.from_hf_dir(teacher_dir)
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"vocab_size differs: student {student.vocab_size} ({student_dir}) vs "
                         f"teacher {teacher.vocab_size} ({teacher_dir}); distillation needs one "
                         "vocabulary")
    s_vocab, t_vocab = _tokenizer_vocab(student_dir), _tokenizer_vocab(teacher_dir)
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise ValueError(f"student and teacher tokenizers differ ({len(s_vocab)} vs "
                         f"{len(t_vocab)} tokens; e.g. {differing}); distillation needs one "
                         "tokenizer")
    ids = list(stop_ids(student_dir))
    ids += [i for i in stop_ids(teacher_dir) if i not in ids]
    return VocabLayout(size=student.vocab_size, stop_ids=tuple(ids))
