"""Run SGLang 0.5.23 on a CPU: the only module of trb_megatron that adapts SGLang to a machine
without CUDA (as trb_megatron/parallel/cpu_backend.py does for Megatron-Core). Everything here is
a no-op where CUDA is available; every step is idempotent. One test per adaptation in
tests/unit/test_sglang_cpu_backend.py shows the upstream failure it answers.

Process environment (`prepare_environment`, before sglang is imported by a process that starts
engines; scheduler processes inherit it):
- SGLANG_USE_CPU_ENGINE=1. Without it sglang's is_cpu() is false (checked once, at import) and
  the rotary layer imports vllm.
- The pure-torch `sgl_kernel` stand-in (cpu_kernels/sgl_kernel) on sys.path and PYTHONPATH:
  with the CPU engine on, sglang imports sgl_kernel at module level and no CPU build exists on
  PyPI. The folder is on no path by default, and the stand-in refuses to import where CUDA
  is available, so it never shadows the real sgl-kernel.

Deterministic inference (`install`, in every SGLang process through the plugin's `register`):
per-request `sampling_seed` is honoured only with enable_deterministic_inference, which on CPU
- rejects the torch_native attention backend: it is added to
  DETERMINISTIC_ATTENTION_BACKEND_CHOICES (torch_native attention is deterministic);
- raises "No supported accelerator" when it switches on the batch-invariant kernels
  (ModelRunner.maybe_enable_batch_invariant_mode; those kernels exist for CUDA only): skipped
  on CPU. Equal seeds then give equal tokens for the same batch; a row's float results may still
  differ in the last bits when the rows batched with it change (CPU matmul blocking);
- hashes seeds with torch.ops.sgl_kernel.murmur_hash32_cpu: the stand-in registers a bitwise
  port of the triton kernel.

Tensor parallelism inside SGLang on CPU (`install` and `engine_arguments`): every group
coordinator would create a NCCL communicator (PyNcclCommunicator on a CPU device: ValueError
"Expected a cuda device"): init_model_parallel_group is called with use_pynccl=False, leaving
gloo; and SGLang refuses more CPU ranks than NUMA nodes unless SGLANG_CPU_OMP_THREADS_BIND
splits the cores, which engine_arguments does. TP=2 engines then produce the TP=1 results (to
float rounding) but are slower on a small machine (a gloo all-reduce per layer).

A C++ compiler (`engine_arguments` checks for one): SGLang's seeded sampler is torch.compile'd,
and on a CPU inductor builds C++ for it; without g++ the engine starts and its first batch fails
("InvalidCxxCompiler: No working C++ compiler found"), the scheduler dies and takes the calling
process with it.

Engine arguments (`engine_arguments`): torch_native attention, no CUDA graphs, no memory saver
(torch_memory_saver is CUDA-only: the KV cache and weights stay resident), float32, and a KV pool
capped by max_total_tokens: on CPU SGLang sizes the pool from a fraction of the machine's free
RAM, which moves with other jobs ("Loaded weights leave no GPU memory").
"""

import os
import sys
from pathlib import Path

import torch

STANDIN_ROOT = Path(__file__).resolve().parent / "cpu_kernels"
CPU_ENGINE_VAR = "SGLANG_USE_CPU_ENGINE"
THREADS_BIND_VAR = "SGLANG_CPU_OMP_THREADS_BIND"
DETERMINISTIC_BACKEND = "torch_native"
CPU_MAX_TOTAL_TOKENS = 16384
"""KV pool tokens of a CPU engine when rollout.sglang.max_total_tokens is 0 (both models'
layers share each token's slot)."""


def active() -> bool:
    """True on a machine without CUDA, where SGLang needs this module."""
    return not torch.cuda.is_available()


def prepare_environment() -> None:
    """Set SGLANG_USE_CPU_ENGINE and put the sgl_kernel stand-in on the module path of this
    process and its children. Must run before the first `import sglang` of the process."""
    if not active():
        return
    if sys.modules.get("sglang") is not None and os.environ.get(CPU_ENGINE_VAR) != "1":
        raise RuntimeError(
            "sglang was imported before trb_megatron.sglang_plugin.cpu_backend."
            "prepare_environment(): on a CPU machine its CPU engine is decided at import time; "
            f"import sglang through trb_megatron.sglang_plugin.version.require_sglang, or set "
            f"{CPU_ENGINE_VAR}=1 before importing it")
    os.environ[CPU_ENGINE_VAR] = "1"
    root = str(STANDIN_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def _skip_batch_invariant_mode(self):
    """ModelRunner.maybe_enable_batch_invariant_mode on CPU: nothing to switch on."""


def _without_pynccl(init_group):
    """parallel_state.init_model_parallel_group with NCCL's communicator off (CPU groups)."""
    if getattr(init_group, "trb_cpu", False):
        return init_group

    def init_model_parallel_group(*args, **kwargs):
        kwargs["use_pynccl"] = False
        return init_group(*args, **kwargs)

    init_model_parallel_group.trb_cpu = True
    return init_model_parallel_group


def install() -> None:
    """Make SGLang's deterministic inference run on CPU (see the module docstring); call in
    every SGLang process after sglang is imported (the plugin's register does)."""
    if not active():
        return
    from sglang.srt.arg_groups import choices
    from sglang.srt.distributed import parallel_state
    from sglang.srt.model_executor.model_runner import ModelRunner

    if DETERMINISTIC_BACKEND not in choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES.append(DETERMINISTIC_BACKEND)
    ModelRunner.maybe_enable_batch_invariant_mode = _skip_batch_invariant_mode
    parallel_state.init_model_parallel_group = _without_pynccl(
        parallel_state.init_model_parallel_group)


def _thread_split(tp_size: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for tp_size ranks: this process's cores in contiguous
    groups ("0-0|1-1" on 2 cores at TP=2; ranks share cores when there are fewer)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // tp_size)
    groups = [cores[(r * per_rank) % len(cores):][:per_rank] for r in range(tp_size)]
    return "|".join(f"{g[0]}-{g[-1]}" for g in groups)


def require_cpp_compiler() -> None:
    """Raise, naming the fix, where torch's inductor finds no C++ compiler (its own search:
    torch._inductor.config.cpp.cxx, i.e. $CXX or g++), which SGLang's sampler needs on CPU."""
    from torch._inductor import config, cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as err:
        raise RuntimeError(
            "SGLang on CPU needs a C++ compiler: its seeded sampler is compiled by torch.compile, "
            f"which builds C++ on a CPU, and none of {config.cpp.cxx} works here. Install one "
            "(Debian/Ubuntu: apt-get install g++ python3-dev) or point CXX at it; or use "
            "rollout.backend=megatron") from err


def engine_arguments(*, tp_size: int, max_total_tokens: int) -> dict:
    """sglang.Engine arguments a CPU engine needs (empty where CUDA is available). Also sets
    SGLANG_CPU_OMP_THREADS_BIND for the engine's scheduler processes: without it SGLang allows
    no more CPU ranks than NUMA nodes (AssertionError in numa_utils.init_threads_binding).
    max_total_tokens: KV pool size in tokens; 0 takes CPU_MAX_TOTAL_TOKENS."""
    if not active():
        return {}
    require_cpp_compiler()
    os.environ[THREADS_BIND_VAR] = _thread_split(tp_size)
    return dict(device="cpu", attention_backend=DETERMINISTIC_BACKEND, disable_cuda_graph=True,
                enable_memory_saver=False, dtype="float32",
                max_total_tokens=max_total_tokens or CPU_MAX_TOTAL_TOKENS)
