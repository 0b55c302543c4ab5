"""The "sglang" rollout backend: the RolloutEngine protocol over SGLang engines running the TRB
composite model (trb_megatron.sglang_plugin), with the trainer's student weights pushed in after
every optimiser step. Written against sglang 0.5.23; NOT yet run on a GPU (README).

Layout: one engine per model replica (data-parallel rank), driven by the replica's TP rank 0;
the other TP ranks take part in the weight gather and receive the batch by broadcast.
- colocated: an offline sglang.Engine on the replica's GPUs (enable_memory_saver). Its KV
  cache and CUDA graphs are released after each rollout and resumed before the next, so the
  training step has the memory; weights stay resident (released weights are lost without a CPU
  copy, and the teacher's would have to be reloaded from disk). Updates use
  update_weights_from_tensor in buckets.
- disaggregated: SGLang servers launched separately (same model arguments, see
  `server_command`); replica d sends its requests to servers[d % len(servers)]; trainer rank 0
  joins a NCCL weight-update group with every server and broadcasts each bucket
  (update_weights_from_distributed).
Updates happen only between generate calls (every rank passes a barrier first, so no request
is in flight: "drain"), and the last bucket flushes the radix cache (cached prefixes were
computed with the old weights).

Teacher off: when eps reaches 0 (every eps schedule is non-increasing, so it stays 0), the
colocated engine is restarted as a plain student engine (stock Qwen3 model class, current
weights pushed at once) rather than re-captured: that frees the teacher's weights and its half
of the KV pool and returns to SGLang's stock fast path (prefill CUDA graphs, any attention
backend), with no dependence on SGLang's graph-recapture internals; it costs one engine start
per run. Disaggregated servers are not ours to restart: they keep running the composite model at
eps = 0 (exactly beta = 0: pure student samples, teacher compute wasted) until relaunched.
"""

import json
import threading
import urllib.request
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.sglang_requests import assemble_batch, prompt_ids, sampling_params
from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.rollout.weight_sync import buckets, hf_tensors
from trb_megatron.sglang_plugin.composite_config import TRBSettings, composite_overrides
from trb_megatron.sglang_plugin.version import require_sglang

GROUP_NAME = "trb_weight_update"


def engine_kwargs(settings, *, student_dir, teacher_dir, vocab, tp_size: int, seed: int
                  ) -> dict:
    """sglang.Engine / server arguments for the composite model (teacher_dir None: a plain
    student engine). settings: config.SGLangConfig."""
    student_cfg = json.loads((Path(student_dir) / "config.json").read_text())
    teacher_cfg = None if teacher_dir is None else json.loads(
        (Path(teacher_dir) / "config.json").read_text())
    trb = TRBSettings(
        student_architecture=student_cfg["architectures"][0],
        student_layers=student_cfg["num_hidden_layers"], teacher_path=str(teacher_dir or ""),
        vocab_size=vocab.size, stop_ids=tuple(vocab.stop_ids),
        iterations=settings.solver_iterations, max_rows=settings.max_running_requests)
    overrides = composite_overrides(student_cfg, teacher_cfg, trb)
    return dict(
        model_path=str(student_dir), tp_size=tp_size, random_seed=seed,
        mem_fraction_static=settings.mem_fraction,
        max_running_requests=settings.max_running_requests,
        cuda_graph_max_bs=settings.max_running_requests,
        json_model_override_args=json.dumps(overrides),
        attention_backend=settings.attention_backend,
        disable_prefill_cuda_graph=teacher_dir is not None,
        enable_custom_logit_processor=True, skip_tokenizer_init=True,
        enable_memory_saver=settings.mode == "colocated")


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


