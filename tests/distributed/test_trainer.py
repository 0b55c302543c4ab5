"""The training loop end to end on real gloo processes (TP=2): 4 steps straight equal 2 steps +
kill + resume 2 steps bit for bit, for trb and for tropd (its trust-mask draws and teacher
prefixes keyed by seed and step); SIGTERM checkpoints and stops cleanly; a non-finite loss stops
the run with the last good checkpoint intact; metrics carry every documented key; trb_tropd
composes TRB's rollouts with TrOPD's objective; the trb and opd presets give the numbers
recorded before the methods seam (tests/pinned.py)."""

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
from tests.pinned import PROMPTS, check_pinned, pinned_config
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.config import (Config, MethodConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 RolloutConfig, TrainConfig)
from trb_megatron.training.trainer import Trainer, check_layout

pytestmark = pytest.mark.megatron

KEYS = {"step", "eps", "prefix_len_max", "loss", "reverse_kl", "beta_mean", "beta_p50",
        "beta_p90", "teacher_feasible_frac", "kl_to_student_max", "teacher_prefix_frac",
        "response_len_mean", "rollout_tokens_per_s", "train_tokens_per_s", "time_rollout_s",
        "time_teacher_s", "time_train_s", "time_sync_s", "lr", "grad_norm",
        "rollout_logprob_diff_mean", "rollout_logprob_diff_max"}
TROPD_KEYS = {"tropd_trust_frac", "tropd_outlier_frac", "tropd_reward_mean", "loss_trust",
              "loss_outlier", "loss_prefix"}
COMPARED = ("loss", "reverse_kl", "grad_norm", "beta_mean", "eps", "teacher_prefix_frac")


def _config(root, run, steps, method=None, **train):
    return Config(
        model=ModelConfig(student=str(root / "student"), teacher=str(root / "teacher")),
        parallel=ParallelConfig(tensor_parallel=2),
        method=method or MethodConfig(name="trb", eps0=0.5, anneal_steps=3, estimator="topk",
                                      topk=8),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=6),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=steps, prompts_per_step=2, micro_batch_size=2, seed=7,
                          run_dir=str(root / run), progress=False, **train))


# prefix_max 6 cosine-annealed over 3 steps (6, 4, 1, 0); fkl over the teacher's top-16
TROPD = MethodConfig(name="tropd", prefix_anneal_steps=3, outlier_topk=16, prefix_weight=0.5)


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


def _check_resume(root, name, method):
    """4 steps straight == 2 steps, stop, resume to 4 == 4 steps with a SIGTERM at step 2."""
    straight, resumed, preempted = (f"{name}-{run}" for run in ("straight", "resumed",
                                                                 "preempted"))
    assert _run(_config(root, straight, 4, method, save_every=2)) == "done"
    assert _run(_config(root, resumed, 2, method)) == "done"  # the "killed" run: stops after 2
    assert _run(_config(root, resumed, 4, method)) == "done"  # resumes from step 2

    def preempt_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    assert _run(_config(root, preempted, 4, method, eval_every=1), preempt_at_2) == "preempted"
    assert _run(_config(root, preempted, 4, method)) == "done"

    reference = _metrics(root, straight)
    for run in (resumed, preempted):
        records = _metrics(root, run)
        assert [r["step"] for r in records] == [0, 1, 2, 3], run
        for a, b in zip(reference, records):
            for key in COMPARED:
                assert a[key] == b[key], (run, a["step"], key)
        final = _weights(root / run / "checkpoints" / "step_000004")
        weights = _weights(root / straight / "checkpoints" / "step_000004")
        for key, value in weights.items():
            assert torch.equal(value, final[key]), (run, key)
    return reference


def _body(rank, world, root):
    root = Path(root)
    hf_to_megatron(root / "hf-student", root / "student", progress=False)
    hf_to_megatron(root / "hf-teacher", root / "teacher", progress=False)

    straight = _check_resume(root, "trb", None)
    assert KEYS <= set(straight[0])
    assert [r["eps"] for r in straight] == pytest.approx([0.5, 0.5 * 2 / 3, 0.5 / 3, 0.0])
    assert all(r["kl_to_student_max"] <= r["eps"] + 1e-6 for r in straight)
    assert straight[-1]["beta_mean"] == 0.0 and straight[0]["beta_mean"] > 0
    assert all(r["teacher_prefix_frac"] == 0 and r["prefix_len_max"] == 0 for r in straight)
    assert not (root / "trb-straight" / "checkpoints" / "step_000004.partial").exists()
    assert (root / "trb-straight" / "checkpoints" / "latest").read_text() == "step_000004"

    tropd = _check_resume(root, "tropd", TROPD)
    assert KEYS | TROPD_KEYS <= set(tropd[0])
    assert [r["prefix_len_max"] for r in tropd] == [6, 4, 1, 0]
    assert tropd[0]["teacher_prefix_frac"] > 0 and tropd[-1]["teacher_prefix_frac"] == 0
    assert all(r["eps"] == 0 and r["beta_mean"] == 0 for r in tropd)  # policy tokens: student
    for r in tropd:
        assert 0 < r["tropd_trust_frac"] <= 1 and r["tropd_outlier_frac"] == pytest.approx(
            1 - r["tropd_trust_frac"])
        parts = r["loss_trust"] + r["loss_outlier"] + r["loss_prefix"]
        assert parts == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)
        assert r["rollout_logprob_diff_max"] <= 1e-3
    assert tropd[0]["loss_prefix"] != 0 and tropd[-1]["loss_prefix"] == 0
    resolved = (root / "tropd-straight" / "config.yaml").read_text()
    assert "behaviour: teacher_prefix" in resolved and "prefix_max: 6" in resolved

    # trb_tropd: TRB's blend in the rollouts, TrOPD's objective on its (student-side) tokens
    combined = MethodConfig(name="trb_tropd", eps0=0.5, anneal_steps=3, outlier_topk=16)
    assert _run(_config(root, "trb_tropd", 2, combined)) == "done"
    for r in _metrics(root, "trb_tropd"):
        assert r["eps"] > 0 and r["beta_mean"] > 0 and r["teacher_prefix_frac"] == 0
        assert r["kl_to_student_max"] <= r["eps"] + 1e-6 and r["loss_prefix"] == 0
        assert 0 < r["tropd_trust_frac"] <= 1 and r["rollout_logprob_diff_max"] <= 1e-3

    for preset in ("trb", "opd"):
        _run(pinned_config(root, preset, "megatron"))
    check_pinned({p: _metrics(root, f"pinned-megatron-{p}") for p in ("trb", "opd")},
                 "megatron")

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
    # top-k sizes of the parts in use are bounded by the student's vocabulary (120 tokens)
    for method, key in ((MethodConfig(name="tropd", outlier_topk=121), "method.outlier_topk"),
                        (MethodConfig(name="opd", topk=121), "method.topk")):
        with pytest.raises(ValueError, match=f"{key}=121 exceeds the vocabulary of "
                                             r"model.student \(.*: 120 tokens\)"):
            check_layout(dataclasses.replace(config, method=method), 1)
    # ... and only those: tropd's default k = 64 does not concern a trb run, nor trb's k a
    # tropd run with the clip outlier term
    check_layout(dataclasses.replace(config, method=MethodConfig(name="trb", outlier_topk=500)),
                 1)
    check_layout(dataclasses.replace(config, method=MethodConfig(name="tropd", outlier="clip",
                                                                 topk=500)), 1)
