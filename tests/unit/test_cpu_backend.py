"""One test per CPU-backend patch: the upstream failure still happens, and the patch removes it.

Run: .venv/bin/python -m pytest tests/unit/test_cpu_backend.py -q
When a megatron-core or torch upgrade changes an upstream behaviour, the "upstream" half of its
test fails: re-measure, then drop or adapt that patch. Patches are applied with monkeypatch from
the module's own table (upstream_patches), so this process stays unpatched between tests; the
real install (process-wide, idempotent) is exercised by tests/distributed/test_megatron_cpu.py.
"""

import importlib.metadata
import socket

import pytest
import torch
import torch.distributed as dist
from packaging.version import Version

from tests.tiny_gpt import tiny_batch, tiny_gpt, tiny_loss
from trb_megatron.parallel import cpu_backend
from trb_megatron.parallel.profile import BackendProfile

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="pins CPU-only upstream failures; the backend is off on GPUs"),
]


# What torch raises where megatron asks for CUDA: the CPU build says it was not compiled with
# CUDA (AssertionError); a CUDA build on a machine without a GPU finds no driver (RuntimeError).
NO_CUDA = (AssertionError, RuntimeError)
NO_CUDA_MESSAGE = "not compiled with CUDA|Found no NVIDIA driver"


def _patch(owner, name):
    (found,) = [p for p in cpu_backend.upstream_patches() if p.owner is owner and p.name == name]
    return found


def _use(monkeypatch, patch, which):
    monkeypatch.setattr(patch.owner, patch.name, getattr(patch, which))


@pytest.fixture
def patched(monkeypatch):
    """All patches and the device mode, for this test only."""
    from megatron.core.tensor_parallel import random as tp_random

    for p in cpu_backend.upstream_patches():
        _use(monkeypatch, p, "replacement")
    monkeypatch.setattr(tp_random, "_CUDA_RNG_STATE_TRACKER", None)
    monkeypatch.setattr(tp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    with cpu_backend.CpuDeviceMode():
        yield monkeypatch


MEGATRON_CORE = importlib.metadata.version("megatron-core")


def test_refuses_untested_megatron_core():
    assert MEGATRON_CORE in cpu_backend.TESTED_MEGATRON_CORE_VERSIONS
    for tested in cpu_backend.TESTED_MEGATRON_CORE_VERSIONS:
        cpu_backend.check_megatron_core_version(tested)
    for untested in ("0.17.0", "0.16.0", "0.20.0"):
        with pytest.raises(RuntimeError) as error:
            cpu_backend.check_megatron_core_version(untested)
        message = str(error.value)
        for needle in (f"but megatron-core {untested} is installed",
                       "0.16.1, 0.17.1, 0.18.2, 0.19.2",
                       "pip install megatron-core==0.19.2` (Python >= 3.12)",
                       "pip install megatron-core==0.16.1` (Python 3.11)"):
            assert needle in message


def test_environment_switch_turns_install_off(monkeypatch):
    monkeypatch.setenv(cpu_backend.DISABLE_ENV_VAR, "1")
    assert cpu_backend.install_cpu_backend() is False
    assert torch.cuda.current_device is _patch(torch.cuda, "current_device").original


@pytest.mark.parametrize(
    "call",
    [
        lambda: torch.zeros(2, device="cuda"),
        lambda: torch.empty(2, device=0),
        lambda: torch.arange(3, device=torch.device("cuda", 0)),
        lambda: torch.ones(2).cuda(),
        lambda: torch.ones(2).to("cuda:0"),
        lambda: torch.ones(2).to(0, torch.float64),
        lambda: torch.zeros(2, device=torch.device("cuda")),
    ],
)
def test_device_mode_maps_cuda_devices_to_cpu(call):
    with pytest.raises(NO_CUDA):
        call()
    with cpu_backend.CpuDeviceMode():
        assert call().device == torch.device("cpu")


def test_device_mode_leaves_cpu_calls_alone():
    with cpu_backend.CpuDeviceMode():
        x = torch.ones(3, dtype=torch.float64).to("cpu", torch.float32)
        assert x.dtype == torch.float32 and torch.device("cpu", 0).type == "cpu"
        assert x.type(torch.float64).dtype == torch.float64


def test_current_device_and_synchronize_stubs(monkeypatch):
    from megatron.core.utils import GlobalMemoryBuffer

    current_device = _patch(torch.cuda, "current_device")
    synchronize = _patch(torch.cuda, "synchronize")
    with pytest.raises(NO_CUDA, match=NO_CUDA_MESSAGE):
        current_device.original()
    with pytest.raises(NO_CUDA, match=NO_CUDA_MESSAGE):
        synchronize.original()
    # Megatron allocates its shared buffers on torch.cuda.current_device().
    with pytest.raises(NO_CUDA, match=NO_CUDA_MESSAGE):
        GlobalMemoryBuffer().get_tensor((4,), torch.float32, "buffer")
    _use(monkeypatch, current_device, "replacement")
    _use(monkeypatch, synchronize, "replacement")
    torch.cuda.synchronize()
    with cpu_backend.CpuDeviceMode():
        assert GlobalMemoryBuffer().get_tensor((4,), torch.float32, "buffer").device.type == "cpu"


def test_type_strings_report_cuda_names_for_cpu_tensors():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    def param_with_grad():
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = torch.full((4,), 2.0)
        return param

    # Grad clipping asserts grad.type() == 'torch.cuda.FloatTensor'.
    with pytest.raises(AssertionError):
        clip_grad_by_total_norm_fp32([param_with_grad()], max_norm=1.0, total_norm=4.0)
    param = param_with_grad()
    with cpu_backend.CpuDeviceMode():
        assert param.type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)


