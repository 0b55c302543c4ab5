"""Run Megatron-Core on CPU with gloo: the only module of trb_megatron that patches upstream.

Tested releases: TESTED_MEGATRON_CORE_VERSIONS (0.16.1 on Python 3.11; 0.17.1, 0.18.2 and 0.19.2
on Python 3.12, which they require). Every patch below is needed on each of them unless it says
otherwise; without CUDA any other release is refused, since a patch may no longer fit it.

Megatron-Core assumes CUDA on every path we use (GPTModel forward/backward under TP, the pipeline
schedule, DDP, the optimizers, dist_checkpointing). Measured on a CPU-only torch, these are the
gaps and how each is closed (one test per patch in tests/unit/test_cpu_backend.py):

- Device names. Megatron creates tensors with device="cuda", device=torch.cuda.current_device()
  (an int), torch.device("cuda"), tensor.cuda(), tensor.to(<cuda>). `CpuDeviceMode`, a
  TorchFunctionMode pushed on the installing thread, maps them to CPU (~1 us per torch call).
  torch.cuda.current_device/synchronize are replaced by CPU stubs (megatron calls them directly).
- Streams (megatron-core >= 0.19). DDP's start_grad_sync asks torch.cuda.current_stream() for the
  stream to wait on CUDA-graph events; the stub returns the CPU's stream (there are no events).
- Type strings. The optimizers and grad clipping classify parameters by comparing Tensor.type()
  with 'torch.cuda.FloatTensor' etc.; under the mode a CPU tensor reports its CUDA type name.
- RNG. tensor_parallel.random's CudaRNGStatesTracker seeds and swaps CUDA generator states.
  `CpuRNGStatesTracker` keeps the same named states on the CPU generator, so dropout inside
  tracker.fork() differs per TP rank (seed + 2718 + tp_rank) and is reproducible.
- DistributedOptimizer checkpoints with torch.optim.Adam(W), which is what megatron uses when
  neither Apex nor Transformer Engine is installed (always on CPU):
  state_dict() of an optimizer that never stepped has no 'step' (AssertionError); load_state_dict()
  gives every parameter one shared 'step' tensor, which Adam then increments once per parameter;
  _set_main_param_and_optimizer_states() copies the destination's 'step' from the loaded tensors,
  where the dp_zero and fully_reshardable loaders have none (KeyError) and dp_reshardable has the
  pre-load step (the step silently resets), and the dp_zero and dp_reshardable loaders call it
  with grad enabled (in-place copy into a view of a leaf that requires grad).

Limits: the mode is thread-local, and torch pops it while it handles a call, so autograd backward
functions started by Tensor.backward()/torch.autograd.backward() run without it; megatron's backward
functions on the paths above create no CUDA tensors. Activation recomputation (which reads the CUDA
RNG state directly) and sequence parallelism are not covered. The optimizer issues also hit GPU
machines without Apex/TE, but the backend is off wherever CUDA is available.
"""

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

# The releases the Megatron tests of this project passed on without CUDA (0.17+ need Python 3.12);
# scripts/test.sh runs them on the two ends, 0.16.1 and 0.19.2.
TESTED_MEGATRON_CORE_VERSIONS = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
DISABLE_ENV_VAR = "TRB_MEGATRON_NO_CPU_BACKEND"

_CPU = torch.device("cpu")
# Names CudaRNGStatesTracker uses for "no named state forked" and for the TP-rank state.
_DEFAULT_RNG = "default-rng"
_MODEL_PARALLEL_RNG = "model-parallel-rng"


def _names_cuda(device) -> bool:
    """True for the ways megatron names its accelerator: 'cuda[:i]', cuda torch.device, an index."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, torch.device) and device.type == "cuda"


class CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and reports CUDA type names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor', what the optimizers compare with.
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device == _CPU else name
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.device and args and _names_cuda(args[0]):
            return _CPU
        if func is torch.Tensor.to:
            args = (args[0], *(_CPU if _names_cuda(a) else a for a in args[1:]))
        if _names_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


def _current_device() -> int:
    """Stub for torch.cuda.current_device: index 0, which CpuDeviceMode maps to the CPU."""
    return 0


def _synchronize(device=None) -> None:
    """Stub for torch.cuda.synchronize: CPU ops are synchronous."""


def _current_stream(device=None) -> torch.cpu.Stream:
    """Stub for torch.cuda.current_stream: the CPU's stream (its waits are no-ops)."""
    return torch.cpu.current_stream()


class CpuRNGStatesTracker:
    """Named CPU RNG states with the interface of megatron's CudaRNGStatesTracker.

    Dropout and other random ops draw from torch's default CPU generator, so fork(name) swaps that
    generator's state for the named one and stores the advanced state back on exit. States are
    ByteTensors (torch.get_rng_state()), so get_states()/set_states() round-trip through
    checkpoints like the CUDA ones.
    """

    def __init__(
        self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False
    ):
        if use_cudagraphable_rng:
            raise ValueError("CUDA-graph-safe RNG needs CUDA; set use_cudagraphable_rng=False")
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        """Forget all named states and seeds."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = _DEFAULT_RNG

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new named state seeded with `seed`; names and seeds must be unique."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} is already tracked")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG):
        """Run the body on the named state, then restore the state it replaced (nestable)."""
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not tracked; add() it first")
        outer_name, outer_state = self._current_state_name, torch.get_rng_state()
        if outer_name != _DEFAULT_RNG:
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != _DEFAULT_RNG:
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace `owner.name` (upstream value `original`) by `replacement`."""

    owner: Any
    name: str
    original: Any
    replacement: Any


