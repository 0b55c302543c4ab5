"""One test per adaptation of trb_megatron.sglang_plugin.cpu_backend (SGLang 0.5.23 on a CPU):
the upstream failure it answers still happens without it, and is gone with it.

Run: .venv/bin/python -m pytest tests/unit/test_sglang_cpu_backend.py -q
SGLang decides at import time whether it runs on CPU, so the upstream half and the adapted half
each run in a fresh Python process (one import of sglang each, ~15 s); the pure parts (the
sgl_kernel stand-in's functions) run here. When an sglang upgrade changes an upstream
behaviour, the upstream half of its test fails: re-measure, then drop or adapt that step.
"""

import importlib.util
import json
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from tests.distributed.launcher import run_distributed
from trb_megatron.sglang_plugin import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="pins CPU-only upstream failures; the backend is off on GPUs")

# Each probe prints one JSON line {check: outcome}; outcome is "ok" or "<Exception>: message".
PROBE = r'''
import json, os, sys, types
import torch
results = {}

def check(name, fn):
    try:
        value = fn()
        results[name] = "ok" if value is None else value
    except BaseException as err:
        results[name] = f"{type(err).__name__}: {err}"[:300]

if ADAPTED:
    from trb_megatron.sglang_plugin import cpu_backend
    cpu_backend.prepare_environment()
import sglang
from sglang.srt.utils.common import is_cpu
if ADAPTED:
    cpu_backend.install()
    cpu_backend.install()  # idempotent
results["is_cpu"] = is_cpu()

def rotary():
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    RotaryEmbedding(head_size=16, rotary_dim=16, max_position_embeddings=64, base=10000,
                    is_neox_style=True, dtype=torch.float32)

def allocation():
    # upstream: the variable alone is not enough (is_cpu() caches its answer and the module
    # reads it at import: both are renewed here)
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    import importlib
    import sglang.srt.mem_cache.allocation as allocation
    is_cpu.cache_clear()
    importlib.reload(allocation)

def deterministic_torch_native():
    from sglang.srt.arg_groups import choices, overrides
    view = types.SimpleNamespace(enable_deterministic_inference=True,
                                 attention_backend="torch_native")
    overrides._deterministic_attention_backend(view)
    return choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES.count("torch_native")

def batch_invariant_mode():
    from sglang.srt.model_executor.model_runner import ModelRunner
    runner = object.__new__(ModelRunner)
    from sglang.srt.batch_invariant_ops import enable_batch_invariant_mode
    if ADAPTED:
        ModelRunner.maybe_enable_batch_invariant_mode(runner)
    else:
        enable_batch_invariant_mode()

def seeded_sampling():
    from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32
    seed = torch.tensor([7, 2**63 + 5], dtype=torch.uint64)
    return murmur_hash32(seed, torch.tensor([3, 4]), torch.arange(3)).tolist()

def memory_saver():
    from sglang.srt.utils.torch_memory_saver_adapter import TorchMemorySaverAdapter
    # upstream: the colocated default on GPUs; adapted: what the CPU backend passes
    enable = (cpu_backend.engine_arguments(tp_size=1, max_total_tokens=0)["enable_memory_saver"]
              if ADAPTED else True)
    TorchMemorySaverAdapter.create(enable=enable)

def thread_binding():
    from sglang.srt.utils import numa_utils
    if ADAPTED:
        cpu_backend.engine_arguments(tp_size=2, max_total_tokens=0)
    else:
        os.environ.pop("SGLANG_CPU_OMP_THREADS_BIND", None)
    return numa_utils.init_threads_binding(numa_index=1, world_size=2)

for name, fn in [("rotary", rotary), ("deterministic_torch_native", deterministic_torch_native),
                 ("batch_invariant_mode", batch_invariant_mode),
                 ("seeded_sampling", seeded_sampling), ("memory_saver", memory_saver),
                 ("thread_binding", thread_binding),
                 ("allocation", allocation)]:  # last: upstream, it switches the CPU engine on
    check(name, fn)
if ADAPTED:
    results["engine_arguments"] = cpu_backend.engine_arguments(tp_size=1, max_total_tokens=0)
print("RESULTS " + json.dumps(results))
'''


