"""The backend profile's decisions for each kind of machine, FP8 included (the GPU profile's
TransformerConfig is built and checked here, on the CPU).

Run: .venv/bin/python -m pytest tests/unit/test_profile.py -q
(initialize_parallel runs on real gloo processes in tests/distributed/test_megatron_cpu.py.)
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from trb_megatron.parallel.profile import (BackendProfile, FP8Settings, detect_profile,
                                           initialize_parallel)

pytestmark = pytest.mark.megatron


def test_cpu_profile():
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    assert profile.device == torch.device("cpu")
    assert profile.distributed_backend == "gloo"
    assert profile.params_dtype == torch.float32
    assert not profile.transformer_engine
    assert not any(profile.fusion_flags().values())
    assert not profile.compile_trb


@pytest.mark.parametrize("transformer_engine", [False, True])
def test_gpu_profiles(transformer_engine):
    profile = BackendProfile.for_hardware(cuda=True, transformer_engine=transformer_engine)
    assert profile.device == torch.device("cuda")
    assert profile.distributed_backend == "nccl"
    assert profile.params_dtype == torch.bfloat16
    assert set(profile.fusion_flags().values()) == {transformer_engine}
    assert profile.compile_trb


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


FP8_ON = FP8Settings(enabled=True, format="hybrid", recipe="tensorwise", margin=1,
                     amax_history_len=16, amax_compute_algo="most_recent",
                     bf16_layers_at_start=2, bf16_layers_at_end=1)


def test_gpu_profile_transformer_config_carries_the_fp8_section():
    """The config's fp8 section -> the GPU profile -> the student's TransformerConfig fields.
    The config object is built by megatron-core itself (its __post_init__ checks the FP8
    combination); only the fused-kernel flags are left out, they need TE's kernels installed."""
    from megatron.core.transformer import TransformerConfig

    from trb_megatron.config import load_config
    from trb_megatron.models.arch import ModelArch
    from trb_megatron.models.builder import transformer_config_kwargs

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "examples" / "configs" / "qwen3_1p7b_from_8b.yaml", [
        "fp8.enabled=true", "fp8.recipe=tensorwise", "fp8.margin=1", "fp8.amax_history_len=16",
        "fp8.amax_compute_algo=most_recent", "fp8.bf16_layers_at_start=2",
        "fp8.bf16_layers_at_end=1"])
    assert config.fp8 == FP8_ON
    gpu = BackendProfile.for_hardware(cuda=True, transformer_engine=True).with_fp8(config.fp8)
    arch = ModelArch.of_model_dir(Path(config.model.student), root / "examples/configs/archs")
    kwargs = transformer_config_kwargs(arch, gpu, tp=2, pp=2)
    assert set(kwargs) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert all(kwargs[flag] for flag in gpu.fusion_flags())
    built = TransformerConfig(**{k: v for k, v in kwargs.items() if k not in gpu.fusion_flags()})
    assert (built.fp8, built.fp8_recipe, built.fp8_margin) == ("hybrid", "tensorwise", 1)
    assert (built.fp8_amax_history_len, built.fp8_amax_compute_algo) == (16, "most_recent")
    assert built.first_last_layers_bf16
    assert (built.num_layers_at_start_in_bf16, built.num_layers_at_end_in_bf16) == (2, 1)
    assert built.params_dtype == torch.bfloat16 and built.bf16
    # FP8 off: no fp8 field is set, Megatron's defaults stay
    plain = transformer_config_kwargs(arch, BackendProfile.for_hardware(
        cuda=True, transformer_engine=True), tp=2, pp=2)
    assert not any(key.startswith("fp8") or "bf16" in key for key in plain if key != "bf16")
    # megatron-core itself rejects what the config's validate() rejects up front
    delayed = dataclasses.replace(FP8_ON, recipe="delayed")
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer"):
        TransformerConfig(**{k: v for k, v in transformer_config_kwargs(
            arch, gpu.with_fp8(delayed), tp=2, pp=2).items() if k not in gpu.fusion_flags()})
    with pytest.raises(ValueError, match="fp8.recipe must be tensorwise, blockwise or mxfp8"):
        load_config(root / "examples" / "configs" / "qwen3_1p7b_from_8b.yaml",
                    ["fp8.enabled=true", "fp8.bf16_layers_at_end=1"])


@pytest.mark.parametrize("cuda", [False, True])
def test_fp8_without_transformer_engine_names_the_key(cuda):
    profile = BackendProfile.for_hardware(cuda=cuda, transformer_engine=False)
    with pytest.raises(ValueError, match=r"fp8.enabled=true needs a GPU with Transformer Engine"):
        profile.with_fp8(FP8_ON)
    assert profile.with_fp8(FP8Settings()).fp8 == FP8Settings()  # off is fine anywhere
    assert profile.fp8.transformer_config_kwargs() == {}