def test_rng_tracker_forks_named_cpu_states(patched):
    from megatron.core.tensor_parallel import random as tp_random

    upstream = _patch(tp_random, "CudaRNGStatesTracker").original
    with pytest.raises(NO_CUDA, match=NO_CUDA_MESSAGE):
        upstream().add("state", 1)
    assert cpu_backend._MODEL_PARALLEL_RNG == tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME

    def tp_region_dropout(tp_rank):
        tp_random.model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = tp_random.get_cuda_rng_tracker()
        assert isinstance(tracker, cpu_backend.CpuRNGStatesTracker)
        with tracker.fork():
            return torch.nn.functional.dropout(torch.ones(64), p=0.5)

    rank0, rank1 = tp_region_dropout(0), tp_region_dropout(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, tp_region_dropout(0))

    # Forking neither consumes nor perturbs the default generator, also when nested.
    tracker = tp_random.get_cuda_rng_tracker()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with tracker.fork(tp_random.get_data_parallel_rng_tracker_name()):
        torch.rand(10)
        with tracker.fork():
            torch.rand(10)
        torch.rand(10)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)

    # get_states/set_states (what checkpoints save) replay the same stream.
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(4), first, rtol=0, atol=0)
    assert tp_random.get_all_rng_states() is tracker.states_
    with pytest.raises(ValueError, match="CUDA"):
        cpu_backend.CpuRNGStatesTracker(use_cudagraphable_rng=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank_groups():
    """A one-process gloo world with megatron's parallel state (TP=PP=DP=1) for this module."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if dist.is_initialized():
        pytest.fail("torch.distributed is already initialised in the test process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _distributed_optimizer(pg_collection):
    """A tiny fp32 GPTModel under DDP with megatron's DistributedOptimizer (torch Adam inside)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)  # attention forks the tracker's TP state
    profile = BackendProfile.for_hardware(cuda=False, transformer_engine=False)
    model = tiny_gpt(profile, pg_collection, num_layers=1)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
    )
    config = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True)
    (optimizer,) = get_megatron_optimizer(config, [ddp]).chained_optimizers
    return ddp, optimizer


def _train_step(ddp, optimizer, seed):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    tiny_loss(ddp, tiny_batch(seed)).backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]


def _steps(optimizer):
    return [state["step"] for state in optimizer.optimizer.state.values()]


