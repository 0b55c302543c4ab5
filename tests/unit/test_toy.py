"""The toy default: task format and answer checking, splits, tokenizer, and a miniature build
(loadable HF checkpoints, cache reuse, determinism). Accuracy is a measured fact recorded in the
manifest, not asserted here."""

import json
import random

import pytest
import torch

from trb_megatron.toy.build import OUTPUTS
from trb_megatron.toy.task import (extract_answer, is_correct, is_well_formed, make_problem,
                                   make_splits, read_jsonl, write_jsonl)


def test_problem_format():
    p = make_problem(3472, 2859)
    assert p == {"prompt": "3472+2859=",
                 "response": "2+9+0=11,7+5+1=13,4+8+1=13,3+2+1=06#06331", "answer": "6331"}
    assert make_problem(9999, 9999)["response"].endswith("9+9+1=19#19998")
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        p = make_problem(a, b)
        assert (len(p["prompt"]), len(p["response"])) == (10, 41)
        assert p["answer"] == str(a + b) and is_correct(p["response"], a + b)
        assert is_well_formed(p["response"])
    with pytest.raises(ValueError, match="4 digits"):
        make_problem(999, 1000)


@pytest.mark.parametrize("response, answer", [
    ("2+9+0=11,7+5+1=13,4+8+1=13,3+2+1=06#06331", "6331"),
    ("#06331", "6331"),                           # the answer alone counts
    ("garbage#6331<eos>", "6331"),                # decoded with special tokens
    ("x#06331<eos><pad><pad>", "6331"),
    ("#00000", "0"),
    ("1+1+0=02 #  0002 ", "2"),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer
    assert is_correct(response, answer) and is_correct(response, int(answer))


@pytest.mark.parametrize("response", [
    "", "2+9+0=11,7+5+1=13", "#", "#<eos>", "#06a31", "#0633#1", "#06331#", "#-6331",
    "#6 331", "#٦٣٣١", "6331", "<eos>",
])
def test_garbled_responses_have_no_answer(response):
    assert extract_answer(response) is None
    assert not is_correct(response, "6331")


def test_wrong_answers_and_format():
    good = make_problem(3472, 2859)["response"]
    assert not is_correct(good.replace("#06331", "#06332"), "6331")
    assert not is_correct(good, "6332")
    assert is_well_formed(good + "<eos>")
    assert not is_well_formed(good[:-1]) and not is_well_formed(good.replace(",", ";", 1))
    assert is_correct("#6331", "6331") and not is_well_formed("#6331")


def test_splits_are_disjoint_and_deterministic(tmp_path):
    train, test, val = make_splits(3, n_train=2000, n_test=512, n_val=64)
    assert (len(train), len(test), len(val)) == (2000, 512, 64)
    keys = [{p["prompt"] for p in split} for split in (train, test, val)]
    assert sum(map(len, keys)) == len(set().union(*keys))  # unique within and across splits
    assert make_splits(3, n_train=2000, n_test=512, n_val=64) == (train, test, val)
    assert make_splits(4, n_train=2000, n_test=512, n_val=64)[1] != test
    assert make_splits(3, n_train=10, n_test=512)[1] == test  # held-out set fixed per seed
    write_jsonl(tmp_path / "t.jsonl", test)
    rows = read_jsonl(tmp_path / "t.jsonl")
    assert rows == test and set(rows[0]) == {"prompt", "answer", "response"}


def test_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from trb_megatron.toy.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 18
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    train, test, _ = make_splits(0, n_train=200, n_test=50)
    for p in train + test:
        for text in (p["prompt"], p["response"], p["prompt"] + p["response"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text) and tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        ids = tok(p["prompt"])["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == 11
        assert tok.decode(ids, skip_special_tokens=True) == p["prompt"]
    chars = "0123456789+=,#"
    assert tok.decode(tok(chars, add_special_tokens=False)["input_ids"]) == chars


# ---------------------------------------------------------------------------------------------
# miniature builds

TINY_ARGS = ["--n-train", "256", "--n-test", "32", "--n-val", "16", "--batch-size", "16",
             "--head-dim", "16", "--kv-heads", "1",
             "--teacher-layers", "2", "--teacher-heads", "2", "--teacher-intermediate", "64",
             "--student-layers", "1", "--student-heads", "1", "--student-intermediate", "32",
             "--teacher-steps", "30", "--teacher-eval-every", "10",
             "--student-max-steps", "30", "--student-eval-every", "10",
             # one thread: these models are too small to gain from more, and two threads on a
             # busy 2-core machine run many times slower
             "--threads", "1"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two CLI builds with the same seed, then a third call that must reuse the first."""
    from tools.make_toy_models import main

    root = tmp_path_factory.mktemp("toy")
    first = main(["--out-dir", str(root / "a")] + TINY_ARGS)
    second = main(["--out-dir", str(root / "b")] + TINY_ARGS)
    again = main(["--out-dir", str(root / "a")] + TINY_ARGS)
    return root, first, second, again


def test_build_writes_loadable_checkpoints(builds):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, manifest, _, _ = builds
    out = root / "a"
    assert not manifest["reused"] and not (root / "a.partial").exists()
    assert json.loads((out / "manifest.json").read_text())["build"] == manifest["build"]
    assert all((out / name).exists() for name in OUTPUTS)  # what configs may name before a build
    tok = AutoTokenizer.from_pretrained(out / "teacher")
    configs = {}
    for who in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(out / who)
        c = configs[who] = model.config
        assert c.model_type == "qwen3" and model.dtype == torch.float32
        assert c.vocab_size == len(tok) == manifest["tokenizer"]["vocab_size"]
        gen = json.loads((out / who / "generation_config.json").read_text())
        assert c.eos_token_id == gen["eos_token_id"] == tok.eos_token_id
        assert (out / who / "tokenizer.json").read_bytes() == \
            (out / "teacher" / "tokenizer.json").read_bytes()
        assert (out / who / "model.safetensors").is_file()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok("1234+5678=")["input_ids"]])).logits
        assert logits.shape == (1, 11, len(tok)) and torch.isfinite(logits).all()
    t, s = configs["teacher"], configs["student"]
    assert (t.num_key_value_heads, t.head_dim) == (s.num_key_value_heads, s.head_dim) == (1, 16)
    assert t.num_hidden_layers == 2 and s.num_hidden_layers == 1
    for who in ("teacher", "student"):
        entry = manifest[who]
        assert 0 <= entry["test_greedy_accuracy"] <= 1 and 0 <= entry["test_sampled_accuracy"] <= 1
        assert entry["steps"] <= 30
    curve = manifest["teacher"]["loss_curve"]
    assert curve[-1] < curve[0]  # sanity: the teacher learns something
    rows = read_jsonl(out / "data" / "train.jsonl")
    test = read_jsonl(out / "data" / "test.jsonl")
    assert (len(rows), len(test)) == (256, 32)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in test}
    assert all(is_correct(r["response"], r["answer"]) for r in rows + test)


def test_build_is_deterministic_and_cached(builds, capsys):
    from safetensors.torch import load_file

    from trb_megatron.toy.build import build_toy_models

    root, first, second, again = builds
    for who in ("teacher", "student"):
        a = load_file(root / "a" / who / "model.safetensors")
        b = load_file(root / "b" / who / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (root / "a/data/train.jsonl").read_bytes() == (root / "b/data/train.jsonl").read_bytes()
    assert again["reused"] and again["teacher"] == first["teacher"]
    from tools.make_toy_models import main

    assert main(["--out-dir", str(root / "a")] + TINY_ARGS)["reused"]
    assert "reusing cached toy models" in capsys.readouterr().out
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no toy build"):
        build_toy_models(root / "c", _spec_from_args(TINY_ARGS), log=print)
    assert (root / "c" / "notes.txt").read_text() == "mine"


def test_other_arguments_rebuild_and_force(builds):
    from trb_megatron.toy.build import build_toy_models

    root, first, _, _ = builds
    spec = _spec_from_args(TINY_ARGS + ["--seed", "1", "--teacher-steps", "2",
                                        "--student-max-steps", "2"])
    messages = []
    threads = torch.get_num_threads()
    rebuilt = build_toy_models(root / "b", spec, log=messages.append)
    assert torch.get_num_threads() == threads  # the build's own thread count is restored
    assert not rebuilt["reused"] and rebuilt["build"]["seed"] == 1
    # (cpu_capability differs too where the host has more than AVX2: this build runs in-process,
    # the first one in the pinned child)
    assert "other arguments (" in messages[0] and all(
        key in messages[0] for key in ("seed", "student_max_steps", "teacher_steps"))
    assert build_toy_models(root / "b", spec, log=messages.append)["reused"]
    assert not build_toy_models(root / "b", spec, force=True, log=messages.append)["reused"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("b")) == ["b"]


def test_cli_builds_pin_the_instruction_set(builds):
    """tools/make_toy_models.py (and the job) build in a child process whose kernels run at
    AVX2 on any x86-64 host that has it: what makes a build the same on every such machine."""
    import platform

    from trb_megatron.parallel.cpu_isa import PINNED, pinned_environment

    root, manifest, _, _ = builds
    environment, capability = pinned_environment()
    assert manifest["build"]["cpu_capability"] == capability
    if platform.machine() == "x86_64" and capability == "AVX2":
        assert environment == PINNED
    assert manifest["build"]["threads"] == 1  # TINY_ARGS' --threads, part of the build


def test_manifest_pairs_with_the_vocabulary_check(builds):
    from trb_megatron.models.pairing import shared_vocab_layout

    root, manifest, _, _ = builds
    layout = shared_vocab_layout(root / "a" / "student", root / "a" / "teacher")
    assert layout.size == manifest["tokenizer"]["vocab_size"] == 18
    assert layout.stop_ids == (manifest["tokenizer"]["eos_token_id"],)


def _spec_from_args(argv):
    from tools.make_toy_models import _parser, _spec

    return _spec(_parser().parse_args(["--out-dir", "unused"] + argv))
