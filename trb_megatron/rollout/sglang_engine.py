"""The "sglang" rollout backend: the RolloutEngine protocol over SGLang engines running the TRB
composite model (trb_megatron.sglang_plugin), with the trainer's student weights pushed in before
every rollout. Pinned to sglang 0.5.23; runs on CPU (tests/sglang, the main job with
rollout.backend=sglang) through trb_megatron.sglang_plugin.cpu_backend; not yet run on a GPU.

Layout: one engine per model replica (data-parallel rank), driven by the replica's TP rank 0;
the other TP ranks take part in the weight gather and receive the batch by broadcast.
- colocated: an offline sglang.Engine started by the driver (on GPUs with enable_memory_saver:
  its KV cache and CUDA graphs are released after each rollout and resumed before the next, so
  the training step has the memory; weights stay resident, since released weights are lost
  without a CPU copy and the teacher's would have to be reloaded from disk; on CPU everything
  stays resident). Updates use update_weights_from_tensor in buckets.
- disaggregated: SGLang servers launched separately (same model arguments, see
  `server_command`); replica d sends its requests to servers[d % len(servers)]; trainer rank 0
  joins a NCCL weight-update group with every server and broadcasts each bucket
  (update_weights_from_distributed).
Updates happen only between generate calls (every rank passes a barrier first, so no request
is in flight: "drain"), inside one begin_weight_update() / end_weight_update() session (SGLang
refuses updates outside one), and the last bucket flushes the radix cache (cached prefixes were
computed with the old weights).

Nothing fails silently: every SGLang call that reports failure by its return value (weight-update
session, updates, update group) is checked and raises RuntimeError naming the call and SGLang's
message, and after every engine start a probe request must come back with the composite model's
per-token statistics (SGLang only logs a plugin that fails to load and then serves the stock
model).

Teacher off: when the behaviour no longer runs the teacher (every schedule is non-increasing,
so that is for good: the trainer calls release_teacher), the colocated engine is restarted
without the teacher (the same model class, student only: the same
EOS merge and padding mask as the trainer's mu) and the current weights are pushed at once. That
frees the teacher's weights and its half of the KV pool, with no dependence on SGLang's
graph-recapture internals; it costs one engine start per run. Disaggregated servers are not
ours to restart: they keep running the composite model at eps = 0 (exactly beta = 0: pure
student samples, teacher compute wasted) until relaunched.
"""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.sglang_requests import (STAT_KEYS, assemble_batch, prompt_ids,
                                                  sampling_params)
from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.rollout.weight_sync import buckets, hf_tensors
from trb_megatron.sglang_plugin import cpu_backend
from trb_megatron.sglang_plugin.composite_config import (ARCHITECTURE, TRBSettings,
                                                         composite_overrides)
from trb_megatron.methods import BehaviourStep
from trb_megatron.sglang_plugin.engine_shutdown import shutdown_engine
from trb_megatron.sglang_plugin.version import require_sglang
from trb_megatron.sglang_plugin.wire import EPS_KEY, meta_key

GROUP_NAME = "trb_weight_update"
PLUGIN = "trb_megatron"
"""Name of this package's `sglang.srt.plugins` entry point (setup.py)."""
PROBE_EPS = 1e9
"""The probe request's budget: every teacher is feasible (beta = 1 exactly)."""
MEMORY_TAGS = ["kv_cache", "cuda_graph"]


def engine_kwargs(settings, *, student_dir, teacher_dir, vocab, tp_size: int, seed: int
                  ) -> dict:
    """sglang.Engine / server arguments for the composite model (teacher_dir None: the
    student alone in the same model class). settings: config.SGLangConfig. Without CUDA the
    CPU backend's arguments replace the GPU ones (cpu_backend.engine_arguments)."""
    student_cfg = json.loads((Path(student_dir) / "config.json").read_text())
    teacher_cfg = None if teacher_dir is None else json.loads(
        (Path(teacher_dir) / "config.json").read_text())
    trb = TRBSettings(
        student_architecture=student_cfg["architectures"][0],
        student_layers=student_cfg["num_hidden_layers"], teacher_path=str(teacher_dir or ""),
        vocab_size=vocab.size, stop_ids=tuple(vocab.stop_ids),
        iterations=settings.solver_iterations, max_rows=settings.max_running_requests)
    kwargs = dict(
        model_path=str(student_dir), tp_size=tp_size, random_seed=seed,
        mem_fraction_static=settings.mem_fraction,
        max_running_requests=settings.max_running_requests,
        cuda_graph_max_bs_decode=settings.max_running_requests,
        json_model_override_args=json.dumps(composite_overrides(student_cfg, teacher_cfg, trb)),
        attention_backend=settings.attention_backend, disable_prefill_cuda_graph=True,
        enable_custom_logit_processor=True, skip_tokenizer_init=True,
        enable_memory_saver=settings.mode == "colocated",
        enable_deterministic_inference=settings.deterministic)
    if settings.max_total_tokens:
        kwargs["max_total_tokens"] = settings.max_total_tokens
    kwargs.update(cpu_backend.engine_arguments(tp_size=tp_size,
                                                max_total_tokens=settings.max_total_tokens))
    return kwargs


