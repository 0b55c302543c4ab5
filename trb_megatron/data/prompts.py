"""Prompt sets through the `datasets` library, tokenized with the student's tokenizer.

    from trb_megatron.data import DataConfig, load_prompts
    cfg = DataConfig(path_or_name="math500.jsonl", split="train", prompt_field="problem",
                     answer_field="answer", system_prompt=PAPER_SYSTEM_PROMPT,
                     max_prompt_tokens=1024).validate()
    prompts = load_prompts(cfg, "checkpoints/student")   # HF dir, or Megatron checkpoint (its hf/)
    prompts.token_ids[0], prompts.answers[0], prompts.loaded, prompts.dropped_too_long

Tests: .venv/bin/python -m pytest tests/unit/test_data.py -q

A local .jsonl/.json/.parquet file is one split named "train" (the `datasets` convention); a local
directory or a dataset name goes to `datasets.load_dataset` as is (a name needs the hub or its
local cache). With `chat_template` the prompt becomes the user message (after the optional system
message) and is rendered by the tokenizer's chat template with the generation prompt; without it
the raw text is tokenized, and the tokenizer decides about special tokens (e.g. a BOS).
"""

import dataclasses
from pathlib import Path

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    path_or_name: str
    """A local .jsonl/.json/.parquet file (one split, "train"), a local dataset directory, or a
    dataset name for `datasets.load_dataset` (hub or local cache)."""
    split: str = "train"
    """Split to read; a local file has only "train"."""
    prompt_field: str = "prompt"
    """Column holding the prompt text (a string)."""
    answer_field: str = ""
    """Column holding the reference answer (stringified); "" = prompts without answers."""
    chat_template: bool = True
    """Render [system, user] with the tokenizer's chat template and its generation prompt;
    False = tokenize the raw prompt text (a base model without a template)."""
    system_prompt: str = ""
    """System message (chat) or text put before the prompt, separated by a blank line (raw);
    "" = none. The paper's: trb_megatron.data.PAPER_SYSTEM_PROMPT."""
    max_prompt_tokens: int = 1024
    """Prompts with more tokens are dropped (and counted in PromptSet.dropped_too_long)."""
    limit: int = 0
    """Read only the first `limit` rows of the split (before dropping); 0 = all."""

    def validate(self, key: str = "data") -> "DataConfig":
        """Raise ValueError naming every bad field (under the config section `key`, e.g.
        "eval.data") and the rule; returns self."""
        checks = [
            (f"{key}.path_or_name",
             isinstance(self.path_or_name, str) and self.path_or_name != "",
             "a non-empty string (a .jsonl/.json/.parquet file or a dataset name)"),
            (f"{key}.split", isinstance(self.split, str) and self.split != "",
             "a non-empty string"),
            (f"{key}.prompt_field",
             isinstance(self.prompt_field, str) and self.prompt_field != "",
             "a non-empty column name"),
            (f"{key}.answer_field", isinstance(self.answer_field, str),
             "a column name, or \"\" for none"),
            (f"{key}.chat_template", isinstance(self.chat_template, bool), "true or false"),
            (f"{key}.system_prompt", isinstance(self.system_prompt, str),
             "a string (\"\" = none)"),
            (f"{key}.max_prompt_tokens", _is_int(self.max_prompt_tokens)
             and self.max_prompt_tokens >= 1, "an int >= 1"),
            (f"{key}.limit", _is_int(self.limit) and self.limit >= 0,
             "an int >= 0 (0 = all rows)"),
        ]
        bad = [f"{name} must be {rule}, got {getattr(self, name.rpartition('.')[2])!r}"
               for name, ok, rule in checks if not ok]
        if bad:
            raise ValueError(f"invalid {key} config: " + "; ".join(bad))
        return self


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def names_local_path(path_or_name: str) -> bool:
    """Whether `path_or_name` can only mean a local file or directory (so its absence is an
    error, not a dataset to look up): a data-file suffix, an absolute path, or one that starts
    with . or ~ (not expanded), none of which a dataset name has."""
    path = Path(path_or_name)
    return (path.suffix.lower() in LOCAL_FORMATS or path.is_absolute()
            or path_or_name.startswith((".", "~")))


@dataclasses.dataclass
class PromptSet:
    """token_ids: one list of token ids per kept prompt; answers: the reference answers (str) in
    the same order, or None without an answer_field; texts: the prompt texts as rendered for the
    model (chat template applied); rows: each kept prompt's row in the split; loaded: rows read;
    dropped_too_long: rows dropped for more than max_prompt_tokens tokens."""

    token_ids: list[list[int]]
    answers: list[str] | None
    texts: list[str]
    rows: list[int]
    loaded: int
    dropped_too_long: int

    def __len__(self) -> int:
        return len(self.token_ids)


def tokenizer_path(model_dir) -> Path:
    """The directory holding a model's tokenizer: MODEL/hf for a Megatron checkpoint
    (tools/convert_hf.py or a training checkpoint), else MODEL itself (a Hugging Face dir)."""
    model_dir = Path(model_dir)
    hf = model_dir / "hf"
    return hf if (model_dir / "trb_checkpoint.json").is_file() and hf.is_dir() else model_dir


