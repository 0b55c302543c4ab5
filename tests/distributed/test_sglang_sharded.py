"""The SGLang backend's collective parts on real gloo groups of 2 processes:
- the graph-safe behaviour (methods.token_behaviour with a fixed iteration count, on a
  Shard.equal_split) on a vocabulary sharded over TP=2 (stop tokens on both shards, padding,
  teacher-prefix rows) equals methods.solve_beta / methods.blended_log_probs on the dense
  logits;
- the weight push source (rollout.weight_sync.hf_tensors) on real Megatron-Core models of a
  tiny Qwen3 (fewer KV heads than heads, untied, qk-norm) converted from Hugging Face gives
  exactly the Hugging Face tensors, under exactly the converter's names, at TP=1 (two replicas)
  and TP=2 (gathered shards), and pushing them routes everything to the student.

Run: .venv/bin/python -m pytest tests/distributed/test_sglang_sharded.py -q
"""

from pathlib import Path

import torch
import torch.distributed as dist

from tests.cases import logit_cases
from tests.distributed.launcher import run_distributed
from tests.hf_models import make_hf_model
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.checkpoint.hf_names import ignorable_hf_name
from trb_megatron.checkpoint.safetensors_io import HFWeights
from trb_megatron.models.arch import ModelArch
from trb_megatron.rollout.weight_sync import buckets, hf_tensors
from trb_megatron.sglang_plugin.weights import route
from trb_megatron.methods import (Shard, VocabLayout, blended_log_probs, solve_beta,
                                  token_behaviour)

WIDTH = 49  # two equal shards of a padded 98-column vocabulary
LAYOUT = VocabLayout(size=93, stop_ids=(90, 2))  # stop tokens on both shards


def _check_solver(rank, world):
    shard = Shard.equal_split(group=dist.group.WORLD, rank=rank, world=world, width=WIDTH,
                              layout=LAYOUT)
    cols = slice(rank * WIDTH, (rank + 1) * WIDTH)
    for name, (s, t) in logit_cases(v=world * WIDTH).items():
        from_teacher = torch.arange(s.shape[0]) % 3 == 0
        for eps in (0.0, 1e-3, 1e-2, 0.1, 1e9):
            ref = solve_beta(s, t, torch.where(from_teacher, 1e12, eps), vocab=LAYOUT)
            got = token_behaviour(s[:, cols], t[:, cols], torch.full((s.shape[0],), eps),
                                  from_teacher, shard=shard, iterations=12)
            torch.testing.assert_close(got.beta, ref.beta, atol=1e-7, rtol=0, msg=name)
            torch.testing.assert_close(got.reverse_kl, ref.reverse_kl, atol=1e-9, rtol=1e-9)
            assert (got.kl_to_student[~from_teacher] <= eps + 1e-6).all()
            assert (got.beta[from_teacher] == 1).all()
        full = [torch.empty_like(got.logits) for _ in range(world)]
        dist.all_gather(full, got.logits)
        got = torch.log_softmax(torch.cat(full, dim=1).double(), dim=1)
        want = blended_log_probs(s, t, ref.beta, vocab=LAYOUT, dtype=torch.float64)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=0)


def _check_weights(root: Path, groups):
    arch = ModelArch.from_hf_dir(root / "hf")
    hf = HFWeights(root / "hf")
    _, model = load_megatron(root / "megatron", groups)
    pushed = []
    for bucket in buckets(hf_tensors(model, arch, groups.tp), max_bytes=16 << 10):
        assert sum(t.numel() * t.element_size() for _, t in bucket) <= 16 << 10 or len(
            bucket) == 1
        pushed += bucket
    names = [n for n, _ in pushed]
    assert len(names) == len(set(names))
    assert set(names) == {n for n in hf.names() if not ignorable_hf_name(n, arch)}
    assert all(route(n) == ("student", n) for n in names)
    for name, tensor in pushed:
        assert torch.equal(tensor, hf.get(name).to(tensor.dtype)), name


def _body(rank, world, root):
    root = Path(root)
    _check_solver(rank, world)
    hf_to_megatron(root / "hf", root / "megatron", progress=False)
    for tp in (1, 2):
        with parallel_layout(tp, 1) as groups:
            _check_weights(root, groups)


def test_graph_safe_behaviour_and_weight_push_on_two_ranks(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen3", layers=2)
    run_distributed(_body, 2, str(tmp_path))
