"""Megatron DDP + optimizer for the student, and the learning-rate schedule.

The schedule is a pure function of the step (linear warmup from 0, then constant or cosine to
min_lr), so a checkpoint needs only the step to restore it.
"""

import math

from trb_megatron.config import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """LR used by optimiser step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def wrap_and_optimize(model, cfg: OptimConfig, groups):
    """(DDP-wrapped student, Megatron AdamW optimizer). The teacher never comes here."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(use_distributed_optimizer=cfg.distributed_optimizer),
        model, pg_collection=groups)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                        weight_decay=cfg.weight_decay, decoupled_weight_decay=True,
                        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
                        adam_eps=cfg.adam_eps, clip_grad=cfg.grad_clip,
                        params_dtype=model.config.params_dtype,
                        bf16=model.config.bf16, fp16=model.config.fp16,
                        use_distributed_optimizer=cfg.distributed_optimizer),
        [ddp], use_gloo_process_groups=False, pg_collection=groups)
    return ddp, optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
