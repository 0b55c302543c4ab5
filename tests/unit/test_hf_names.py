"""HF <-> Megatron layouts (pure reshapes) and safetensors reading: layouts against hand-built
expectations, and bad checkpoints failing by name before any output exists."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_models import make_hf_model
from trb_megatron.checkpoint.convert import hf_to_megatron, inspect_hf
from trb_megatron.checkpoint.hf_names import param_specs
from trb_megatron.models.arch import ModelArch

pytestmark = pytest.mark.megatron


def _spec(arch, suffix):
    return next(s for s in param_specs(arch) if s.megatron.endswith(suffix))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    make_hf_model(path, "qwen3")
    return path


def test_qkv_rows_are_grouped_per_query_group(qwen3):
    arch = ModelArch.from_hf_dir(qwen3)  # 4 heads, 2 groups, head_dim 16
    hd = arch.head_dim
    q = torch.arange(4 * hd).float().unsqueeze(1)
    k = 1000 + torch.arange(2 * hd).float().unsqueeze(1)
    v = 2000 + torch.arange(2 * hd).float().unsqueeze(1)
    spec = _spec(arch, "layers.0.self_attention.linear_qkv.weight")
    qkv = spec.to_megatron(q, k, v)[:, 0]
    expected = torch.cat([q[: 2 * hd, 0], k[:hd, 0], v[:hd, 0],
                          q[2 * hd:, 0], k[hd:, 0], v[hd:, 0]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(spec.to_hf(qkv.unsqueeze(1)), (q, k, v)))


def test_fc1_is_gate_then_up_and_vocab_is_padded(qwen3):
    arch = ModelArch.from_hf_dir(qwen3)
    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    fc1 = _spec(arch, "layers.1.mlp.linear_fc1.weight")
    assert torch.equal(fc1.to_megatron(gate, up), torch.cat([gate, up]))
    emb = _spec(arch, "word_embeddings.weight")
    table = torch.randn(arch.vocab_size, 32)
    padded = emb.to_megatron(table)
    assert padded.shape == (128, 32) and torch.all(padded[arch.vocab_size:] == 0)
    assert torch.equal(emb.to_hf(padded)[0], table)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _bad(path, out, match):
    with pytest.raises(ValueError, match=match):
        inspect_hf(path)
    with pytest.raises(ValueError, match=match):
        hf_to_megatron(path, out)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_truncated_file(qwen3, tmp_path):
    bad = _copy(qwen3, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _bad(bad, tmp_path / "out", "cannot read .*model.safetensors.*truncated or corrupt")


def test_missing_and_misshapen_tensors(qwen3, tmp_path):
    tensors = load_file(qwen3 / "model.safetensors")
    missing = _copy(qwen3, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k},
              missing / "model.safetensors")
    _bad(missing, tmp_path / "out", "missing from .*model.layers.1.mlp.down_proj.weight")
    shaped = _copy(qwen3, tmp_path / "shaped")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 60)
    save_file(tensors, shaped / "model.safetensors")
    _bad(shaped, tmp_path / "out", "'model.layers.0.self_attn.o_proj.weight' .* has shape "
         r"\(32, 60\), its config.json implies \(32, 64\)")


def test_unsupported_architecture_and_no_weights(qwen3, tmp_path):
    other = _copy(qwen3, tmp_path / "gemma")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    _bad(other, tmp_path / "out", "unsupported architecture model_type='gemma'")
    empty = _copy(qwen3, tmp_path / "bin")
    (empty / "model.safetensors").unlink()
    _bad(empty, tmp_path / "out", "neither model.safetensors nor")