def server_command(settings, **kwargs) -> list[str]:
    """`python -m sglang.launch_server ...` for one disaggregated server (add --host/--port)."""
    args = ["python", "-m", "sglang.launch_server"]
    for key, value in engine_kwargs(settings, **kwargs).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def checked(call: str, result) -> str:
    """The message of a successful SGLang `call` whose result is (success, message) (engine)
    or {"success": ..., "message": ...} (HTTP); RuntimeError naming the call otherwise."""
    if isinstance(result, dict) and "success" in result:
        success, message = result["success"], result.get("message", "")
    elif isinstance(result, (tuple, list)) and len(result) >= 2:
        success, message = result[0], result[1]
    else:
        raise RuntimeError(f"SGLang {call} returned {result!r:.200}, not (success, message): "
                           "cannot tell whether it worked")
    if success is not True:
        raise RuntimeError(f"SGLang {call} failed: {message}")
    return message


def check_plugin() -> None:
    """Load the TRB plugin the way every SGLang process will (its entry point), raising what
    SGLang would only log: not installed, excluded by SGLANG_PLUGINS, or failing to import."""
    from importlib.metadata import entry_points

    from sglang.srt.environ import envs

    found = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == PLUGIN]
    if not found:
        raise RuntimeError(f"the SGLang plugin entry point {PLUGIN!r} (group sglang.srt.plugins) "
                           "is not installed: install this package (pip install -e .) in the "
                           "environment that runs SGLang")
    allowed = envs.SGLANG_PLUGINS.get()
    if allowed and PLUGIN not in {name.strip() for name in allowed.split(",")}:
        raise RuntimeError(f"SGLANG_PLUGINS={allowed!r} leaves out the TRB plugin {PLUGIN!r}: "
                           f"add it to the list or unset the variable")
    try:
        found[0].load()
    except Exception as err:
        raise RuntimeError(f"the TRB plugin {found[0].value} fails to import "
                           f"({type(err).__name__}: {err}); SGLang would only log this and "
                           "serve without the TRB model") from err


def verify_trb_model(outputs, *, teacher: bool) -> None:
    """Check a probe request's output (one prompt, one token, eps = PROBE_EPS): the composite
    model reports its per-token statistics, beta = 1 with the teacher and 0 without.
    RuntimeError otherwise (SGLang serves the stock model when the plugin failed to load)."""
    meta = outputs[0].get("meta_info", {}) if outputs else {}
    missing = [key for key in STAT_KEYS if key not in meta]
    if missing:
        raise RuntimeError(
            f"the SGLang engine is not serving {ARCHITECTURE}: its output has no {missing} "
            "(SGLang only logs a plugin that fails to load: look for 'Failed to load plugin' "
            "or 'Failed to apply hooks' in its log; the plugin is the entry point "
            "sglang.srt.plugins -> trb_megatron.sglang_plugin.model:register, installed with "
            "this package)")
    want, beta = 1.0 if teacher else 0.0, meta[meta_key("beta")]
    if list(beta) != [want]:
        raise RuntimeError(f"the SGLang engine's {ARCHITECTURE} returned beta {beta} for a "
                           f"probe with eps={PROBE_EPS:g}; expected [{want}] "
                           f"({'with' if teacher else 'without'} the teacher)")


def _post(url: str, payload: dict, timeout: float = 3600.0):
    """POST JSON to an SGLang server; RuntimeError naming the endpoint and SGLang's answer on
    an HTTP error."""
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"SGLang {url} failed: HTTP {err.code}: "
                           f"{err.read().decode(errors='replace')[:500]}") from None


def _post_all(urls: Sequence[str], payload: dict, call: str) -> None:
    """POST the same checked call to every server at once; raise on any failure."""
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        futures = [pool.submit(_post, f"{u}/{call}", payload) for u in urls]
        for url, future in zip(urls, futures):
            checked(f"{call} ({url})", future.result())