def test_state_dict_of_unstepped_optimizer(patched, one_rank_groups):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patch = _patch(DistributedOptimizer, "state_dict")
    ddp, optimizer = _distributed_optimizer(one_rank_groups)
    _use(patched, patch, "original")
    with pytest.raises(AssertionError):  # no torch Adam state, so no 'step' to report
        optimizer.state_dict()
    _use(patched, patch, "replacement")
    assert [g["step"] for g in optimizer.state_dict()["optimizer"]["param_groups"]] == [0.0, 0.0]
    # Materialising Adam's initial state early changes nothing: same update as an untouched twin.
    twin_ddp, twin = _distributed_optimizer(one_rank_groups)
    _train_step(ddp, optimizer, seed=1)
    _train_step(twin_ddp, twin, seed=1)
    for param, twin_param in zip(ddp.parameters(), twin_ddp.parameters()):
        torch.testing.assert_close(param, twin_param, rtol=0, atol=0)
    assert [s.item() for s in _steps(optimizer)] == [1.0] * len(_steps(optimizer))


def test_load_state_dict_gives_each_param_its_own_step(patched, one_rank_groups):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patch = _patch(DistributedOptimizer, "load_state_dict")
    ddp, optimizer = _distributed_optimizer(one_rank_groups)
    _train_step(ddp, optimizer, seed=1)
    saved = optimizer.state_dict()
    for which, expected_step in (("original", None), ("replacement", 2.0)):
        _use(patched, patch, which)
        loaded_ddp, loaded = _distributed_optimizer(one_rank_groups)
        loaded.load_state_dict(saved)
        _train_step(loaded_ddp, loaded, seed=2)
        steps = _steps(loaded)
        if expected_step is None:  # upstream: one shared tensor, incremented once per param
            assert len({id(s) for s in steps}) == 1
            assert steps[0].item() == 1.0 + len(steps)
        else:
            assert len({id(s) for s in steps}) == len(steps)
            assert {s.item() for s in steps} == {expected_step}


def test_current_stream_stub(patched, one_rank_groups):
    patch = _patch(torch.cuda, "current_stream")
    ddp, optimizer = _distributed_optimizer(one_rank_groups)
    _use(patched, patch, "original")
    if Version(MEGATRON_CORE) < Version("0.19"):
        _train_step(ddp, optimizer, seed=1)
        pytest.skip(f"megatron-core {MEGATRON_CORE}: DDP's grad sync asks for the CUDA stream "
                    f"at most with overlap_grad_reduce (0.19: on every step): nothing to patch")
    # Every step: finish_grad_sync -> start_grad_sync -> torch.cuda.current_stream().
    with pytest.raises(NO_CUDA, match=NO_CUDA_MESSAGE):
        _train_step(ddp, optimizer, seed=1)
    _use(patched, patch, "replacement")
    assert isinstance(torch.cuda.current_stream(), torch.cpu.Stream)
    _train_step(ddp, optimizer, seed=1)


def test_set_main_param_and_optimizer_states(patched, one_rank_groups):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patch = _patch(DistributedOptimizer, "_set_main_param_and_optimizer_states")
    ddp, optimizer = _distributed_optimizer(one_rank_groups)
    _train_step(ddp, optimizer, seed=1)
    model_param = next(ddp.module.parameters())
    state = optimizer._get_main_param_and_optimizer_states(model_param)
    # What the loaders pass: no 'step' (dp_zero, fully_reshardable) or a stale one (dp_reshardable).
    loaded = {k: torch.full_like(v, 0.25) for k, v in state.items() if k != "step"}
    stale = {**loaded, "step": torch.tensor(0.0)}

    _use(patched, patch, "original")
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        optimizer._set_main_param_and_optimizer_states(model_param, loaded)
    with torch.no_grad(), pytest.raises(KeyError, match="step"):
        optimizer._set_main_param_and_optimizer_states(model_param, loaded)
    with torch.no_grad():
        optimizer._set_main_param_and_optimizer_states(model_param, stale)
    assert optimizer._get_main_param_and_optimizer_states(model_param)["step"].item() == 0.0

    _use(patched, patch, "replacement")
    optimizer._get_main_param_and_optimizer_states(model_param)["step"].fill_(1.0)
    for tensors in (loaded, stale):
        optimizer._set_main_param_and_optimizer_states(model_param, tensors)
        after = optimizer._get_main_param_and_optimizer_states(model_param)
        assert after["step"].item() == 1.0
        for key, value in loaded.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
