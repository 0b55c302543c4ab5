"""TRBForCausalLM: the student and the frozen teacher in one SGLang model, blending in forward.

Imported only inside SGLang processes (it imports sglang); `register` is the
`sglang.srt.plugins` entry point that every SGLang process calls at startup. SGLang only logs a
plugin that fails to import or register: trb_megatron.rollout.sglang_engine checks after every
engine start that this class is serving (a probe request must return trb_beta). Runs on CPU in
the test suite (tests/sglang); not yet run on a GPU.

Legend: N rows drawing a token in this forward (requests), V this TP rank's vocabulary shard.

Forward: both models' hidden states over the batch (the teacher's attention layers follow the
student's in the shared KV pool), each model's local logits shard at the rows' last tokens, the
behaviour's per-token law over the TP group (methods.token_behaviour, the megatron backend's
law: a teacher-prefix token where the drawn position is before the row's teacher_until, else the
TRB blend at the row's eps, with a fixed iteration count: static shapes, no host sync, so the
decode step stays CUDA-graph capturable), ONE TP all-gather of the behaviour logits, returned as
next_token_logits. The stock sampler then samples at temperature 1 with no truncation, and its
log_softmax log-probs are log mu. Per-row eps and teacher_until come from static buffers filled
by prepare_for_forward (wire.py); each token's source, beta, KL(mu || pi_S) and KL(pi_S || pi_T)
land in static buffers that the sample hook hands to the scheduler as customized info.
"""

from trb_megatron.sglang_plugin.version import require_sglang

require_sglang()  # a clear message (and the version pin) before any sglang import

import copy

import torch
from torch import nn

from sglang.srt.distributed.communication_op import tensor_model_parallel_all_gather
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_loader.loader import DefaultModelLoader
from sglang.srt.models.registry import ModelRegistry
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.runtime_context import get_parallel
from transformers import AutoConfig

from trb_megatron.methods import Shard, VocabLayout, token_behaviour
from trb_megatron.sglang_plugin import cpu_backend
from trb_megatron.sglang_plugin.composite_config import ARCHITECTURE, read_settings
from trb_megatron.sglang_plugin.weights import TEACHER_PREFIX, align_vocab_rows, route
from trb_megatron.sglang_plugin.wire import REPORTED, fill_rows, meta_key


def _model_class(hf_config):
    cls, _ = ModelRegistry.resolve_model_cls(hf_config.architectures)
    return cls


def _offset_layer_ids(module: nn.Module, offset: int) -> None:
    """Move a model's attention layers behind `offset` layers of the shared KV pool."""
    for sub in module.modules():
        if isinstance(sub, RadixAttention):
            sub.layer_id += offset


def _last_rows(forward_batch):
    """Indices of each request's last token in an extend batch; None in decode (one each)."""
    if forward_batch.forward_mode.is_extend():
        return torch.cumsum(forward_batch.extend_seq_lens, dim=0) - 1
    return None


def _local_logits(causal_lm, hidden, rows) -> torch.Tensor:
    """[N, V] this rank's vocabulary shard of a model's logits at `rows` (no gather)."""
    if rows is not None:
        hidden = hidden[rows]
    return torch.matmul(hidden, causal_lm.lm_head.weight.t()).float()


