"""Metrics of a few steps of the trb and opd presets, recorded on both rollout backends before
the methods seam existed (commit 0e11ea1, where the same runs were `trb.method=trb|opd`): the
refactor must give the same numbers. tests/distributed/test_trainer.py runs them on the
megatron backend, tests/sglang/test_weight_sync.py on SGLang.

Tiny Qwen3 student and teacher (tests/hf_models, seeds 1 and 2), TP=2 on 2 gloo processes,
topk k=8, eps0 0.01 annealed over 2 steps (an active budget: beta strictly inside (0, 1) at most
tokens), 2 prompts x 2 samples of 6 tokens per step, seed 7.
"""

from pathlib import Path

from trb_megatron.config import (Config, MethodConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 RolloutConfig, SGLangConfig, TrainConfig)

PROMPTS = [[2, 3 + i, 10 + i, 20 + 2 * i] for i in range(12)]
STEPS = {"trb": 3, "opd": 2}
KEYS = ("loss", "reverse_kl", "grad_norm", "beta_mean")
# (loss, reverse_kl, grad_norm, beta_mean) per step
RECORDED = {
    "megatron": {
        "trb": [(0.22920875747998556, 0.012108405431111654, 0.08365382248655641,
                 0.9160919512311617),
                (0.20922658840815225, 0.012307226657867432, 0.10788054081433038,
                 0.6405725553631783),
                (0.20782367388407388, 0.011531690756479899, 0.10676517461885231, 0.0)],
        "opd": [(0.2277268866697947, 0.012084166208902994, 0.08482486417183596, 0.0),
                (0.20935562252998352, 0.01222620407740275, 24.59728497665253, 0.0)],
    },
    "sglang": {
        "trb": [(0.20398556192715964, 0.011566460132598877, 0.0907838912454888,
                 0.9325565372904142),
                (0.20593619346618652, 0.011346797148386637, 0.08752163679113867,
                 0.6670660922924677),
                (0.17132077614466348, 0.011326253414154053, 0.07962018294806071, 0.0)],
        "opd": [(0.20535237590471903, 0.011549750963846842, 0.09387577580354893, 0.0),
                (0.20742500821749368, 0.011368930339813232, 0.08902861008926204, 0.0)],
    },
}
# float32 sums on another CPU's kernels may differ in the last bits; a changed token or a
# changed formula moves these by far more
RTOL = 1e-5


def pinned_config(root: Path, preset: str, backend: str) -> Config:
    rollout = RolloutConfig(samples_per_prompt=2, max_new_tokens=6, backend=backend,
                            sglang=SGLangConfig(tp_size=1, max_running_requests=16,
                                                max_total_tokens=4096))
    return Config(
        model=ModelConfig(student=str(root / "student"), teacher=str(root / "teacher")),
        parallel=ParallelConfig(tensor_parallel=2),
        method=MethodConfig(name=preset, eps0=0.01, anneal_steps=2, estimator="topk", topk=8),
        rollout=rollout, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=STEPS[preset], prompts_per_step=2, micro_batch_size=2, seed=7,
                          run_dir=str(root / f"pinned-{backend}-{preset}"), save_every=0,
                          progress=False))


def check_pinned(records_by_preset: dict, backend: str) -> None:
    """AssertionError naming the first metric that moved."""
    for preset, expected in RECORDED[backend].items():
        records = records_by_preset[preset]
        assert len(records) == len(expected), (preset, len(records))
        for step, (record, values) in enumerate(zip(records, expected)):
            for key, value in zip(KEYS, values):
                assert abs(record[key] - value) <= RTOL * abs(value), (
                    backend, preset, step, key, record[key], value)