def load_tokenizer(model_dir):
    """transformers.AutoTokenizer of a Hugging Face dir or a Megatron checkpoint (its hf/)."""
    from transformers import AutoTokenizer

    path = tokenizer_path(model_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist: pass a Hugging Face model "
                         "directory or a Megatron checkpoint (with hf/)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from {path} ({err}); it needs "
                         "tokenizer.json or tokenizer_config.json with the vocabulary files") \
            from None


def load_prompts(cfg: DataConfig, tokenizer_dir, *, key: str = "data") -> PromptSet:
    """Read cfg's split, render and tokenize every prompt, drop those longer than
    cfg.max_prompt_tokens. tokenizer_dir: a Hugging Face dir or a Megatron checkpoint (its hf/).
    ValueError names a missing file, split or field (as `key`.field, e.g. eval.data.split) and
    lists what exists."""
    cfg.validate(key)
    tokenizer = load_tokenizer(tokenizer_dir)
    if cfg.chat_template and not tokenizer.chat_template:
        raise ValueError(f"{key}.chat_template is true but the tokenizer in "
                         f"{tokenizer_path(tokenizer_dir)} has no chat template; set "
                         f"{key}.chat_template=false to tokenize the raw prompt text (a base "
                         "model), or use a tokenizer that ships one")
    table = _read_split(cfg, key)
    if cfg.limit:
        table = table.select(range(min(cfg.limit, len(table))))
    fields = [cfg.prompt_field] + ([cfg.answer_field] if cfg.answer_field else [])
    for name, field in zip(("prompt_field", "answer_field"), fields):
        if field not in table.column_names:
            raise ValueError(f"{key}.{name}={field!r} is not a column of {cfg.path_or_name} "
                             f"(split {cfg.split!r}); its columns: "
                             f"{', '.join(table.column_names)}")
    prompts = table[cfg.prompt_field]
    for row, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ValueError(f"row {row} of {cfg.path_or_name}: data.prompt_field="
                             f"{cfg.prompt_field!r} holds {type(text).__name__}, not a string; "
                             "point prompt_field at a column of prompt texts")
    answers = None
    if cfg.answer_field:
        answers = table[cfg.answer_field]
        missing = [row for row, a in enumerate(answers) if a is None]
        if missing:
            raise ValueError(f"row {missing[0]} of {cfg.path_or_name} has no answer in "
                             f"{key}.answer_field={cfg.answer_field!r} ({len(missing)} rows); "
                             "clean the data or set answer_field=\"\"")
        answers = [str(a) for a in answers]
    texts, token_ids = _render(cfg, tokenizer, prompts)
    keep = [row for row, ids in enumerate(token_ids) if len(ids) <= cfg.max_prompt_tokens]
    return PromptSet(token_ids=[token_ids[r] for r in keep],
                     answers=None if answers is None else [answers[r] for r in keep],
                     texts=[texts[r] for r in keep], rows=keep, loaded=len(prompts),
                     dropped_too_long=len(prompts) - len(keep))


def _render(cfg: DataConfig, tokenizer, prompts: list[str]):
    """(texts, token id lists) of the prompts, as the model will see them."""
    if not prompts:
        return [], []
    if not cfg.chat_template:
        texts = [f"{cfg.system_prompt}\n\n{p}" if cfg.system_prompt else p for p in prompts]
        return texts, [list(ids) for ids in tokenizer(texts)["input_ids"]]
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    chats = [system + [{"role": "user", "content": p}] for p in prompts]
    texts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
    return list(texts), [list(ids) for ids in encoded["input_ids"]]


def _read_split(cfg: DataConfig, key: str):
    """The datasets.Dataset of cfg.split; ValueError naming a missing file or split."""
    import datasets

    path = Path(cfg.path_or_name)
    if path.suffix.lower() in LOCAL_FORMATS or path.is_file():
        if not path.is_file():
            raise ValueError(f"{key}.path_or_name: file {path} does not exist; "
                             f"{_data_files_near(path)}")
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{key}.path_or_name: {path} is not a supported file; use "
                             f"{', '.join(LOCAL_FORMATS)} (or a dataset directory or name)")
        splits = datasets.load_dataset(builder, data_files=str(path))
    elif path.is_dir():
        splits = datasets.load_dataset(str(path))
    else:
        try:
            return datasets.load_dataset(cfg.path_or_name, split=cfg.split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise ValueError(f"{key}.split={cfg.split!r} is not a split of "
                                 f"{cfg.path_or_name}: {err}") from None
            raise
        except OSError as err:  # not found, or no network (datasets' errors derive from it)
            raise ValueError(f"{key}.path_or_name={cfg.path_or_name!r} is neither a local file "
                             f"or directory nor a dataset that could be loaded ({err}); pass a "
                             ".jsonl/.json/.parquet file or a cached/reachable dataset name") \
                from None
    if cfg.split not in splits:
        raise ValueError(f"{key}.split={cfg.split!r} is not a split of {cfg.path_or_name}; its "
                         f"splits: {', '.join(splits)} (a single local file is split 'train')")
    return splits[cfg.split]


def _data_files_near(path: Path) -> str:
    """What data files the missing file's directory does hold, for the error message."""
    parent = path.parent
    if not parent.is_dir():
        return f"its directory {parent} does not exist either"
    found = sorted(p.name for p in parent.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
    if not found:
        return f"{parent} holds no .jsonl/.json/.parquet files"
    return f"data files in {parent}: {', '.join(found[:20])}{' ...' if len(found) > 20 else ''}"