def _probe(adapted: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_backend.CPU_ENGINE_VAR, cpu_backend.THREADS_BIND_VAR)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and p != str(cpu_backend.STANDIN_ROOT))
    out = subprocess.run([sys.executable, "-c", f"ADAPTED = {adapted}\n" + PROBE], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def upstream():
    return _probe(adapted=False)


@pytest.fixture(scope="module")
def adapted():
    return _probe(adapted=True)


def test_cpu_engine_variable(upstream, adapted):
    """Without SGLANG_USE_CPU_ENGINE sglang does not know it runs on CPU and its rotary layer
    reaches for vllm's CUDA kernel."""
    assert upstream["is_cpu"] is False
    assert upstream["rotary"] == "ModuleNotFoundError: No module named 'vllm'"
    assert adapted["is_cpu"] is True and adapted["rotary"] == "ok"


def test_sgl_kernel_standin_is_importable_only_through_the_backend(upstream, adapted):
    """With the CPU engine on, sglang imports sgl_kernel at module level; no CPU build exists."""
    assert upstream["allocation"] == "ModuleNotFoundError: No module named 'sgl_kernel'"
    assert adapted["allocation"] == "ok"


def test_deterministic_inference_accepts_torch_native(upstream, adapted):
    assert upstream["deterministic_torch_native"].startswith(
        "ValueError: Currently only") and "torch_native" in upstream["deterministic_torch_native"]
    assert adapted["deterministic_torch_native"] == 1  # listed once: install is idempotent


def test_batch_invariant_mode_is_skipped(upstream, adapted):
    assert upstream["batch_invariant_mode"] == (
        "RuntimeError: No supported accelerator (CUDA/XPU) available")
    assert adapted["batch_invariant_mode"] == "ok"


def test_seeded_sampling_hashes_with_the_port(upstream, adapted):
    """sglang's seeded sampler calls torch.ops.sgl_kernel.murmur_hash32_cpu on CPU."""
    assert upstream["seeded_sampling"].startswith("ModuleNotFoundError")
    expected = [[_murmur3_32(struct.pack("<QII", seed, pos, col)) for col in range(3)]
                for seed, pos in ((7, 3), (2**63 + 5, 4))]
    assert adapted["seeded_sampling"] == expected


def test_memory_saver_is_off(upstream, adapted):
    """torch_memory_saver is CUDA-only: the colocated default (memory saver on) fails on CPU."""
    assert upstream["memory_saver"] == "ModuleNotFoundError: No module named 'torch_memory_saver'"
    assert adapted["memory_saver"] == "ok"


def test_threads_are_split_for_tensor_parallel_ranks(upstream, adapted):
    assert upstream["thread_binding"].startswith(
        "AssertionError: SGLANG_CPU_OMP_THREADS_BIND is not set")
    assert adapted["thread_binding"] == cpu_backend._thread_split(2).split("|")[1]
    groups = [g.split("-") for g in cpu_backend._thread_split(2).split("|")]
    assert len(groups) == 2
    if len(os.sched_getaffinity(0)) >= 2:  # disjoint core ranges when there are enough cores
        assert int(groups[0][1]) < int(groups[1][0])


def test_engine_arguments(adapted):
    args = adapted["engine_arguments"]
    assert args == {"device": "cpu", "attention_backend": "torch_native",
                    "disable_cuda_graph": True, "enable_memory_saver": False,
                    "dtype": "float32", "max_total_tokens": cpu_backend.CPU_MAX_TOTAL_TOKENS}


def test_a_missing_cpp_compiler_is_named_before_the_engine_starts():
    """SGLang's seeded sampler is torch.compile'd; without a C++ compiler inductor fails inside
    the engine's first batch (InvalidCxxCompiler, the scheduler dies). Found building the CPU
    image, which had no g++. Here: inductor's own search with a compiler that does not exist."""
    from torch._inductor import config, cpp_builder, exc

    cpu_backend.require_cpp_compiler()  # this machine has g++
    # torch's own config patch: a plain setattr/monkeypatch on its config module deletes the
    # option on undo, and every later torch.compile in the process fails
    with config.patch({"cpp.cxx": ("no-such-compiler++",)}):
        with pytest.raises(exc.InvalidCxxCompiler):  # the upstream failure
            cpp_builder.get_cpp_compiler()
        with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler.*apt-get install g\+\+"):
            cpu_backend.require_cpp_compiler()
    assert config.cpp.cxx[-1]  # restored
    cpu_backend.require_cpp_compiler()


def _group_body(rank, world, adapted_run, out):
    cpu_backend.prepare_environment()
    from sglang.srt.distributed import parallel_state

    if adapted_run:
        cpu_backend.install()
    try:
        group = parallel_state.init_model_parallel_group([[0, 1]], rank, "gloo",
                                                         group_name="trb_test")
        result = group.all_reduce(torch.tensor([float(rank + 1)])).tolist()
    except ValueError as err:
        result = str(err)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


@pytest.mark.parametrize("adapted_run", [False, True], ids=["upstream", "adapted"])
def test_tensor_parallel_groups_use_gloo(adapted_run, tmp_path):
    """SGLang's TP group coordinators create a NCCL communicator even on a CPU device."""
    out = tmp_path / "result.json"
    run_distributed(_group_body, 2, adapted_run, str(out))
    result = json.loads(out.read_text())
    assert result == ([3.0] if adapted_run else "Expected a cuda device, but got: cpu")


def _standin():
    """The stand-in module itself (as the engine processes import it)."""
    if "sgl_kernel" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "sgl_kernel", cpu_backend.STANDIN_ROOT / "sgl_kernel" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["sgl_kernel"] = module
    return sys.modules["sgl_kernel"]


def _murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32, written from the algorithm's description (pure Python)."""
    mask, c1, c2 = 0xFFFFFFFF, 0xCC9E2D51, 0x1B873593

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed & mask
    whole = len(data) // 4 * 4
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        h = (rotl(h ^ (rotl(k * c1 & mask, 15) * c2 & mask), 13) * 5 + 0xE6546B64) & mask
    if data[whole:]:
        h ^= rotl(int.from_bytes(data[whole:], "little") * c1 & mask, 15) * c2 & mask
    h ^= len(data)
    h ^= h >> 16
    h = h * 0x85EBCA6B & mask
    h ^= h >> 13
    h = h * 0xC2B2AE35 & mask
    return h ^ (h >> 16)


def test_murmur_reference_reproduces_published_vectors():
    vectors = [(b"", 0, 0), (b"", 1, 0x514E28B7), (b"", 0xFFFFFFFF, 0x81F16F39),
               (b"\0\0\0\0", 0, 0x2362F9DE), (b"aaaa", 0x9747B28C, 0x5A97808A),
               (b"Hello, world!", 0x9747B28C, 0x24884CBA),
               (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD)]
    for data, seed, want in vectors:
        assert _murmur3_32(data, seed) == want


def test_murmur_port_is_bit_exact():
    """The torch port equals the reference for 64-bit seeds (high bit set too), 32-bit
    positions and column ids: what sglang's triton kernel computes on GPUs."""
    rng = random.Random(0)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1] + [
        rng.getrandbits(64) for _ in range(9)]
    positions = [rng.getrandbits(31) for _ in seeds]
    cols = [0, 1, 2**31 - 1] + [rng.getrandbits(31) for _ in range(20)]
    got = _standin().murmur_hash32(torch.tensor(seeds, dtype=torch.uint64),
                                   torch.tensor(positions), torch.tensor(cols))
    assert got.dtype == torch.uint32
    want = [[_murmur3_32(struct.pack("<QII", s, p, c)) for c in cols]
            for s, p in zip(seeds, positions)]
    assert got.tolist() == want
    op = torch.ops.sgl_kernel.murmur_hash32_cpu.default
    assert torch.equal(op(torch.tensor(seeds, dtype=torch.uint64), torch.tensor(positions),
                          torch.tensor(cols)), got)


