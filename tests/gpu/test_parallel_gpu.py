"""On a CUDA machine the CPU backend stays off and the profile picks NCCL, bf16 and TE when present.

Run (on a GPU machine): .venv/bin/python -m pytest tests/gpu/test_parallel_gpu.py -q
"""

import importlib.util

import pytest
import torch

from tests.gpu.marks import GPU, NEEDS_CUDA
from trb_megatron.parallel import detect_profile, install_cpu_backend

pytestmark = [GPU, NEEDS_CUDA]


def test_cpu_backend_is_a_no_op_with_cuda():
    current_device = torch.cuda.current_device
    assert install_cpu_backend() is False
    assert torch.cuda.current_device is current_device
    assert not torch.overrides._get_current_function_mode_stack()


def test_gpu_profile():
    profile = detect_profile()
    assert (profile.device.type, profile.distributed_backend) == ("cuda", "nccl")
    assert profile.params_dtype == torch.bfloat16
    has_te = importlib.util.find_spec("transformer_engine") is not None
    assert profile.transformer_engine == has_te
    spec = profile.gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules.q_layernorm is not None
