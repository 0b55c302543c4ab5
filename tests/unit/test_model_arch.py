"""HF config -> ModelArch and the student/teacher vocabulary check (no Megatron)."""

import json

import pytest

from tests.hf_models import VOCAB, make_hf_model
from trb_megatron.models.arch import ModelArch
from trb_megatron.models.pairing import shared_vocab_layout


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for family, tied in (("qwen3", False), ("qwen3", True), ("llama", False), ("qwen2", False)):
        make_hf_model(root / f"{family}-{tied}", family, tied=tied)
    return root


def test_families(hf_dirs):
    qwen3 = ModelArch.from_hf_dir(hf_dirs / "qwen3-False")
    assert (qwen3.head_dim, qwen3.num_heads, qwen3.num_kv_heads) == (16, 4, 2)
    assert qwen3.qk_norm and not qwen3.qkv_bias and not qwen3.tie_word_embeddings
    assert qwen3.rope_theta == 1e6 and qwen3.rope_scaling_factor is None
    assert (qwen3.vocab_size, qwen3.padded_vocab_size) == (VOCAB, 128)
    assert ModelArch.from_hf_dir(hf_dirs / "qwen3-True").tie_word_embeddings
    llama = ModelArch.from_hf_dir(hf_dirs / "llama-False")
    assert llama.rope_scaling_factor == 8.0 and llama.head_dim == 8 and not llama.qk_norm
    qwen2 = ModelArch.from_hf_dir(hf_dirs / "qwen2-False")
    assert qwen2.qkv_bias and not qwen2.qk_norm


def test_transformers_4_style_config():
    cfg = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 8,
           "num_key_value_heads": 4, "head_dim": 32, "num_hidden_layers": 2,
           "intermediate_size": 96, "vocab_size": 151936, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 40960,
           "tie_word_embeddings": True, "hidden_act": "silu", "eos_token_id": 151645}
    arch = ModelArch.from_hf_config(cfg)
    assert arch.rope_theta == 1e6 and arch.padded_vocab_size == 151936
    assert arch.eos_token_ids == (151645,)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "unsupported architecture model_type='mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "low_freq_factor=2.0 is not supported"),
])
def test_unsupported_options_are_named(hf_dirs, change, message):
    family = "qwen3" if change.get("model_type") == "mistral" else "llama"
    cfg = json.loads((hf_dirs / f"{family}-False" / "config.json").read_text())
    cfg.update(change)
    if "rope_scaling" in change:
        cfg.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=message):
        ModelArch.from_hf_config(cfg)


def test_parallel_layout_is_checked_with_numbers(hf_dirs):
    arch = ModelArch.from_hf_dir(hf_dirs / "qwen3-False")
    arch.check_parallel(2, 2)
    with pytest.raises(ValueError, match="TP=4 does not divide num_key_value_heads=2"):
        arch.check_parallel(4, 1)
    with pytest.raises(ValueError, match="PP=3 does not divide num_hidden_layers=2"):
        arch.check_parallel(1, 3)


def test_shared_vocabulary_and_stop_ids(hf_dirs, tmp_path):
    student, teacher = hf_dirs / "qwen3-False", hf_dirs / "llama-False"
    gen = json.loads((teacher / "generation_config.json").read_text())
    layout = shared_vocab_layout(student, teacher)
    assert layout.size == VOCAB and layout.stop_ids[0] == 1
    other = tmp_path / "other"
    make_hf_model(other, "qwen3")
    (other / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [7, 1]}))
    assert shared_vocab_layout(student, other).stop_ids == (1, 7)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["w5"], tok["model"]["vocab"]["w6"] = 9, 8
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizers differ"):
        shared_vocab_layout(student, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": VOCAB + 8}))
    with pytest.raises(ValueError, match="vocab_size differs"):
        shared_vocab_layout(student, other)
