"""On a GPU with Transformer Engine: a checkpoint converted on the CPU (local layer spec) loads
into the TE layer spec with the same logits, and the TE model runs in FP8.

Run (on a GPU machine with transformer_engine): python -m pytest tests/gpu/test_models_gpu.py
"""


import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.gpu.marks import GPU, NEEDS_CUDA, NEEDS_TE
from tests.hf_models import make_hf_model

pytestmark = [GPU, NEEDS_CUDA, NEEDS_TE]


def _body(rank, world, root):
    from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
    from trb_megatron.checkpoint.verify import max_logit_difference
    from trb_megatron.models.builder import build_model
    from trb_megatron.models.forward import full_logits
    from trb_megatron.parallel import detect_profile
    from trb_megatron.parallel.profile import FP8Settings

    torch.backends.cuda.matmul.allow_tf32 = False
    hf_to_megatron(f"{root}/hf", f"{root}/megatron", progress=False)
    with parallel_layout(1, 1) as groups:
        assert max_logit_difference(f"{root}/hf", f"{root}/megatron", groups) < 1e-3
        arch, reference = load_megatron(f"{root}/megatron", groups,
                                        params_dtype=torch.bfloat16)
        fp8 = build_model(arch, detect_profile().with_fp8(FP8Settings(enabled=True)), groups,
                          trainable=False, params_dtype=torch.bfloat16)
        fp8.load_state_dict(reference.state_dict())
        tokens = torch.randint(0, arch.vocab_size, (2, 16), device="cuda")
        want = full_logits(reference, tokens, groups, arch.vocab_size)
        got = full_logits(fp8, tokens, groups, arch.vocab_size)
        assert torch.isfinite(got).all()
        assert (got - want).abs().mean() < 0.1 * want.abs().mean()


def test_cpu_checkpoint_loads_into_transformer_engine_and_runs_fp8(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen3")
    run_distributed(_body, 1, str(tmp_path))
