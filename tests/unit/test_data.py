"""Prompt loading through `datasets` from real JSONL/parquet files with a real tokenizer (the
WordLevel one of tests/hf_models: "wN" is token N + 3): raw text and chat template, long prompts
dropped and counted, and the errors for a missing file, split, field or chat template.

Run: .venv/bin/python -m pytest tests/unit/test_data.py -q
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.hf_models import _tokenizer
from trb_megatron.data import DataConfig, load_prompts, tokenizer_path

# system -> w100, user -> w101, generation prompt -> w102 (all real tokens of the vocabulary)
CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 'w100', 'user': 'w101'}[m['role']] }} "
                 "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w102{% endif %}")
ROWS = [{"question": "w1 w2", "answer": "3"},
        {"question": "w4 w5 w6 w7 w8 w9", "answer": 5},  # 6 tokens; an int answer
        {"question": "w10", "answer": "\\frac{1}{2}"}]


def ids(text):
    return [int(w[1:]) + 3 for w in text.split()]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(raw, chat): tokenizer directories without and with a chat template."""
    root = tmp_path_factory.mktemp("tokenizers")
    _tokenizer().save_pretrained(root / "raw")
    chat = _tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(root / "chat")
    return root / "raw", root / "chat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = pa.table({"question": [r["question"] for r in ROWS],
                      "answer": [str(r["answer"]) for r in ROWS]})
    pq.write_table(table, root / "rows.parquet")
    return root


def config(path, **kwargs):
    return DataConfig(**dict(dict(path_or_name=str(path), prompt_field="question",
                                  answer_field="answer", chat_template=False), **kwargs))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet"])
def test_raw_text(files, tokenizers, name):
    prompts = load_prompts(config(files / name), tokenizers[0])
    assert prompts.token_ids == [ids(r["question"]) for r in ROWS]
    assert prompts.texts == [r["question"] for r in ROWS]
    assert prompts.answers == ["3", "5", "\\frac{1}{2}"]
    assert (prompts.rows, prompts.loaded, prompts.dropped_too_long, len(prompts)) == (
        [0, 1, 2], 3, 0, 3)


def test_raw_text_with_system_prompt_and_no_answers(files, tokenizers):
    prompts = load_prompts(config(files / "rows.jsonl", answer_field="", system_prompt="w50"),
                           tokenizers[0])
    assert prompts.answers is None
    assert prompts.texts[0] == "w50\n\nw1 w2" and prompts.token_ids[0] == ids("w50 w1 w2")


def test_chat_template(files, tokenizers):
    prompts = load_prompts(config(files / "rows.jsonl", chat_template=True,
                                  system_prompt="w7 w8"), tokenizers[1])
    assert prompts.texts[0] == "w100 w7 w8 w101 w1 w2 w102"
    assert prompts.token_ids[0] == ids("w100 w7 w8 w101 w1 w2 w102")
    no_system = load_prompts(config(files / "rows.jsonl", chat_template=True), tokenizers[1])
    assert no_system.token_ids[2] == ids("w101 w10 w102")


def test_megatron_checkpoint_dir_uses_its_hf_tokenizer(files, tokenizers, tmp_path):
    (tmp_path / "trb_checkpoint.json").write_text("{}")
    _tokenizer().save_pretrained(tmp_path / "hf")
    assert tokenizer_path(tmp_path) == tmp_path / "hf"
    assert tokenizer_path(tokenizers[0]) == tokenizers[0]
    assert load_prompts(config(files / "rows.jsonl"), tmp_path).token_ids[0] == ids("w1 w2")


def test_long_prompts_are_dropped_and_counted(files, tokenizers):
    prompts = load_prompts(config(files / "rows.jsonl", max_prompt_tokens=5), tokenizers[0])
    assert prompts.rows == [0, 2] and prompts.answers == ["3", "\\frac{1}{2}"]
    assert (prompts.loaded, prompts.dropped_too_long) == (3, 1)
    # the chat template's extra tokens count: w101 w1 w2 w102 is 4 tokens, w101 w10 w102 is 3
    chat = load_prompts(config(files / "rows.jsonl", chat_template=True, max_prompt_tokens=3),
                        tokenizers[1])
    assert chat.rows == [2] and chat.dropped_too_long == 2


def test_limit_reads_the_first_rows(files, tokenizers):
    prompts = load_prompts(config(files / "rows.parquet", limit=2, max_prompt_tokens=5),
                           tokenizers[0])
    assert (prompts.rows, prompts.loaded, prompts.dropped_too_long) == ([0], 2, 1)


@pytest.mark.parametrize("change, message", [
    (dict(prompt_field="problem"), r"data.prompt_field='problem' is not a column .*its "
                                   r"columns: question, answer"),
    (dict(answer_field="solution"), r"data.answer_field='solution' is not a column"),
    (dict(split="test"), r"data.split='test' is not a split .*its splits: train"),
    # a mixed column is datasets' Json feature, which decodes the string "3" of row 0 as 3
    (dict(prompt_field="answer"), r"row 0 .*holds int, not a string"),
])
def test_bad_fields_and_splits_are_named(files, tokenizers, change, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(config(files / "rows.jsonl", **change), tokenizers[0])
    # the evaluation set's errors name its own section
    with pytest.raises(ValueError, match=message.replace("data.", "eval.data.")):
        load_prompts(config(files / "rows.jsonl", **change), tokenizers[0], key="eval.data")


def test_missing_and_unsupported_files(files, tokenizers, tmp_path):
    with pytest.raises(ValueError, match=r"file .*nope.jsonl does not exist; data files in .*: "
                                         r"rows.jsonl, rows.parquet"):
        load_prompts(config(files / "nope.jsonl"), tokenizers[0])
    (tmp_path / "rows.csv").write_text("question,answer\nw1,2\n")
    with pytest.raises(ValueError, match=r"not a supported file; use .jsonl, .json, .parquet"):
        load_prompts(config(tmp_path / "rows.csv"), tokenizers[0])
    with pytest.raises(ValueError, match=r"no tokenizer could be loaded from"):
        load_prompts(config(files / "rows.jsonl"), tmp_path)


def test_chat_template_needs_one(files, tokenizers):
    with pytest.raises(ValueError, match=r"data.chat_template is true but the tokenizer in .*raw "
                                         r"has no chat template; set data.chat_template=false"):
        load_prompts(config(files / "rows.jsonl", chat_template=True), tokenizers[0])


def test_validate_names_every_bad_field():
    bad = DataConfig(path_or_name="", max_prompt_tokens=0, limit=-1, chat_template="yes")
    with pytest.raises(ValueError, match=r"data.path_or_name must be a non-empty string.*"
                                         r"data.chat_template must be true or false.*"
                                         r"data.max_prompt_tokens must be an int >= 1, got 0.*"
                                         r"data.limit must be an int >= 0"):
        bad.validate()
    with pytest.raises(ValueError, match=r"invalid eval.data config: eval.data.path_or_name"):
        bad.validate("eval.data")
    with pytest.raises(TypeError):
        DataConfig("rows.jsonl")  # keyword-only
