"""Typed run configuration: one keyword-only dataclass per component, each field documented where
it is declared; `validate()` raises ValueError naming the field and the fix.

`from_dict(Config, mapping)` builds a config from nested dicts (YAML), rejecting unknown keys with
the list of valid ones; values are type-checked against the annotations.
"""

import dataclasses
import math
import types
import typing
from pathlib import Path

from trb_megatron.data import DataConfig, names_local_path
from trb_megatron.parallel.profile import FP8_AMAX_ALGOS, FP8_FORMATS, FP8_RECIPES, FP8Settings
from trb_megatron.methods import BEHAVIOURS, ESTIMATORS, OBJECTIVES, OUTLIERS, PRESETS
from trb_megatron.methods.presets import MEANINGLESS, PART_KEYS


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    student: str
    """The student: a Hugging Face model directory (the job converts it once into
    RUN/converted/student) or a Megatron checkpoint (tools/convert_hf.py, or a training one)."""
    teacher: str
    """The frozen teacher, likewise; it must share the student's tokenizer."""


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """TP size: divides attention heads, KV heads and the padded vocabulary of both models."""
    pipeline_parallel: int = 1
    """PP size: divides the number of layers of both models."""


@dataclasses.dataclass(kw_only=True)
class MethodConfig:
    name: str = "trb"
    """The method preset: trb (TRB: blended rollouts, eps annealed linearly), opd (vanilla OPD),
    fixed_eps (blend at a constant eps), tropd (TrOPD: teacher prefixes + trust-masked K1),
    trb_tropd (TRB's blend with TrOPD's objective). Its parts can be overridden below."""
    behaviour: str = ""
    """How rollout tokens are drawn: student, trb_blend or teacher_prefix; "": the preset's."""
    objective: str = ""
    """How response tokens are scored: reverse_kl or tropd; "": the preset's."""
    eps_schedule: str = ""
    """trb_blend: linear (eps0 annealed to 0 over anneal_steps) or constant; "": the preset's
    (linear; constant for fixed_eps)."""
    eps0: float = 0.02
    """trb_blend: initial trust-region budget KL(mu || pi_S) in nats (paper default 0.02)."""
    anneal_steps: int = 50
    """trb_blend: K, optimiser steps of the linear anneal (paper default 50)."""
    solver_tol: float = 1e-6
    """trb_blend: absolute KL tolerance of the beta solver (nats)."""
    prefix_max: int = 0
    """teacher_prefix: L_0, the longest teacher prefix at step 0 (TrOPD: the maximum response
    length); 0: rollout.max_new_tokens."""
    prefix_anneal_steps: int = 0
    """teacher_prefix: steps over which the longest prefix is cosine-annealed to 0 (TrOPD: the
    whole run); 0: train.steps."""
    estimator: str = "topk"
    """reverse_kl: full (exact reverse KL), topk (the TRB paper's student top-k support) or
    sampled (K1)."""
    topk: int = 16
    """reverse_kl: k of the topk estimator (TRB paper: 16)."""
    outlier: str = "fkl"
    """tropd: the term of tokens the trust mask rejects: fkl (forward KL over the teacher's
    top-k, the paper's), clip (K1 with the reward clipped at -outlier_tau) or mask (K1 dropped
    where abs(reward) > outlier_tau)."""
    outlier_topk: int = 64
    """tropd: k of the fkl outlier term (paper: 64; at most the vocabulary)."""
    outlier_tau: float = 2.0
    """tropd: tau of the clip and mask outlier terms, nats (the paper gives none)."""
    prefix_weight: float = 0.001
    """tropd: weight of the K1 forward KL on teacher-prefix tokens (the TrOPD paper's beta,
    0.001)."""

    def preset_parts(self) -> dict:
        """behaviour, objective and eps_schedule: the preset's, unless set here."""
        if self.name not in PRESETS:
            raise ValueError(f"method.name={self.name!r} is not a preset; presets: "
                             f"{', '.join(PRESETS)}")
        preset = {"eps_schedule": "linear", **PRESETS[self.name]}
        return {key: getattr(self, key) or preset[key] for key in PART_KEYS}

    def resolve(self, *, train_steps: int, max_new_tokens: int) -> "MethodConfig":
        """Every setting explicit: the preset's parts filled in, prefix_max and
        prefix_anneal_steps from the run when 0 (what a run records in its config.yaml)."""
        return dataclasses.replace(
            self, **self.preset_parts(), prefix_max=self.prefix_max or max_new_tokens,
            prefix_anneal_steps=self.prefix_anneal_steps or train_steps)

    def vocab_bounded(self) -> dict:
        """{key: k} of the top-k sizes the chosen parts use, each at most the vocabulary (the
        trainer checks them against the models before building them)."""
        parts = self.preset_parts()
        bounded = {}
        if parts["objective"] == "reverse_kl" and self.estimator == "topk":
            bounded["method.topk"] = self.topk
        if parts["objective"] == "tropd" and self.outlier == "fkl":
            bounded["method.outlier_topk"] = self.outlier_topk
        return bounded

    def checks(self, *, train_steps: int, max_new_tokens: int) -> list:
        """(key, ok, rule) for validate()."""
        if self.name not in PRESETS:
            return [("method.name", False, f"one of the presets {', '.join(PRESETS)}")]
        parts = self.preset_parts()
        behaviour, objective = parts["behaviour"], parts["objective"]
        checks = [
            ("method.behaviour", behaviour in BEHAVIOURS, f"one of {', '.join(BEHAVIOURS)}"),
            ("method.objective", objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
            ("method.eps_schedule", parts["eps_schedule"] in ("linear", "constant"),
             "linear or constant"),
            ("method.eps0", math.isfinite(self.eps0) and self.eps0 >= 0, "finite, >= 0"),
            ("method.anneal_steps", self.anneal_steps >= 1, ">= 1"),
            ("method.solver_tol", self.solver_tol > 0, "> 0"),
            ("method.prefix_max", 0 <= self.prefix_max <= max_new_tokens,
             f"in [0, rollout.max_new_tokens={max_new_tokens}] (0: rollout.max_new_tokens)"),
            ("method.prefix_anneal_steps", self.prefix_anneal_steps >= 0,
             ">= 0 (0: train.steps)"),
            ("method.estimator", self.estimator in ESTIMATORS, f"one of {', '.join(ESTIMATORS)}"),
            ("method.topk", self.topk >= 1, ">= 1 (and at most the vocabulary)"),
            ("method.outlier", self.outlier in OUTLIERS, f"one of {', '.join(OUTLIERS)}"),
            ("method.outlier_topk", self.outlier_topk >= 1, ">= 1 (and at most the vocabulary)"),
            ("method.outlier_tau", math.isfinite(self.outlier_tau) and self.outlier_tau > 0,
             "finite, > 0"),
            ("method.prefix_weight", math.isfinite(self.prefix_weight)
             and self.prefix_weight >= 0, "finite, >= 0"),
        ]
        if self.eps_schedule and behaviour != "trb_blend":
            checks.append(("method.eps_schedule", False,
                           f"unset: it schedules behaviour trb_blend's eps, and the behaviour "
                           f"is {behaviour} (method.name={self.name})"))
        why = MEANINGLESS.get((behaviour, objective, self.estimator if objective == "reverse_kl"
                               else None))
        if why:
            checks.append(("method", False, f"a meaningful combination; behaviour {behaviour} "
                           f"with objective {objective} and estimator {self.estimator} is not: "
                           f"{why}"))
        return checks


@dataclasses.dataclass(kw_only=True)
class SGLangConfig:
    mode: str = "colocated"
    """colocated (an offline engine per model replica on the trainer's GPUs) or disaggregated
    (separately launched servers, weights broadcast over a NCCL weight-update group)."""
    servers: str = ""
    """disaggregated: comma-separated server URLs (http://host:port), one or more."""
    update_master: str = ""
    """disaggregated: host:port where trainer rank 0 hosts the weight-update group."""
    mem_fraction: float = 0.5
    """GPU memory fraction SGLang reserves for weights and KV cache (mem_fraction_static)."""
    max_running_requests: int = 256
    """Rows decoded at once; also the composite model's static buffers and CUDA-graph size."""
    solver_iterations: int = 10
    """Fixed Newton iterations of the in-graph beta solve (tests: 10 reach solve_beta on
    peaked logits; fewer return a smaller, still feasible beta)."""
    bucket_mib: int = 512
    """Weight-update bucket size in MiB (bounds the extra memory of a push)."""
    attention_backend: str = "fa3"
    """fa3 or triton (FlashInfer plans for one head count; the composite model has two). On a
    machine without CUDA the engine always uses torch_native."""
    tp_size: int = 0
    """Tensor-parallel size of each colocated engine; 0: the trainer's TP size."""
    max_total_tokens: int = 0
    """KV-cache pool size in tokens; 0: SGLang sizes it from mem_fraction on GPUs, and CPU
    engines take 16384 (on CPU SGLang would size it from the machine's free RAM)."""
    deterministic: bool = True
    """SGLang's deterministic inference: per-row sampling seeds are honoured (rollouts are
    reproducible and a resumed run repeats them); without it SGLang ignores the seeds."""


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    samples_per_prompt: int = 4
    """Rollouts per prompt (paper: 4)."""
    max_new_tokens: int = 256
    """Response length limit (paper: 7168)."""
    backend: str = "megatron"
    """megatron (the trainer's own models, CPU or GPU) or sglang (needs the sglang extra)."""
    sglang: SGLangConfig = dataclasses.field(default_factory=SGLangConfig)
    """Settings of the sglang backend (ignored by the megatron backend)."""


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 15
    """Linear warmup steps (paper: 15)."""
    decay_style: str = "constant"
    """After warmup: constant (paper) or cosine (to min_lr at the last step)."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay (paper: 0.01)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (paper: 1.0); 0 disables."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer)."""


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int
    """Optimiser steps to run in total (a resumed run continues to this number)."""
    prompts_per_step: int = 64
    """Prompts per optimiser step over all data-parallel ranks (paper: 64)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward microbatch on one data-parallel rank."""
    seed: int = 1234
    """Seeds prompt order, rollout sampling and initialisation."""
    run_dir: str = "runs/trb"
    """Metrics (metrics.jsonl), resolved config and checkpoints go here."""
    save_every: int = 1
    """Checkpoint every this many steps (and at the end, and on SIGTERM); 0: only those. 1: a
    crash loses at most the step it interrupts; raise it only when a checkpoint costs more than
    the steps it would save redoing."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk (older ones are deleted after a successful save)."""
    eval_every: int = 0
    """Run the evaluation hook every this many steps (and after the last); 0 disables."""
    progress: bool = True
    """Show a progress bar on rank 0."""


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN/tensorboard (needs the `logging` extra)."""
    wandb_project: str = ""
    """Also log to this wandb project; empty disables (needs the `logging` extra)."""


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    data: DataConfig
    """The held-out problems (answer_field required)."""
    samples: int = 4
    """Samples per problem; pass@1 is their mean correctness."""
    max_new_tokens: int = 256
    """Response length limit at evaluation (paper: 8192)."""
    verifier: str = "math"
    """math (math-verify on the last \\boxed{}), exact, or toy (the embedded toy task)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0); 0 is greedy."""
    before_training: bool = True
    """Also evaluate the student before training and the teacher, for the summary."""


@dataclasses.dataclass(kw_only=True)
class ToyConfig:
    out_dir: str = "runs/toy_models"
    """Where tools/make_toy_models.py's task, tokenizer and models are built (cached)."""
    seed: int = 0
    """Seed of the toy build (part of the cache key)."""


