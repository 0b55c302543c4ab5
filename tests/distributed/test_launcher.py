"""The main job end to end through both launcher forms exactly as users type them, on a
miniature toy (tests/conftest.py's mini_config: 2 gloo processes, TP=2, 2 steps; the bash form
with the toy's trb, the torchrun form with method.name=tropd), plus DRY_RUN for 4 nodes x 8 GPUs,
config errors from the command line, and a SIGKILLed job resumed."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.launcher import free_port as _port
from tests.job_checks import TROPD_OVERRIDES, check_tropd_run

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "run_trb_distill.sh"


def _env(config, **extra):
    return {**os.environ, "CONFIG": str(config), "MASTER_PORT": _port(), **extra}


def _check_run(run_dir: Path, output: str, evaluated: bool):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1], output
    assert records[0]["eps"] == 0.1 and ("eval/accuracy" in records[1]) == evaluated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done"
    assert summary["max_kl_minus_eps"] <= 1e-6 + 1e-8  # solver tol; KLs are stored in fp32
    accuracies = {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after"}
    assert accuracies <= set(summary) if evaluated else not accuracies & set(summary)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


def test_bash_form(mini_config):
    root, config = mini_config
    run_dir = root / "bash-run"
    done = subprocess.run(["bash", str(LAUNCHER), f"train.run_dir={run_dir}"],
                          env=_env(config), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_run(run_dir, done.stdout, evaluated=True)
    assert "summary:" in done.stdout


# The bash form runs the launcher with .venv's python whatever the caller's is: only the
# torchrun form (sys.executable) belongs to the megatron tier (scripts/test.sh).
@pytest.mark.megatron
def test_torchrun_form_with_tropd(mini_config):
    root, config = mini_config
    run_dir = root / "torchrun-run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", _port(), str(LAUNCHER), f"train.run_dir={run_dir}",
               "eval=null", "train.save_every=0", *TROPD_OVERRIDES]
    done = subprocess.run(command, env=_env(config, OMP_NUM_THREADS="1"), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_tropd_run(run_dir, done.stdout)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


def test_dry_run_for_four_nodes_of_eight_gpus():
    env = {**os.environ, "DRY_RUN": "1", "NNODES": "4", "NPROC_PER_NODE": "8",
           "CONFIG": str(ROOT / "examples" / "configs" / "qwen3_1p7b_from_8b.yaml")}
    done = subprocess.run(["bash", str(LAUNCHER)], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "32: TP=2 x PP=1 x DP=16" in done.stdout and "layout OK" in done.stdout
    # the layout comes from the published architectures; the absent weights are named
    assert "model.student=checkpoints/qwen3-1.7b-base: no such directory" in done.stdout
    bad = subprocess.run(["bash", str(LAUNCHER), "parallel.pipeline_parallel=5"], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "world size 32 is not divisible by TP=2 x PP=5" in bad.stderr


def test_missing_path_stops_before_torchrun():
    """A model override that does not exist while the toy default is active: one line naming the
    key, exit code 2, no worker started; DRY_RUN says the same instead of 'layout OK'."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "DRY_RUN")}
    for extra in ({"DRY_RUN": "1"}, {}):
        done = subprocess.run(["bash", str(LAUNCHER), "model.student=/nonexistent"],
                              env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        assert "error: model.student=/nonexistent: no such directory" in done.stderr, output
        assert "Traceback" not in output and "layout OK" not in output


@pytest.mark.parametrize("override, message", [
    ("method.eps=0.1", "unknown key(s) method.eps; valid keys of method: anneal_steps, behaviour"),
    ("trb.method=opd", "trb.method moved to method.name"),
    ("train.steps=many", "train.steps must be int, got 'many'"),
    ("method.estimator=forward", "method.estimator must be one of full, topk, sampled"),
    ("method.name=sft", "method.name must be one of the presets trb, opd, fixed_eps, tropd"),
    ("method.prefix_max=9000", "method.prefix_max must be in [0, rollout.max_new_tokens=7168]"),
    ("data=null", "the job needs a data section with its training prompts"),
])
def test_config_errors_name_the_key(override, message):
    env = {**os.environ, "DRY_RUN": "1",
           "CONFIG": str(ROOT / "examples" / "configs" / "qwen3_0p6b_from_4b.yaml")}
    done = subprocess.run(["bash", str(LAUNCHER), override], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_sigkill_loses_at_most_the_current_step(mini_config):
    """SIGKILL the whole job (launcher, torchrun, both ranks) right after its second checkpoint,
    rerun the same command: it resumes and ends with the metrics of an uninterrupted run."""
    root, config = mini_config
    args = ["train.steps=4", "train.save_every=1", "eval=null"]

    def launch(run_dir, log_name):
        log = root / log_name  # a file, not a pipe nobody reads while the test polls
        with open(log, "w") as f:
            job = subprocess.Popen(["bash", str(LAUNCHER), f"train.run_dir={run_dir}", *args],
                                   env=_env(config), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        return job, log

    def finish(run_dir, log_name):
        job, log = launch(run_dir, log_name)
        job.wait()
        return log.read_text()

    reference = root / "kill-reference"
    out = finish(reference, "kill-reference.log")
    assert (reference / "summary.json").exists(), out[-3000:]

    killed = root / "kill-run"
    job, log = launch(killed, "kill-run.log")
    latest = killed / "checkpoints" / "latest"
    while job.poll() is None and not (latest.exists() and latest.read_text() >= "step_000002"):
        time.sleep(0.05)
    # torchrun starts its workers in their own sessions: kill the whole tree, as a node crash would
    tree = [job.pid] + [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, log.read_text()[-3000:]  # killed mid-run
    assert not (killed / "summary.json").exists()

    out = finish(killed, "kill-resume.log")
    assert "resuming from " in out and "checkpoints/step_00000" in out, out[-3000:]
    assert json.loads((killed / "summary.json").read_text())["status"] == "done", out[-3000:]
    assert _losses(killed) == _losses(reference)
    assert [s for s, _ in _losses(killed)] == [0, 1, 2, 3]
