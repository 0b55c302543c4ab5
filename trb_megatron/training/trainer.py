"""The distillation loop: prompts -> rollout (the method's behaviour step: TRB blend, teacher
prefixes, the student alone) -> teacher scoring -> pipelined vocab-parallel step on the method's
objective -> metrics -> eval -> checkpoint.

Randomness is a function of (seed, step): sampling noise and every per-token draw are
counter-based (methods.seeds) and torch's generator is reseeded every step, so a resumed run
continues bit for bit from the model, optimizer, step and prompt position stored in the
checkpoint. SIGTERM (Slurm preemption) lets the current step finish, writes a checkpoint and
returns "preempted".
"""

import dataclasses
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from trb_megatron.checkpoint.convert import load_megatron
from trb_megatron.config import Config
from trb_megatron.methods.seeds import derive_seed, rollout_seed
from trb_megatron.models.arch import ModelArch
from trb_megatron.models.pairing import shared_vocab_layout
from trb_megatron.parallel import detect_profile, initialize_parallel
from trb_megatron.sglang_plugin.version import require_sglang
from trb_megatron.training.checkpointing import (latest_checkpoint, load_checkpoint,
                                                 save_checkpoint)
from trb_megatron.training.distill_step import DistillStep
from trb_megatron.training.metrics import MetricsLog, rollout_statistics
from trb_megatron.training.optim import learning_rate, set_learning_rate, wrap_and_optimize
from trb_megatron.training.prompt_order import PromptOrder


def check_layout(config: Config, world_size: int, arch_fallback_dir=None, *,
                 models=("student", "teacher")) -> int:
    """Reject a parallel layout before any model is built, with the numbers; returns DP.
    models: the roles whose model configs are checked (one not built yet is left out)."""
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP={tp} x PP={pp}")
    dp = world_size // (tp * pp)
    if config.train.prompts_per_step % dp:
        raise ValueError(f"train.prompts_per_step={config.train.prompts_per_step} is not "
                         f"divisible by the data-parallel size {dp} (= world {world_size} / "
                         f"(TP {tp} x PP {pp}))")
    fp8 = config.fp8
    for role in models:
        path = Path(getattr(config.model, role))
        try:
            arch = ModelArch.of_model_dir(path, arch_fallback_dir)
            arch.check_parallel(tp, pp)
        except ValueError as err:
            raise ValueError(f"model.{role} ({path}): {err}") from None
        if role == "student":
            for key, k in config.method.vocab_bounded().items():
                if k > arch.vocab_size:
                    raise ValueError(
                        f"{key}={k} exceeds the vocabulary of model.student ({path}: "
                        f"{arch.vocab_size} tokens): set {key} to at most {arch.vocab_size}")
        bf16_edges = max(fp8.bf16_layers_at_start, fp8.bf16_layers_at_end)
        in_fp8 = fp8.enabled and (role == "student" or fp8.teacher)
        if in_fp8 and bf16_edges > arch.num_layers // pp:
            raise ValueError(f"fp8.bf16_layers_at_start/end ({bf16_edges}) exceed the "
                             f"{arch.num_layers // pp} layers per pipeline stage of model.{role}")
    return dp