def check_megatron_core_version(installed: str) -> None:
    """Raise RuntimeError unless `installed` is one of TESTED_MEGATRON_CORE_VERSIONS."""
    if installed not in TESTED_MEGATRON_CORE_VERSIONS:
        oldest, newest = TESTED_MEGATRON_CORE_VERSIONS[0], TESTED_MEGATRON_CORE_VERSIONS[-1]
        raise RuntimeError(
            f"trb_megatron's CPU backend patches megatron-core "
            f"{', '.join(TESTED_MEGATRON_CORE_VERSIONS)}, but megatron-core {installed} is "
            f"installed. Install a tested version with `pip install megatron-core=={newest}` "
            f"(Python >= 3.12) or `pip install megatron-core=={oldest}` (Python 3.11), or run "
            f"on a machine with CUDA, where no patch is applied."
        )


def _state_dict_materialising_adam_state(upstream: Callable) -> Callable:
    @functools.wraps(upstream)
    def state_dict(self):
        # torch Adam creates its state (step=0, zero moments) on the first step; before that
        # upstream finds no 'step' to report. Create exactly that state now: stepping is unchanged.
        is_torch_adam = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if is_torch_adam and not self.optimizer.state:
            self.init_state_fn(self.optimizer, self.config)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param]["step"] = torch.tensor(0.0)
        return upstream(self)

    return state_dict


def _load_state_dict_unaliasing_step(upstream: Callable) -> Callable:
    @functools.wraps(upstream)
    def load_state_dict(self, state_dict):
        upstream(self, state_dict)
        # Upstream hands every parameter the same 'step' tensor; Adam increments it in place once
        # per parameter, so each parameter needs its own copy.
        for param_state in self.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()

    return load_state_dict


def _set_main_param_states_keeping_step(upstream: Callable) -> Callable:
    @functools.wraps(upstream)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        # Upstream copies every key of the destination state, torch Adam's 'step' included,
        # but the loaders leave 'step' out (KeyError) or, for dp_reshardable, pass the step the
        # optimizer had before loading. load_state_dict() already restored the checkpoint's step
        # from param_groups: keep it.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if step is not None:
            tensors = {**tensors, "step": step}
        # An fp32 main param is a view of a parameter that requires grad; the fully_reshardable
        # and fs_model_space loaders run under no_grad, dp_zero and dp_reshardable do not.
        with torch.no_grad():
            upstream(self, model_param, tensors)

    return set_main_param_and_optimizer_states


@functools.cache
def upstream_patches() -> tuple[Patch, ...]:
    """Every run-time patch of the CPU backend; originals captured once, before any install."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as tp_random

    def patch(owner, name, make_replacement):
        original = getattr(owner, name)
        return Patch(owner, name, original, make_replacement(original))

    return (
        # megatron allocates on torch.cuda.current_device() (175 call sites).
        patch(torch.cuda, "current_device", lambda _: _current_device),
        # The pipeline's p2p exchange synchronises after batch_isend_irecv.
        patch(torch.cuda, "synchronize", lambda _: _synchronize),
        # megatron-core >= 0.19: DDP's start_grad_sync (param_and_grad_buffer.py) on every step.
        patch(torch.cuda, "current_stream", lambda _: _current_stream),
        # initialize_rng_tracker instantiates whatever this module attribute names.
        patch(tp_random, "CudaRNGStatesTracker", lambda _: CpuRNGStatesTracker),
        patch(DistributedOptimizer, "state_dict", _state_dict_materialising_adam_state),
        patch(DistributedOptimizer, "load_state_dict", _load_state_dict_unaliasing_step),
        patch(
            DistributedOptimizer,
            "_set_main_param_and_optimizer_states",
            _set_main_param_states_keeping_step,
        ),
    )


_DEVICE_MODE = CpuDeviceMode()
_installed = False


def install_cpu_backend() -> bool:
    """Install the CPU backend in this process (on this thread, for the device mode).

    Returns True when the backend is active, False when it is not needed (CUDA is available) or
    switched off with TRB_MEGATRON_NO_CPU_BACKEND=1. Idempotent. Raises RuntimeError when the
    installed megatron-core is not one of the tested versions.
    """
    global _installed
    if _installed:
        return True
    if os.environ.get(DISABLE_ENV_VAR) == "1" or torch.cuda.is_available():
        return False
    check_megatron_core_version(importlib.metadata.version("megatron-core"))
    for p in upstream_patches():
        setattr(p.owner, p.name, p.replacement)
    _DEVICE_MODE.__enter__()  # stays pushed, like torch.set_default_device's mode
    _installed = True
    return True
