"""The backend profile's decisions for each kind of machine.

Run: .venv/bin/python -m pytest tests/unit/test_profile.py -q
(initialize_parallel runs on real gloo processes in tests/distributed/test_megatron_cpu.py.)
"""

import dataclasses

import pytest
import torch

from trb_megatron.parallel.profile import BackendProfile, detect_profile, initialize_parallel


def test_cpu_profile():
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    assert profile.device == torch.device("cpu")
    assert profile.distributed_backend == "gloo"
    assert profile.params_dtype == torch.float32
    assert not profile.transformer_engine
    assert not any(profile.fusion_flags().values())


@pytest.mark.parametrize("transformer_engine", [False, True])
def test_gpu_profiles(transformer_engine):
    profile = BackendProfile.for_hardware(cuda=True, transformer_engine=transformer_engine)
    assert profile.device == torch.device("cuda")
    assert profile.distributed_backend == "nccl"
    assert profile.params_dtype == torch.bfloat16
    assert set(profile.fusion_flags().values()) == {transformer_engine}


def test_profile_is_frozen_and_rejects_te_without_cuda():
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.distributed_backend = "nccl"
    with pytest.raises(ValueError, match="needs CUDA"):
        BackendProfile.for_hardware(cuda=False, transformer_engine=True)


def test_fusion_flags_are_transformer_config_fields():
    from megatron.core.transformer import TransformerConfig

    fields = {field.name for field in dataclasses.fields(TransformerConfig)}
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    assert set(profile.fusion_flags()) <= fields


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's profile")
def test_detected_profile_on_this_machine():
    assert detect_profile() == BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    assert detect_profile() is detect_profile()


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_local_layer_spec_passes_qk_layernorm_through(qk_layernorm):
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    spec = profile.gpt_layer_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    assert attention.q_layernorm is attention.k_layernorm
    assert attention.q_layernorm is (WrappedTorchNorm if qk_layernorm else IdentityOp)


def test_initialize_parallel_rejects_bad_sizes():
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    with pytest.raises(ValueError, match="must be >= 1"):
        initialize_parallel(profile, tensor_parallel_size=0, pipeline_parallel_size=1, seed=0)
