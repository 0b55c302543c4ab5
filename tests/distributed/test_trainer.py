"""The training loop end to end on real gloo processes (TP=2): 4 steps straight equal 2 steps +
kill + resume 2 steps bit for bit; SIGTERM checkpoints and stops cleanly; a non-finite loss stops
the run with the last good checkpoint intact; metrics carry every documented key."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.hf_models import make_hf_model
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.config import (Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 RolloutConfig, TRBConfig, TrainConfig)
from trb_megatron.training.trainer import Trainer, check_layout

pytestmark = pytest.mark.megatron

KEYS = {"step", "eps", "loss", "reverse_kl", "beta_mean", "beta_p50", "beta_p90",
        "teacher_feasible_frac", "kl_to_student_max", "response_len_mean",
        "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout_s", "time_teacher_s",
        "time_train_s", "time_sync_s", "lr", "grad_norm"}
PROMPTS = [[2, 3 + i, 10 + i, 20 + 2 * i] for i in range(12)]


def _config(root, run, steps, **train):
    return Config(
        model=ModelConfig(student=str(root / "student"), teacher=str(root / "teacher")),
        parallel=ParallelConfig(tensor_parallel=2),
        trb=TRBConfig(method="trb", eps0=0.5, anneal_steps=3),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=6),
        loss=LossConfig(estimator="topk", topk=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=steps, prompts_per_step=2, micro_batch_size=2, seed=7,
                          run_dir=str(root / run), progress=False, **train))


def _run(config, evaluate=None):
    trainer = Trainer(config, PROMPTS, evaluate=evaluate)
    try:
        return trainer.run()
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def _metrics(root, run):
    lines = (root / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _weights(path):
    with parallel_layout(1, 1) as groups:
        _, model = load_megatron(path, groups)
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _body(rank, world, root):
    root = Path(root)
    hf_to_megatron(root / "hf-student", root / "student", progress=False)
    hf_to_megatron(root / "hf-teacher", root / "teacher", progress=False)

    assert _run(_config(root, "straight", 4, save_every=2)) == "done"
    assert _run(_config(root, "resumed", 2)) == "done"  # the "killed" run: stops after 2
    assert _run(_config(root, "resumed", 4)) == "done"  # resumes from step 2

    def preempt_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    assert _run(_config(root, "preempted", 4, eval_every=1), preempt_at_2) == "preempted"
    assert _run(_config(root, "preempted", 4)) == "done"

    straight = _metrics(root, "straight")
    for run in ("resumed", "preempted"):
        records = _metrics(root, run)
        assert [r["step"] for r in records] == [0, 1, 2, 3], run
        for a, b in zip(straight, records):
            for key in ("loss", "reverse_kl", "grad_norm", "beta_mean", "eps"):
                assert a[key] == b[key], (run, a["step"], key)
        final = _weights(root / run / "checkpoints" / "step_000004")
        reference = _weights(root / "straight" / "checkpoints" / "step_000004")
        for key, value in reference.items():
            assert torch.equal(value, final[key]), (run, key)
    assert KEYS <= set(straight[0])
    assert [r["eps"] for r in straight] == pytest.approx([0.5, 0.5 * 2 / 3, 0.5 / 3, 0.0])
    assert all(r["kl_to_student_max"] <= r["eps"] + 1e-6 for r in straight)
    assert straight[-1]["beta_mean"] == 0.0 and straight[0]["beta_mean"] > 0
    assert not (root / "straight" / "checkpoints" / "step_000004.partial").exists()
    assert (root / "straight" / "checkpoints" / "latest").read_text() == "step_000004"

    with pytest.raises(RuntimeError, match="non-finite .* last good checkpoint .*step_000001"):
        _run(dataclasses.replace(_config(root, "diverged", 3, save_every=1),
                                 optim=OptimConfig(lr=1e30, warmup_steps=0, grad_clip=0.0)))
    assert (root / "diverged" / "checkpoints" / "latest").read_text() == "step_000001"
    dist.barrier()


def test_resume_preemption_and_divergence(tmp_path):
    make_hf_model(tmp_path / "hf-student", "qwen3", seed=1)
    make_hf_model(tmp_path / "hf-teacher", "qwen3", seed=2)
    run_distributed(_body, 2, str(tmp_path))


def test_invalid_layouts_are_rejected_before_building(tmp_path):
    for role, seed in (("student", 1), ("teacher", 2)):
        make_hf_model(tmp_path / role / "hf", "qwen3", seed=seed)
    config = _config(tmp_path, "run", 1)
    with pytest.raises(ValueError, match="world size 3 is not divisible by TP=2 x PP=1"):
        check_layout(config, 3)
    config.parallel.tensor_parallel = 4
    with pytest.raises(ValueError, match="model.student .*TP=4 does not divide "
                                         "num_key_value_heads=2"):
        check_layout(config, 4)
    config.parallel = ParallelConfig(tensor_parallel=1, pipeline_parallel=3)
    with pytest.raises(ValueError, match="PP=3 does not divide num_hidden_layers=2"):
        check_layout(config, 3)
    config.parallel = ParallelConfig(tensor_parallel=1)
    with pytest.raises(ValueError, match="prompts_per_step=2 is not divisible by the "
                                         "data-parallel size 4"):
        check_layout(config, 4)
