"""The main job as a user types it, with the toy's own rollout backend (SGLang): the bash launcher
on the miniature toy (tests/conftest.py's mini_config, which pins megatron for the tests that also
run on Python 3.12, overridden back here), Megatron-Core training at TP=2 on 2 gloo processes,
one colocated SGLang engine for the rollouts and for both evaluations; then the same job with
method.name=tropd (teacher prefixes decided inside the engine at step 0, none at step 1, where
the engine restarts student-only).

Run: .venv/bin/python -m pytest tests/sglang/test_job.py -q   (two jobs, three engine starts)
"""

import json
import os
import subprocess
from pathlib import Path

import yaml

from tests.distributed.launcher import free_port
from tests.job_checks import TROPD_OVERRIDES, check_tropd_run

ROOT = Path(__file__).resolve().parents[2]
TOY_CONFIG = ROOT / "examples" / "configs" / "toy_cpu.yaml"
# the engine and the trainer compute log mu with different float32 kernels: ~1e-6 on these
# models (test_weight_sync.py says why a stale engine would be far above this)
TOL = 2e-5


def _job(config, run_dir, *overrides) -> str:
    done = subprocess.run(
        ["bash", "examples/run_trb_distill.sh", "rollout.backend=sglang",
         f"train.run_dir={run_dir}", *overrides],
        env={**os.environ, "CONFIG": str(config), "MASTER_PORT": free_port()}, cwd=ROOT,
        capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_the_toy_job_runs_on_its_sglang_backend(mini_config):
    backend = yaml.safe_load(TOY_CONFIG.read_text())["rollout"]["backend"]
    assert backend == "sglang", "the toy default's backend is what this test runs"
    root, config = mini_config
    run_dir = root / "sglang-run"
    output = _job(config, run_dir)
    assert output.count("[sglang] engine 1 of replica 0 started (student + teacher, TP=1)") == 1

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:  # the engine sampled from the trainer's current student
        assert 0 <= record["rollout_logprob_diff_mean"] <= record["rollout_logprob_diff_max"] < TOL
        assert 0 < record["beta_mean"] <= 1 and record["kl_to_student_max"] <= record["eps"] + 1e-5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["max_kl_minus_eps"] <= 1e-6 + 1e-8
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0 <= summary[key] <= 1, key  # measured through the engine
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


def test_the_toy_job_runs_tropd_on_the_sglang_backend(mini_config):
    root, config = mini_config
    run_dir = root / "sglang-tropd"
    output = _job(config, run_dir, "eval=null", "train.save_every=0", *TROPD_OVERRIDES)
    check_tropd_run(run_dir, output)
    assert "started (student + teacher, TP=1)" in output and "started (student only" in output