def test_assign_req_to_token_pool_matches_its_definition():
    standin = _standin()
    pool = torch.full((4, 10), -1, dtype=torch.int32)
    starts, ends = torch.tensor([0, 3, 5]), torch.tensor([2, 7, 5])
    locations = torch.arange(100, 106)
    standin.assign_req_to_token_pool_cpu(torch.tensor([2, 0, 3]), pool, starts, ends,
                                         locations, pool.shape[1])
    want = torch.full((4, 10), -1, dtype=torch.int32)
    want[2, 0:2] = torch.tensor([100, 101], dtype=torch.int32)
    want[0, 3:7] = torch.tensor([102, 103, 104, 105], dtype=torch.int32)
    assert torch.equal(pool, want)


def test_other_sgl_kernel_names_fail_when_called_naming_themselves():
    standin = _standin()
    fn = standin.copy_all_layer_kv_cache_cpu  # sglang imports it at module level on CPU
    with pytest.raises(NotImplementedError, match="sgl_kernel.copy_all_layer_kv_cache_cpu"):
        fn()
    with pytest.raises(AttributeError):
        standin.__wrapped__  # dunder/private names stay absent (import machinery probes them)


def test_standin_refuses_a_cuda_machine_and_the_backend_is_off_there():
    code = ("import torch, os, sys\ntorch.cuda.is_available = lambda: True\n"
            "from trb_megatron.sglang_plugin import cpu_backend\n"
            "cpu_backend.prepare_environment()\n"
            "print(os.environ.get('SGLANG_USE_CPU_ENGINE'), "
            "cpu_backend.engine_arguments(tp_size=2, max_total_tokens=0))\n"
            f"sys.path.insert(0, {str(cpu_backend.STANDIN_ROOT)!r})\n"
            "try:\n    import sgl_kernel\nexcept ImportError as err:\n    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != cpu_backend.CPU_ENGINE_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    assert out[0] == "None {}"
    assert "must not be used on a CUDA machine" in out[1]


def test_standin_is_not_importable_by_default():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import importlib.util; "
                          "print(importlib.util.find_spec('sgl_kernel'))"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "None"