class Trainer:
    def __init__(self, config: Config, prompts, *, evaluate=None):
        """prompts: token-id lists. evaluate: optional callable(step) -> dict of metrics."""
        self.config = config.validate()
        if config.rollout.backend == "sglang":
            require_sglang()  # before any model is built; names the extra to install
        check_layout(config, dist.get_world_size() if dist.is_initialized() else 1)
        self.prompts, self.evaluate = [list(p) for p in prompts], evaluate
        profile = detect_profile().with_fp8(config.fp8)  # FP8 needs TE: fails here otherwise
        self.groups = initialize_parallel(
            profile, tensor_parallel_size=config.parallel.tensor_parallel,
            pipeline_parallel_size=config.parallel.pipeline_parallel, seed=config.train.seed)
        self.vocab = shared_vocab_layout(Path(config.model.student) / "hf",
                                         Path(config.model.teacher) / "hf")
        _, student = load_megatron(config.model.student, self.groups, trainable=True,
                                   profile=profile)
        _, self.teacher = load_megatron(config.model.teacher, self.groups,
                                        profile=profile if config.fp8.teacher else None)
        self.ddp, self.optimizer = wrap_and_optimize(student, config.optim, self.groups)
        self.method = config.build_method()
        self.distill = DistillStep(self.ddp, self.teacher, self.optimizer, self.groups,
                                   self.vocab, objective=self.method.objective,
                                   micro_batch_size=config.train.micro_batch_size,
                                   fused=profile.compile_trb)
        self.engine = self._rollout_engine(profile)
        self.order = PromptOrder(len(self.prompts), config.train.seed)
        self.step = 0
        self.run_dir = Path(config.train.run_dir)
        resume = latest_checkpoint(self.run_dir)
        if resume is not None:
            state = load_checkpoint(resume, self.ddp, self.optimizer)
            self.step, self.order.position = state["step"], state["prompt_position"]
            if dist.get_rank() == 0:
                print(f"resuming from {resume} at step {self.step} of {config.train.steps}",
                      flush=True)
        self.rank0 = dist.get_rank() == 0
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank0, resume_step=self.step,
                                  tensorboard=config.logging.tensorboard,
                                  wandb_project=config.logging.wandb_project or None,
                                  run_name=self.run_dir.name)
        if self.rank0:  # with the method's settings as this run resolved them
            resolved = dataclasses.replace(config, method=config.resolved_method())
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(dataclasses.asdict(resolved), sort_keys=False))
        self._stop_requested = False

    def _rollout_engine(self, profile):
        cfg = self.config
        if cfg.rollout.backend == "megatron":
            from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine

            return MegatronRolloutEngine(self.ddp.module, self.teacher, self.groups,
                                         vocab=self.vocab, pad_id=self.vocab.stop_ids[0],
                                         solver_tol=cfg.method.solver_tol,
                                         fused_solver=profile.compile_trb)
        from trb_megatron.rollout.sglang_engine import SGLangRolloutEngine, hf_source_dir

        student_dir = hf_source_dir(cfg.model.student)
        return SGLangRolloutEngine(
            self.ddp.module, ModelArch.from_hf_dir(student_dir), self.groups,
            settings=cfg.rollout.sglang, student_dir=student_dir,
            teacher_dir=hf_source_dir(cfg.model.teacher), vocab=self.vocab,
            pad_id=self.vocab.stop_ids[0], seed=cfg.train.seed)

    def train_step(self) -> dict:
        """One optimiser step at self.step; returns its metrics record."""
        cfg = self.config
        behaviour = self.method.behaviour.at(self.step)
        if not behaviour.teacher_runs:  # every schedule is non-increasing: done for good
            self.engine.release_teacher()
        torch.manual_seed(cfg.train.seed + self.step)
        indices = self.order.take(cfg.train.prompts_per_step, self.groups.dp.rank(),
                                  self.groups.dp.size())
        start = time.perf_counter()
        self.engine.sync_weights()
        sync_s = time.perf_counter() - start
        start = time.perf_counter()
        batch = self.engine.generate(
            [self.prompts[i] for i in indices], samples_per_prompt=cfg.rollout.samples_per_prompt,
            max_new_tokens=cfg.rollout.max_new_tokens, behaviour=behaviour,
            seed=rollout_seed(cfg.train.seed, self.step),
            prompt_offset=self.groups.dp.rank() * len(indices))
        rollout_s = time.perf_counter() - start
        lr = learning_rate(cfg.optim, self.step, cfg.train.steps)
        set_learning_rate(self.optimizer, lr)
        result = self.distill(batch, noise_seed=derive_seed(cfg.train.seed, "objective",
                                                            self.step))
        stats = rollout_statistics(batch, self.groups.dp)
        total_tokens = batch.tokens.numel() * self.groups.dp.size()
        return {
            "step": self.step, "eps": behaviour.eps, "prefix_len_max": behaviour.prefix_max,
            "loss": result.loss, "reverse_kl": result.reverse_kl,
            **{k: v for k, v in stats.items() if k != "response_tokens"},
            **result.objective_metrics,
            "rollout_tokens_per_s": stats["response_tokens"] / max(rollout_s, 1e-9),
            "train_tokens_per_s": total_tokens / max(result.train_seconds, 1e-9),
            "rollout_logprob_diff_mean": result.logprob_diff_mean,
            "rollout_logprob_diff_max": result.logprob_diff_max,
            "time_rollout_s": rollout_s, "time_teacher_s": result.teacher_seconds,
            "time_train_s": result.train_seconds, "time_sync_s": sync_s,
            "lr": lr, "grad_norm": result.grad_norm,
        }

    def _save(self):
        return save_checkpoint(self.run_dir, self.step, self.ddp, self.optimizer,
                               {"step": self.step, "prompt_position": self.order.position},
                               self.config.model.student, self.config.train.keep_checkpoints)

    def _preemption_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag)

    def run(self) -> str:
        """Train to config.train.steps; returns "done", or "preempted" after a SIGTERM."""
        cfg = self.config.train
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.rank0),
                   desc="distill")
        try:
            while self.step < cfg.steps:
                try:
                    record = self.train_step()
                except FloatingPointError as err:
                    last = latest_checkpoint(self.run_dir)
                    raise RuntimeError(
                        f"step {self.step}: {err}; stopping without saving. The last good "
                        f"checkpoint ({last or 'none yet'}) is intact: lower optim.lr or check "
                        "the data, then resume.") from None
                self.step += 1
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps) \
                        and self.evaluate is not None:
                    self.engine.sync_weights()  # evaluate the weights of this step
                    record.update(self.evaluate(self.step))
                self.metrics.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", eps=f"{record['eps']:.4f}",
                                beta=f"{record['beta_mean']:.3f}")
                preempted = self._preemption_requested()
                if preempted or self.step == cfg.steps or (
                        cfg.save_every and self.step % cfg.save_every == 0):
                    self._save()
                if preempted:
                    return "preempted"
            return "done"
        finally:
            bar.close()
            self.metrics.close()
            signal.signal(signal.SIGTERM, previous)

    def close(self) -> None:
        """Shut the rollout engine down (SGLang: its processes, which would otherwise keep this
        process from exiting). Call once the trainer and its engine are no longer needed."""
        self.engine.shutdown()

    def _on_sigterm(self, signum, frame):
        self._stop_requested = True