@dataclasses.dataclass(kw_only=True)
class Config:
    model: ModelConfig
    """Student and teacher."""
    train: TrainConfig
    """The loop: steps, batch, seed, run directory, checkpoints."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Tensor and pipeline parallel sizes (data parallel = world / (TP x PP))."""
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    """The distillation method: a preset (behaviour policy x objective) and its settings."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """Rollout sampling (temperature 1, no truncation)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Optional TensorBoard and wandb (metrics.jsonl is always written)."""
    data: DataConfig | None = None
    """Training prompts (required by the job; the Trainer API takes token ids directly)."""
    eval: EvalConfig | None = None
    """Evaluation; none: no accuracy is measured."""
    toy: ToyConfig | None = None
    """Build the embedded toy task and models before the job (cached)."""
    fp8: FP8Settings = dataclasses.field(default_factory=FP8Settings)
    """Transformer Engine FP8 (a GPU with Transformer Engine only; off by default)."""

    def validate(self) -> "Config":
        checks = [
            ("parallel.tensor_parallel", self.parallel.tensor_parallel >= 1, ">= 1"),
            ("parallel.pipeline_parallel", self.parallel.pipeline_parallel >= 1, ">= 1"),
            ("rollout.samples_per_prompt", self.rollout.samples_per_prompt >= 1, ">= 1"),
            ("rollout.max_new_tokens", self.rollout.max_new_tokens >= 1, ">= 1"),
            ("rollout.backend", self.rollout.backend in ("megatron", "sglang"),
             "megatron or sglang"),
            ("optim.lr", self.optim.lr > 0, "> 0"),
            ("optim.min_lr", 0 <= self.optim.min_lr <= self.optim.lr, "in [0, optim.lr]"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, ">= 0"),
            ("optim.decay_style", self.optim.decay_style in ("constant", "cosine"),
             "constant or cosine"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, ">= 0"),
            ("optim.grad_clip", self.optim.grad_clip >= 0, ">= 0"),
            ("train.steps", self.train.steps >= 1, ">= 1"),
            ("train.prompts_per_step", self.train.prompts_per_step >= 1, ">= 1"),
            ("train.micro_batch_size", self.train.micro_batch_size >= 1, ">= 1"),
            ("train.save_every", self.train.save_every >= 0, ">= 0"),
            ("train.keep_checkpoints", self.train.keep_checkpoints >= 1, ">= 1"),
            ("train.eval_every", self.train.eval_every >= 0, ">= 0"),
            ("fp8.format", self.fp8.format in FP8_FORMATS, f"one of {FP8_FORMATS}"),
            ("fp8.recipe", self.fp8.recipe in FP8_RECIPES, f"one of {FP8_RECIPES}"),
            ("fp8.margin", self.fp8.margin >= 0, ">= 0"),
            ("fp8.amax_history_len", self.fp8.amax_history_len >= 1, ">= 1"),
            ("fp8.amax_compute_algo", self.fp8.amax_compute_algo in FP8_AMAX_ALGOS,
             f"one of {FP8_AMAX_ALGOS}"),
            ("fp8.bf16_layers_at_start", self.fp8.bf16_layers_at_start >= 0, ">= 0"),
            ("fp8.bf16_layers_at_end", self.fp8.bf16_layers_at_end >= 0, ">= 0"),
            # Megatron-Core cannot keep edge layers in bf16 under delayed scaling.
            ("fp8.recipe", self.fp8.recipe != "delayed" or not (
                self.fp8.bf16_layers_at_start or self.fp8.bf16_layers_at_end),
             "tensorwise, blockwise or mxfp8 when fp8.bf16_layers_at_start/end > 0 (delayed "
             "scaling cannot keep layers in bf16)"),
        ]
        checks += self.method.checks(train_steps=self.train.steps,
                                     max_new_tokens=self.rollout.max_new_tokens)
        if self.eval is not None:
            checks += [("eval.samples", self.eval.samples >= 1, ">= 1"),
                       ("eval.max_new_tokens", self.eval.max_new_tokens >= 1, ">= 1"),
                       ("eval.temperature", self.eval.temperature >= 0, ">= 0")]
        if self.rollout.backend == "sglang":
            checks += _sglang_checks(self.rollout.sglang, self.parallel)
        bad = [f"{name} must be {rule}" for name, ok, rule in checks if not ok]
        if bad:
            raise ValueError("invalid config: " + "; ".join(bad))
        return self

    def resolved_method(self) -> MethodConfig:
        """method with every setting explicit (MethodConfig.resolve) for this run."""
        return self.method.resolve(train_steps=self.train.steps,
                                   max_new_tokens=self.rollout.max_new_tokens)

    def build_method(self):
        """The methods.Method this config runs."""
        from trb_megatron.methods import build_method

        resolved = self.resolved_method()
        return build_method(resolved.name, dataclasses.asdict(resolved))


def _sglang_checks(sg: SGLangConfig, parallel: ParallelConfig) -> list:
    disaggregated = sg.mode == "disaggregated"
    return [
        ("rollout.sglang.mode", sg.mode in ("colocated", "disaggregated"),
         "colocated or disaggregated"),
        ("rollout.sglang.servers", bool(sg.servers.strip()) == disaggregated,
         "set (comma-separated URLs) exactly when mode is disaggregated"),
        ("rollout.sglang.update_master", bool(sg.update_master.strip()) == disaggregated
         and (not disaggregated or sg.update_master.rpartition(":")[2].isdigit()),
         "host:port exactly when mode is disaggregated"),
        ("rollout.sglang.mem_fraction", 0 < sg.mem_fraction < 1, "in (0, 1)"),
        ("rollout.sglang.max_running_requests", sg.max_running_requests >= 1, ">= 1"),
        ("rollout.sglang.solver_iterations", sg.solver_iterations >= 1, ">= 1"),
        ("rollout.sglang.bucket_mib", sg.bucket_mib >= 1, ">= 1"),
        ("rollout.sglang.tp_size", sg.tp_size >= 0, ">= 0 (0: the trainer's TP size)"),
        ("rollout.sglang.max_total_tokens", sg.max_total_tokens >= 0,
         ">= 0 (0: SGLang's default sizing; 16384 on CPU)"),
        ("rollout.sglang.attention_backend", sg.attention_backend in ("fa3", "triton"),
         "fa3 or triton"),
        ("parallel.pipeline_parallel", parallel.pipeline_parallel == 1,
         "1 with rollout.backend=sglang (weights are pushed from one pipeline stage)"),
    ]


MOVED = {
    "trb.method": "method.name", "trb.eps0": "method.eps0",
    "trb.anneal_steps": "method.anneal_steps", "trb.solver_tol": "method.solver_tol",
    "loss.estimator": "method.estimator", "loss.topk": "method.topk",
}
MOVED_SECTIONS = {"trb": "method", "loss": "method"}
"""Sections and keys of earlier releases and where they live now (from_dict names them)."""


def from_dict(cls, data, prefix=""):
    """Build dataclass `cls` from a nested mapping; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = []
    for key, value in data.items():
        if prefix + key in MOVED_SECTIONS:
            section = prefix + key
            subs = sorted(value) if isinstance(value, dict) else []
            moved += [f"{section}.{sub} moved to {MOVED[f'{section}.{sub}']}"
                      if f"{section}.{sub}" in MOVED else
                      f"{section}.{sub}: the {section} section moved to "
                      f"{MOVED_SECTIONS[section]}" for sub in subs] or [
                f"the {section} section moved to {MOVED_SECTIONS[section]}"]
    if moved:
        raise ValueError("; ".join(moved) + " (method.name picks a preset: "
                         f"{', '.join(PRESETS)}; docs/configuration.md)")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys "
                         f"of {prefix.rstrip('.') or 'the config'}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        optional = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(optional) == 1:
            if value is None:
                kwargs[name] = None
                continue
            kind = optional[0]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def _coerce(value, kind, key):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides) -> dict:
    """Apply dotted `key.sub=value` overrides (values parsed as YAML scalars) to nested dicts."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path, overrides=()) -> Config:
    """Config from a YAML file plus dotted overrides, validated."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(Config, apply_overrides(data, overrides)).validate()


def missing_paths(config: Config) -> dict[str, str]:
    """{key: "key=path: no such ..."} for each local path of `config` that does not exist, for
    the launcher to stop on before any process starts: model.student, model.teacher, and
    data.path_or_name / eval.data.path_or_name where they can only be local paths
    (names_local_path; other values are dataset names). With a toy section the toy build's own
    outputs in toy.out_dir are not missing: the run builds them first."""
    from trb_megatron.toy.build import OUTPUTS

    built = set() if config.toy is None else {(Path(config.toy.out_dir) / name).resolve()
                                              for name in OUTPUTS}
    paths = {"model.student": (config.model.student, "directory"),
             "model.teacher": (config.model.teacher, "directory")}
    for key, data in (("data", config.data), ("eval.data", config.eval and config.eval.data)):
        if data is not None and names_local_path(data.path_or_name):
            paths[f"{key}.path_or_name"] = (data.path_or_name, "file or directory")
    return {key: f"{key}={path}: no such {kind}" for key, (path, kind) in paths.items()
            if not Path(path).exists() and Path(path).resolve() not in built}