class SGLangRolloutEngine:
    """RolloutEngine over SGLang. student: this rank's unwrapped GPTModel (weights to push);
    arch: its ModelArch; groups: the trainer's ProcessGroupCollection (PP must be 1); settings:
    config.SGLangConfig; student_dir, teacher_dir: the Hugging Face directories the engines
    load (the student's is its initial weights, replaced at the first sync); vocab: the shared
    VocabLayout; pad_id: fills rows after they stop."""

    def __init__(self, student, arch, groups, *, settings, student_dir, teacher_dir, vocab,
                 pad_id: int, seed: int):
        self.sglang = require_sglang()
        if groups.pp.size() != 1:
            raise ValueError("rollout.backend=sglang needs parallel.pipeline_parallel=1")
        self.student, self.arch, self.groups, self.settings = student, arch, groups, settings
        self.student_dir, self.teacher_dir = student_dir, teacher_dir
        self.vocab, self.pad_id, self.seed = vocab, pad_id, seed
        self.driver = groups.tp.rank() == 0
        self.engine = None
        self.memory_saver = False
        self.engine_starts = 0
        self.engine_tp = settings.tp_size or groups.tp.size()
        self.teacher_loaded = True
        self.update_group = None
        self.processor = _passthrough_str()
        if settings.mode != "colocated":
            self.servers = [u.strip().rstrip("/") for u in settings.servers.split(",")]
            self.server = self.servers[groups.dp.rank() % len(self.servers)]
            if dist.get_rank() == 0:
                self._join_update_group()

    def _ensure_engine(self):
        """Start the colocated engine on first use (with the teacher until release_teacher)
        and check that it serves the TRB model."""
        if self.engine is not None or self.settings.mode != "colocated" or not self.driver:
            return
        kwargs = engine_kwargs(self.settings, student_dir=self.student_dir,
                               teacher_dir=self.teacher_dir if self.teacher_loaded else None,
                               vocab=self.vocab, tp_size=self.engine_tp, seed=self.seed)
        self.memory_saver = kwargs["enable_memory_saver"]
        check_plugin()
        start = time.perf_counter()
        self.engine = self.sglang.Engine(**kwargs)
        try:
            verify_trb_model(self._engine_generate([[0]], [self._probe_params()]),
                             teacher=self.teacher_loaded)
        except BaseException:
            self.shutdown()
            raise
        self._memory("release_memory_occupation")
        self.engine_starts += 1
        print(f"[sglang] engine {self.engine_starts} of replica {self.groups.dp.rank()} started "
              f"({'student + teacher' if self.teacher_loaded else 'student only'}, "
              f"TP={self.engine_tp}) in {time.perf_counter() - start:.0f} s", flush=True)

    def _memory(self, call: str) -> None:
        """Release or resume the KV cache and CUDA graphs (GPU memory saver only). sglang
        0.5.23 returns nothing for these calls (a failure is an assertion in the scheduler,
        which stops the engine and, through SGLang's child watchdog, this process); a result,
        if a release ever returns one, is checked."""
        if self.memory_saver:
            result = getattr(self.engine, call)(tags=MEMORY_TAGS)
            if result is not None:
                checked(call, result)

    def _probe_params(self) -> dict:
        return {"temperature": 1.0, "max_new_tokens": 1, "custom_params": {EPS_KEY: PROBE_EPS}}

    def _join_update_group(self):
        from sglang.srt.utils import init_custom_process_group

        host, _, port = self.settings.update_master.rpartition(":")
        for url in self.servers:
            verify_trb_model(_post(f"{url}/generate", {
                "input_ids": [[0]], "sampling_params": [self._probe_params()],
                "return_logprob": True, "custom_logit_processor": [self.processor]}),
                teacher=True)
        sizes = [_post(f"{u}/get_server_info", {})["tp_size"] for u in self.servers]
        world = 1 + sum(sizes)
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            futures = [pool.submit(_post, f"{u}/init_weights_update_group", {
                "master_address": host, "master_port": int(port),
                "rank_offset": 1 + sum(sizes[:i]), "world_size": world,
                "group_name": GROUP_NAME, "backend": "nccl"})
                for i, u in enumerate(self.servers)]
            self.update_group = init_custom_process_group(
                backend="nccl", init_method=f"tcp://{host}:{port}", world_size=world, rank=0,
                group_name=GROUP_NAME)
            for url, future in zip(self.servers, futures):
                checked(f"init_weights_update_group ({url})", future.result())

    def generate(self, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                 max_new_tokens: int, behaviour: BehaviourStep, seed: int,
                 prompt_offset: int = 0) -> RolloutBatch:
        """The RolloutEngine protocol (see types.py); a behaviour that runs the teacher after
        `release_teacher` raises."""
        request = RolloutRequest.build(
            prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            behaviour=behaviour, seed=seed, prompt_offset=prompt_offset,
            vocab_size=self.vocab.size, max_positions=self.arch.max_position_embeddings)
        if behaviour.teacher_runs and not self.teacher_loaded:
            raise ValueError(f"{behaviour} needs the teacher, but the engine runs the student "
                             "alone since the behaviour released it (release_teacher)")
        payload = [None]
        if self.driver:
            payload[0] = self._outputs(request)
        if self.groups.tp.size() > 1:
            dist.broadcast_object_list(payload, group=self.groups.tp, group_src=0)
        device = next(self.student.parameters()).device
        return assemble_batch(request, payload[0], vocab=self.vocab, pad_id=self.pad_id,
                              device=device)

    def _engine_generate(self, input_ids, params) -> list[dict]:
        return self.engine.generate(input_ids=input_ids, sampling_params=params,
                                    return_logprob=True,
                                    custom_logit_processor=[self.processor] * len(input_ids))

    def _outputs(self, request: RolloutRequest) -> list[dict]:
        params = sampling_params(request, self.vocab)
        self._ensure_engine()
        if self.engine is not None:
            self._memory("resume_memory_occupation")
            try:
                return self._engine_generate(prompt_ids(request), params)
            finally:
                self._memory("release_memory_occupation")
        return _post(f"{self.server}/generate", {
            "input_ids": prompt_ids(request), "sampling_params": params, "return_logprob": True,
            "custom_logit_processor": [self.processor] * request.rows})

    def sync_weights(self) -> None:
        """Push the trainer's current student weights (collective over every trainer rank),
        in one weight-update session per engine; every SGLang answer is checked."""
        dist.barrier()  # drain: every replica has finished its generate()
        self._ensure_engine()
        max_bytes = self.settings.bucket_mib << 20
        pushing = self.engine is not None or self.update_group is not None
        chunks = list(buckets(hf_tensors(self.student, self.arch, self.groups.tp), max_bytes))
        if pushing:
            self._session("begin_weight_update")
            for i, bucket in enumerate(chunks):
                self._push(bucket, flush=i == len(chunks) - 1)
            self._session("end_weight_update")
        dist.barrier()

    def _session(self, call: str) -> None:
        """Open or close the weight-update session of this rank's engine or of every server."""
        if self.engine is not None:
            checked(call, getattr(self.engine, call)())
        else:
            _post_all(self.servers, {}, call)

    def _push(self, bucket, *, flush: bool):
        if self.engine is not None:
            checked("update_weights_from_tensor", self.engine.update_weights_from_tensor(
                named_tensors=bucket, flush_cache=flush))
            return
        meta = {"names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": GROUP_NAME,
                "flush_cache": flush}
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            futures = [pool.submit(_post, f"{u}/update_weights_from_distributed", meta)
                       for u in self.servers]
            for _, tensor in bucket:
                dist.broadcast(tensor.contiguous(), src=0, group=self.update_group)
            for url, future in zip(self.servers, futures):
                checked(f"update_weights_from_distributed ({url})", future.result())

    def release_teacher(self) -> None:
        """The behaviour no longer runs the teacher, for good: the colocated engine runs the
        student alone from the next sync_weights on (external servers keep the composite model:
        beta = 0 exactly)."""
        if not self.teacher_loaded:
            return
        self.teacher_loaded = False
        self.shutdown()  # restarted student-only at the next sync

    def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            shutdown_engine(engine)


def hf_source_dir(megatron_dir) -> Path:
    """The Hugging Face directory (with weights) a converted or training checkpoint came from:
    what an SGLang engine loads at startup (the student's weights are replaced at the first
    sync)."""
    from trb_megatron.checkpoint.convert import read_meta

    source = Path(read_meta(megatron_dir)["source"])
    if not any(source.glob("*.safetensors")):
        raise ValueError(f"{megatron_dir} was converted from {source}, which holds no "
                         "*.safetensors: SGLang loads its engines from the source directory")
    return source


def _passthrough_str() -> str:
    from trb_megatron.sglang_plugin.passthrough import PassThrough

    return PassThrough().to_str()
