"""The trainer with rollout.backend=sglang end to end (2 gloo processes, trainer TP=2, one colocated
SGLang engine driven by TP rank 0): after every weight sync the engine samples from the trainer's
current student (rollout_logprob_diff_max within TOL at every step, the teacher-off restart
included), and a deliberately skipped sync shows up at once in the same metric. In the same
launch the trb and opd presets give the numbers recorded before the methods seam
(tests/pinned.py; three more engine starts).

TOL: the engine and the trainer compute log mu in float32 with different kernels (SGLang's
torch_native layers vs Megatron's, different summation orders); on these models the difference
is ~1e-6 (measured max 9.5e-7). One AdamW step at lr 1e-3 moves the log-probs by ~1e-3, so a
stale engine is 100x above TOL.

Run: .venv/bin/python -m pytest tests/sglang/test_weight_sync.py -q   (2 engine starts)
"""

import json
from pathlib import Path

import pytest

from tests.distributed.launcher import run_distributed
from tests.hf_models import make_hf_model
from tests.pinned import PROMPTS, check_pinned, pinned_config
from trb_megatron.config import (Config, MethodConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 RolloutConfig, SGLangConfig, TrainConfig)

TOL = 2e-5


def _config(root: Path) -> Config:
    return Config(
        model=ModelConfig(student=str(root / "student"), teacher=str(root / "teacher")),
        parallel=ParallelConfig(tensor_parallel=2),
        # eps 0.5, 0.25, then 0
        method=MethodConfig(name="trb", eps0=0.5, anneal_steps=2, estimator="full"),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=6, backend="sglang",
                              sglang=SGLangConfig(tp_size=1, max_running_requests=16,
                                                  max_total_tokens=4096)),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(steps=4, prompts_per_step=4, micro_batch_size=4, seed=7,
                          run_dir=str(root / "run"), save_every=2, progress=False))


def _body(rank, world, root):
    from megatron.core import parallel_state

    from trb_megatron.checkpoint.convert import hf_to_megatron
    from trb_megatron.training.trainer import Trainer

    root = Path(root)
    for name in ("student", "teacher"):
        hf_to_megatron(root / f"hf-{name}", root / name, progress=False)
    trainer = Trainer(_config(root), PROMPTS)
    try:
        status = trainer.run()
        sync = trainer.engine.sync_weights
        trainer.engine.sync_weights = lambda: None  # a deliberately skipped sync
        stale = trainer.train_step()
        trainer.step += 1
        trainer.engine.sync_weights = sync
        fresh = trainer.train_step()
        starts = trainer.engine.engine_starts
    finally:
        trainer.close()
        parallel_state.destroy_model_parallel()
    pinned = root / "pinned"
    for name in ("student", "teacher"):
        hf_to_megatron(pinned / f"hf-{name}", pinned / name, progress=False)
    for preset in ("trb", "opd"):
        trainer = Trainer(pinned_config(pinned, preset, "sglang"), PROMPTS)
        try:
            trainer.run()
        finally:
            trainer.close()
            parallel_state.destroy_model_parallel()
    if rank == 0:
        (root / "result.json").write_text(json.dumps(
            {"status": status, "stale": stale, "fresh": fresh, "starts": starts}))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_sync")
    make_hf_model(root / "hf-student", "qwen3", seed=0)
    make_hf_model(root / "hf-teacher", "qwen3", seed=1)
    make_hf_model(root / "pinned" / "hf-student", "qwen3", seed=1)
    make_hf_model(root / "pinned" / "hf-teacher", "qwen3", seed=2)
    run_distributed(_body, 2, str(root))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    return records, json.loads((root / "result.json").read_text()), root


def test_every_step_samples_the_trainers_weights(result):
    records, summary, _ = result
    assert summary["status"] == "done" and [r["eps"] for r in records] == [0.5, 0.25, 0.0, 0.0]
    for record in records:
        assert 0 <= record["rollout_logprob_diff_mean"] <= record["rollout_logprob_diff_max"]
        assert record["rollout_logprob_diff_max"] < TOL, record
    # the teacher ran in the warmup (blend) and not after: the engine restarted student-only
    assert records[0]["beta_mean"] > 0 and records[2]["beta_mean"] == 0
    assert summary["starts"] == 2


def test_a_skipped_sync_is_seen_and_a_sync_clears_it(result):
    _, summary, _ = result
    assert summary["stale"]["rollout_logprob_diff_max"] > 100 * TOL
    assert summary["fresh"]["rollout_logprob_diff_max"] < TOL


def test_trb_and_opd_give_the_numbers_recorded_before_the_methods_seam(result):
    root = result[2]
    check_pinned({preset: [json.loads(line) for line in (
        root / "pinned" / f"pinned-sglang-{preset}" / "metrics.jsonl").read_text().splitlines()]
                  for preset in ("trb", "opd")}, "sglang")