class TRBForCausalLM(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.settings = settings = read_settings(config)
        student_cfg = copy.deepcopy(config)
        student_cfg.num_hidden_layers = settings.student_layers
        student_cfg.architectures = [settings.student_architecture]
        self.student = _model_class(student_cfg)(student_cfg, quant_config=quant_config,
                                                 prefix=prefix)
        self.teacher = None
        if settings.teacher_path:
            teacher_cfg = AutoConfig.from_pretrained(settings.teacher_path)
            teacher_cfg.vocab_size = config.vocab_size  # rows aligned in load_weights
            self.teacher = _model_class(teacher_cfg)(teacher_cfg, quant_config=quant_config,
                                                     prefix="teacher")
            _offset_layer_ids(self.teacher, settings.student_layers)
            self.secondary_weights = (DefaultModelLoader.Source(
                settings.teacher_path, None, prefix=TEACHER_PREFIX, fall_back_to_pt=True),)
        parallel = get_parallel()
        self.shard = Shard.equal_split(
            group=parallel.tp_group.device_group, rank=parallel.tp_rank, world=parallel.tp_size,
            width=self.student.lm_head.weight.shape[0],
            layout=VocabLayout(size=settings.vocab_size, stop_ids=settings.stop_ids))
        self.register_buffer("eps_rows", torch.zeros(settings.max_rows), persistent=False)
        self.register_buffer("until_rows", torch.zeros(settings.max_rows, dtype=torch.int64),
                             persistent=False)
        for name in REPORTED:
            self.register_buffer(f"{name}_rows", torch.zeros(settings.max_rows),
                                 persistent=False)

    def prepare_for_forward(self, forward_batch) -> None:
        """Called by SGLang's ModelRunner before every forward and CUDA-graph replay: the
        batch's budgets and teacher-prefix ends into the static per-row buffers."""
        if self.teacher is not None:
            fill_rows(self.eps_rows, self.until_rows, forward_batch.sampling_info.custom_params,
                      forward_batch.batch_size, self.settings.default_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None,
                get_embedding=False, pp_proxy_tensors=None):
        rows = _last_rows(forward_batch)
        hidden_s = self.student.model(input_ids, positions, forward_batch)
        s_NV = _local_logits(self.student, hidden_s, rows)
        n = s_NV.shape[0]
        t_NV = from_teacher = None
        if self.teacher is not None:
            hidden_t = self.teacher.model(input_ids, positions, forward_batch)
            t_NV = _local_logits(self.teacher, hidden_t, rows)
            drawn_at = (positions if rows is None else positions[rows]) + 1
            from_teacher = drawn_at < self.until_rows[:n]
        behaviour = token_behaviour(s_NV, t_NV, self.eps_rows[:n], from_teacher,
                                    shard=self.shard, iterations=self.settings.iterations,
                                    dtype=torch.float32)
        reported = {"source": behaviour.source, **behaviour.stats()}
        for name in REPORTED:
            getattr(self, f"{name}_rows")[:n].copy_(reported[name])
        logits = tensor_model_parallel_all_gather(behaviour.logits, dim=-1)
        return LogitsProcessorOutput(next_token_logits=logits[:, : self.config.vocab_size])

    def load_weights(self, weights):
        """Route "teacher."-prefixed names (the secondary weights, loaded once) to the
        teacher, with its vocabulary rows aligned; everything else (the initial load and every
        trainer update) goes to the student only."""
        student, teacher = [], []
        for name, tensor in weights:
            which, inner = route(name)
            if which == "teacher":
                teacher.append((inner, align_vocab_rows(inner, tensor, self.config.vocab_size,
                                                        self.settings.vocab_size)))
            else:
                student.append((inner, tensor))
        if teacher and self.teacher is None:
            raise ValueError("teacher weights given to a student-only TRBForCausalLM")
        if student:
            self.student.load_weights(iter(student))
        if teacher:
            self.teacher.load_weights(iter(teacher))


def _report_stats(original, runner, logits_output, forward_batch, *args, **kwargs):
    """Hand each request's token source, beta and KLs of this step to the scheduler (customized
    info, returned to the client as meta_info["trb_source"], ["trb_beta"], ...; zeros for a
    student-only model). Runs after the forward, outside any CUDA graph."""
    model = runner.model
    if isinstance(model, TRBForCausalLM):
        n = forward_batch.batch_size
        logits_output.customized_info = {
            meta_key(name): getattr(model, f"{name}_rows")[:n].tolist() for name in REPORTED}
    return original(runner, logits_output, forward_batch, *args, **kwargs)


def register() -> None:
    """The `sglang.srt.plugins` entry point, run by SGLang in every one of its processes: make
    TRBForCausalLM resolvable, install the statistics hook and, without CUDA, the CPU
    adaptations (cpu_backend.install)."""
    cpu_backend.install()
    ModelRegistry.models[ARCHITECTURE] = TRBForCausalLM
    HookRegistry.register("sglang.srt.model_executor.model_runner.ModelRunner.sample",
                          _report_stats, HookType.AROUND)


EntryClass = TRBForCausalLM
