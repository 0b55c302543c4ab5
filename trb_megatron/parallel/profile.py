"""Backend profile: every CPU-vs-GPU decision of trb_megatron, made once, from the environment.

The rest of the product asks the profile instead of branching on the device: which
torch.distributed backend, which Megatron layer spec, which parameter dtype, which fused kernels
TransformerConfig may use. `initialize_parallel` is the one place that reads megatron's
parallel_state; everything downstream receives the process groups it returns.
"""

import dataclasses
import functools
import importlib.util

import torch
import torch.distributed as dist

from trb_megatron.parallel.cpu_backend import install_cpu_backend

# TransformerConfig fields that select fused kernels; those kernels come from Transformer Engine
# (or Apex), so they are all on with TE and all off without it (always off on CPU).
_FUSION_FLAGS = (
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "persist_layer_norm",
)


@dataclasses.dataclass(frozen=True)
class BackendProfile:
    """What the hardware and installed packages allow; see `detect_profile`."""

    device: torch.device
    """Where models and batches live: cpu, or the current cuda device."""
    distributed_backend: str
    """torch.distributed backend: 'gloo' on CPU, 'nccl' on GPUs."""
    transformer_engine: bool
    """Use Transformer Engine layers and fused kernels (GPU with transformer_engine installed)."""
    params_dtype: torch.dtype
    """Default parameter dtype: fp32 on CPU (bf16 matmuls are slow there), bf16 on GPUs."""

    @classmethod
    def for_hardware(cls, *, cuda: bool, transformer_engine: bool) -> "BackendProfile":
        """The profile for a machine with or without CUDA and Transformer Engine."""
        if transformer_engine and not cuda:
            raise ValueError("Transformer Engine needs CUDA; pass transformer_engine=False on CPU")
        return cls(
            device=torch.device("cuda" if cuda else "cpu"),
            distributed_backend="nccl" if cuda else "gloo",
            transformer_engine=transformer_engine,
            params_dtype=torch.bfloat16 if cuda else torch.float32,
        )

    def fusion_flags(self) -> dict[str, bool]:
        """TransformerConfig keyword arguments for the fused kernels."""
        return {flag: self.transformer_engine for flag in _FUSION_FLAGS}

    def gpt_layer_spec(self, *, qk_layernorm: bool, normalization: str):
        """Megatron's GPT layer ModuleSpec: Transformer Engine layers or local (torch) layers.

        qk_layernorm must match TransformerConfig.qk_layernorm: megatron all-reduces the q/k norm
        gradients over TP only when the config says so. The TE spec reads `normalization` from
        the config; the local spec needs it here.
        """
        if self.transformer_engine:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)


@functools.cache
def detect_profile() -> BackendProfile:
    """The profile of this process: CUDA available or not, transformer_engine importable or not."""
    cuda = torch.cuda.is_available()
    transformer_engine = cuda and importlib.util.find_spec("transformer_engine") is not None
    return BackendProfile.for_hardware(cuda=cuda, transformer_engine=transformer_engine)


def initialize_parallel(
    profile: BackendProfile,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    seed: int,
):
    """Set up torch.distributed, megatron's parallel state and RNG seeds; return the groups.

    Joins the default process group if the caller (torchrun env://, a test launcher) has not, and
    checks its backend against the profile. Seeds as Megatron-LM does: CPU/default generator with
    seed + 100 * pipeline rank (stages hold different layers), and the tracker's TP-rank states
    via model_parallel_cuda_manual_seed. Returns megatron's ProcessGroupCollection (tp, pp, dp,
    ...), which the rest of the product takes as an argument instead of reading parallel_state.
    """
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError(
            f"parallel sizes must be >= 1, got TP={tensor_parallel_size} "
            f"PP={pipeline_parallel_size}"
        )
    install_cpu_backend()
    if not dist.is_initialized():
        dist.init_process_group(backend=profile.distributed_backend)
    if dist.get_backend() != profile.distributed_backend:
        raise RuntimeError(
            f"torch.distributed uses {dist.get_backend()!r} but this machine's profile needs "
            f"{profile.distributed_backend!r}; initialise it with that backend or let "
            f"initialize_parallel do it"
        )
    world_size = dist.get_world_size()
    if world_size % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(
            f"world size {world_size} is not divisible by TP={tensor_parallel_size} x "
            f"PP={pipeline_parallel_size}"
        )
    if profile.device.type == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron's parallel state is already initialised; call "
            "megatron.core.parallel_state.destroy_model_parallel() before re-initialising"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
    )
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()
