"""Backend profile: every CPU-vs-GPU decision of trb_megatron, made once, from the environment.

The rest of the product asks the profile instead of branching on the device: which
torch.distributed backend, which Megatron layer spec, which parameter dtype, which fused kernels
TransformerConfig may use, and whether the transformer layers run in FP8 (`with_fp8`, from the
`fp8` config section). `initialize_parallel` is the one place that reads megatron's
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

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Settings:
    """Transformer Engine FP8 for the GEMMs of the transformer layers (the `fp8` config section).
    Parameters, gradients and optimizer state keep their dtype; embeddings, output layer and the
    losses stay in bf16/fp32. Mapped onto Megatron-Core's TransformerConfig fp8 fields."""

    enabled: bool = False
    """Run the student's transformer layers in FP8 (a GPU with Transformer Engine only)."""
    format: str = "hybrid"
    """hybrid (E4M3 forward, E5M2 gradients) or e4m3 (E4M3 everywhere)."""
    recipe: str = "delayed"
    """Scaling: delayed (amax history), tensorwise (current scaling), blockwise (Hopper) or
    mxfp8 (Blackwell)."""
    margin: int = 0
    """Scaling-factor margin: scale = fp8_max / amax / 2^margin."""
    amax_history_len: int = 1024
    """Steps of amax history kept per tensor (delayed scaling)."""
    amax_compute_algo: str = "max"
    """Amax from the history: max or most_recent (delayed scaling)."""
    bf16_layers_at_start: int = 0
    """Keep this many first transformer layers in bf16 (at most the layers of one pipeline
    stage; not with recipe delayed)."""
    bf16_layers_at_end: int = 0
    """Keep this many last transformer layers in bf16 (not with recipe delayed)."""
    teacher: bool = False
    """Also run the frozen teacher in FP8 (faster scoring and rollouts; its logits then carry
    FP8 rounding)."""

    def transformer_config_kwargs(self) -> dict:
        """TransformerConfig keyword arguments (empty when disabled)."""
        if not self.enabled:
            return {}
        kwargs = dict(fp8=self.format, fp8_recipe=self.recipe, fp8_margin=self.margin,
                      fp8_amax_history_len=self.amax_history_len,
                      fp8_amax_compute_algo=self.amax_compute_algo)
        if self.bf16_layers_at_start or self.bf16_layers_at_end:
            kwargs.update(first_last_layers_bf16=True,
                          num_layers_at_start_in_bf16=self.bf16_layers_at_start,
                          num_layers_at_end_in_bf16=self.bf16_layers_at_end)
        return kwargs


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
    compile_trb: bool = False
    """torch.compile the TRB vocabulary passes (the rollout's beta solve, the `full` loss): on
    GPUs, where the compiled solve is what meets benchmarks/bench_trb.py's cost target; eager
    on CPU, where the tests compare both paths and small toy vocabularies gain nothing."""
    fp8: FP8Settings = FP8Settings()
    """Transformer Engine FP8 settings of the models built with this profile (off by default)."""

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
            compile_trb=cuda,
        )

    def with_fp8(self, settings: FP8Settings) -> "BackendProfile":
        """This profile with FP8 settings; FP8 needs Transformer Engine on a GPU."""
        if settings.enabled and not self.transformer_engine:
            have = ("CUDA without transformer_engine" if self.device.type == "cuda"
                    else "no CUDA device")
            raise ValueError(f"fp8.enabled=true needs a GPU with Transformer Engine, this machine "
                             f"has {have}; install it (pip install 'trb-megatron[te]', or use "
                             "the Dockerfile's image) or set fp8.enabled=false")
        return dataclasses.replace(self, fp8=settings)

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