def _post(url: str, payload: dict, timeout: float = 3600.0):
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


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
        self.teacher_loaded = True
        self.update_group = None
        self.processor = _passthrough_str()
        if settings.mode != "colocated":
            self.servers = [u.strip().rstrip("/") for u in settings.servers.split(",")]
            self.server = self.servers[groups.dp.rank() % len(self.servers)]
            if dist.get_rank() == 0:
                self._join_update_group()

    def _ensure_engine(self):
        """Start the colocated engine on first use (with the teacher until release_teacher)."""
        if self.engine is not None or self.settings.mode != "colocated" or not self.driver:
            return
        self.engine = self.sglang.Engine(**engine_kwargs(
            self.settings, student_dir=self.student_dir,
            teacher_dir=self.teacher_dir if self.teacher_loaded else None,
            vocab=self.vocab, tp_size=self.groups.tp.size(), seed=self.seed))
        self.engine.release_memory_occupation(tags=["kv_cache", "cuda_graph"])

    def _join_update_group(self):
        from sglang.srt.utils import init_custom_process_group

        host, _, port = self.settings.update_master.rpartition(":")
        sizes = [_post(f"{u}/get_server_info", {})["tp_size"] for u in self.servers]
        world = 1 + sum(sizes)
        calls = [threading.Thread(target=_post, args=(f"{u}/init_weights_update_group", {
            "master_address": host, "master_port": int(port), "rank_offset": 1 + sum(sizes[:i]),
            "world_size": world, "group_name": GROUP_NAME, "backend": "nccl"}))
            for i, u in enumerate(self.servers)]
        for call in calls:
            call.start()
        self.update_group = init_custom_process_group(
            backend="nccl", init_method=f"tcp://{host}:{port}", world_size=world, rank=0,
            group_name=GROUP_NAME)
        for call in calls:
            call.join()

    def generate(self, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                 max_new_tokens: int, eps: float, seed: int, prompt_offset: int = 0,
                 temperature: float = 1.0) -> RolloutBatch:
        """The RolloutEngine protocol (see types.py); eps > 0 after `release_teacher` raises."""
        request = RolloutRequest.build(
            prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            eps=eps, seed=seed, prompt_offset=prompt_offset, vocab_size=self.vocab.size,
            max_positions=self.arch.max_position_embeddings, temperature=temperature)
        if request.eps > 0 and not self.teacher_loaded:
            raise ValueError(f"eps={eps} needs the teacher, but the engine runs the student "
                             "alone since eps reached 0 (release_teacher)")
        payload = [None]
        if self.driver:
            payload[0] = self._outputs(request)
        if self.groups.tp.size() > 1:
            dist.broadcast_object_list(payload, group=self.groups.tp, group_src=0)
        device = next(self.student.parameters()).device
        return assemble_batch(request, payload[0], vocab=self.vocab, pad_id=self.pad_id,
                              device=device)

    def _outputs(self, request: RolloutRequest) -> list[dict]:
        params = sampling_params(request, self.vocab)
        self._ensure_engine()
        if self.engine is not None:
            self.engine.resume_memory_occupation(tags=["kv_cache", "cuda_graph"])
            try:
                return self.engine.generate(
                    input_ids=prompt_ids(request), sampling_params=params, return_logprob=True,
                    custom_logit_processor=[self.processor] * request.rows)
            finally:
                self.engine.release_memory_occupation(tags=["kv_cache", "cuda_graph"])
        return _post(f"{self.server}/generate", {
            "input_ids": prompt_ids(request), "sampling_params": params, "return_logprob": True,
            "custom_logit_processor": [self.processor] * request.rows})

    def sync_weights(self) -> None:
        """Push the trainer's current student weights (collective over every trainer rank)."""
        dist.barrier()  # drain: every replica has finished its generate()
        self._ensure_engine()
        max_bytes = self.settings.bucket_mib << 20
        pushing = self.engine is not None or self.update_group is not None
        chunks = list(buckets(hf_tensors(self.student, self.arch, self.groups.tp), max_bytes))
        for i, bucket in enumerate(chunks):
            if pushing:
                self._push(bucket, flush=i == len(chunks) - 1)
        dist.barrier()

    def _push(self, bucket, *, flush: bool):
        if self.engine is not None:
            self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=flush)
            return
        meta = {"names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": GROUP_NAME,
                "flush_cache": flush}
        calls = [threading.Thread(target=_post, args=(f"{u}/update_weights_from_distributed",
                                                      meta)) for u in self.servers]
        for call in calls:
            call.start()
        for _, tensor in bucket:
            dist.broadcast(tensor.contiguous(), src=0, group=self.update_group)
        for call in calls:
            call.join()

    def release_teacher(self) -> None:
        """eps has reached 0 for good: the colocated engine runs the student alone from the
        next sync_weights on (external servers keep the composite model: beta = 0 exactly)."""
        if not self.teacher_loaded:
            return
        self.teacher_loaded = False
        if self.engine is not None:  # started: restart student-only at the next sync
            self.engine.shutdown()
            self.engine = None

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


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
