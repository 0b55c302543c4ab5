"""The Slurm tier: examples/slurm/trb_distill.sbatch itself, submitted to a real Slurm 22.05
cluster on this machine (scripts/local_slurm.sh: munged, slurmctld and 4 slurmd nodes with 8 fake
GPUs each as GRES, in a temporary directory), without a container (CONTAINER_RUNTIME=none):

- the script's own allocation (4 nodes x 8 GPUs, 64 CPUs per task, exclusive) is accepted by
  slurmctld and its DRY_RUN, run as a job, prints the launcher's plan;
- the miniature toy (tests/conftest.py's mini_config) trains at TP=2 over 2 nodes x 1 process and is
  preempted twice the ways a cluster does it, after its first checkpoint: the time-limit warning
  the script asks for (--signal=B:USR1@600, made due by shortening the job's time limit: the
  script passes SIGTERM to the training step and requeues the job itself) and a requeue by Slurm
  (`scontrol requeue`: SIGTERM to every process of the job, KillWait, then SIGKILL, as for a
  preemption with PreemptMode=REQUEUE). Each time the trainer finishes its step and writes a
  checkpoint, the requeued job says it resumes from that checkpoint, and the finished run's
  metrics equal those of an uninterrupted job of the same config bit for bit.

Needs root and Debian's slurm-wlm, slurmctld, slurmd, slurm-client and munge, which
`scripts/local_slurm.sh install` adds when missing (apt-get); skipped, saying why, where they
cannot be installed. Prints the measured times (-s shows them).

Run: .venv/bin/python -m pytest tests/distributed/test_slurm.py -q -s   (~3 min on 2 cores)
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "trb_distill.sbatch"
CLUSTER = ROOT / "scripts" / "local_slurm.sh"
# The miniature toy with short rollouts: 1.2-2 s a step on 2 cores. Both preemptions must land
# before the end: the time-limit signal comes up to 30 s after the limit is shortened (slurmctld's
# check period), i.e. up to ~25 steps after the first checkpoint on a quiet machine, and the
# requeue a few steps after the restart (14 steps were measured to finish before the first
# signal on a quiet machine).
STEPS = 45
TRAIN_ARGS = [f"train.steps={STEPS}", "train.save_every=3", "eval=null",
              "rollout.max_new_tokens=16"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
RESUMING = re.compile(r"resuming from (\S+)/step_(\d{6}) at step (\d+) of")


class Cluster:
    """The running cluster: Slurm's commands pointed at its config."""

    def __init__(self, directory: Path):
        mine = {"CONTAINER_RUNTIME", "TRB_IMAGE", "TRB_SHARED", "CONFIG", "RUN_DIR", "DRY_RUN"}
        self.env = {**{k: v for k, v in os.environ.items() if k not in mine},
                    "SLURM_CONF": str(directory / "slurm.conf")}

    def command(self, *args: str, env=None) -> str:
        done = subprocess.run(args, env=env or self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout.strip()

    def sbatch(self, *args: str, **environment: str) -> str:
        """Submit from the repository root (SLURM_SUBMIT_DIR, the checkout CONTAINER_RUNTIME=none
        runs) with this environment on top of ours; returns the job id."""
        env = {**self.env, **environment}
        return self.command("sbatch", "--parsable", *args, env=env)

    def state(self, job: str) -> str:
        text = self.command("scontrol", "show", "job", job)
        return re.search(r"JobState=(\S+)", text).group(1)

    def finished(self, *jobs: str) -> bool:
        return all(self.state(job) in ENDED for job in jobs)

    def wait(self, condition, timeout: float, what: str, *logs: Path) -> float:
        """Poll until condition() holds; returns the seconds waited. On a timeout, fail with
        what was awaited, the queue and the tails of the logs."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                tails = "\n".join(f"--- {log}\n{_read(log)[-3000:]}" for log in logs)
                queue = self.command("squeue", "-o", "%i %T %r %M %N")
                pytest.fail(f"no {what} within {timeout} s\n{queue}\n{tails}")
            time.sleep(0.5)
        return time.monotonic() - start


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root: munged and slurmd run as root")
    try:  # apt-get where packages are missing: a few seconds to a minute
        install = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True,
                                 text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        pytest.skip(f"installing Debian's Slurm and munge took over {err.timeout} s (apt-get)")
    if install.returncode != 0:
        pytest.skip("Debian's slurm-wlm, slurmctld, slurmd, slurm-client and munge could not "
                    f"be installed (apt-get): {(install.stderr + install.stdout)[-600:]}")
    directory = tmp_path_factory.mktemp("slurm")
    start = time.monotonic()
    try:
        up = subprocess.run(["bash", str(CLUSTER), "up", str(directory), "4"],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"\n[slurm] 4-node cluster up in {time.monotonic() - start:.1f} s")
        yield Cluster(directory)
    finally:  # every daemon and job process by PID, also after a failed start or test
        subprocess.run(["bash", str(CLUSTER), "down", str(directory)], timeout=120)


def _job_env(shared: Path, **extra: str) -> dict[str, str]:
    """The environment sbatch exports to the job: the host's Python environment of this test
    run first on PATH (CONTAINER_RUNTIME=none runs its python3), one thread per process."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "TRB_SHARED": str(shared), "OMP_NUM_THREADS": "1", **extra}


def test_the_scripts_own_allocation_is_accepted(slurm, tmp_path):
    """Its #SBATCH header as written (4 x 8 GPUs, 64 CPUs per task, --exclusive, --requeue,
    --signal) submitted unchanged, with the default runtime: DRY_RUN prints the plan."""
    models = ["model.student=/shared/models/qwen3-1.7b-base",
              "model.teacher=/shared/models/qwen3-8b", "data.path_or_name=/shared/prompts.jsonl"]
    job = slurm.sbatch(f"--chdir={tmp_path}", str(SBATCH), *models,
                       **_job_env(tmp_path, DRY_RUN="1"))
    out = tmp_path / f"trb-distill-{job}.out"
    slurm.wait(lambda: slurm.finished(job), 180, "end of the DRY_RUN job", out)
    text = _read(out)
    assert slurm.state(job) == "COMPLETED", text
    assert "container runtime: pyxis" in text
    assert "plan: 4 node(s) x 8 ranks = 32: TP=2 x PP=1 x DP=16" in text, text
    assert text.rstrip().endswith("layout OK"), text


def _records(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (rank 0 may be writing the next one)."""
    lines = _read(run_dir / "metrics.jsonl").split("\n")[:-1]
    return [json.loads(line) for line in lines if line]


def _computed(record: dict) -> dict:
    """A metrics record without what measures wall time (time_*, *_per_s)."""
    return {k: v for k, v in record.items() if not (k.startswith("time_") or k.endswith("_per_s"))}


@pytest.mark.timeout(900)  # the toy build (when this runs alone) and three job starts
def test_preempted_job_resumes_and_matches_an_uninterrupted_one(slurm, mini_config, tmp_path):
    _, config = mini_config
    t0 = time.monotonic()

    def submit(name: str) -> str:
        return slurm.sbatch("--nodes=2", "--gpus-per-node=1", f"--chdir={tmp_path}",
                            str(SBATCH), *TRAIN_ARGS,
                            **_job_env(tmp_path, CONTAINER_RUNTIME="none", CONFIG=str(config),
                                       RUN_DIR=str(tmp_path / name), RDZV_PORT=free_port()))

    job, reference = submit("preempted"), submit("reference")
    run = tmp_path / "preempted"
    out = tmp_path / f"trb-distill-{job}.out"
    node_logs = [run / "logs" / f"trb-distill-{job}-node{n}.log" for n in (0, 1)]
    logs = (out, *node_logs)

    def node_text() -> str:
        return "".join(_read(log) for log in node_logs)

    job_start = slurm.wait(lambda: "(restart 0)" in _read(out), 120, "batch script start", *logs)
    slurm.wait(lambda: (run / "checkpoints" / "latest").exists(), 300, "first checkpoint", *logs)

    # 1. The time limit: with 10 minutes left Slurm sends the warning signal the script asks for
    # (--signal=B:USR1@600); slurmctld checks time limits every 30 s.
    slurm.command("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    warned = slurm.wait(lambda: "signal: asking the trainer" in _read(out), 120,
                        "time-limit signal", *logs)
    done_at_signal = len(_records(run))
    # a normal limit again, or the requeued job would be warned again as soon as it starts
    slurm.command("scontrol", "update", f"JobId={job}", "TimeLimit=60")
    slurm.wait(lambda: "requeueing job" in _read(out), 300, "self-requeue", *logs)
    requeued = time.monotonic()
    slurm.wait(lambda: "(restart 1)" in _read(out), 300, "restart after the requeue", *logs)
    requeue_delay = time.monotonic() - requeued
    slurm.wait(lambda: len(RESUMING.findall(node_text())) == 1, 300, "resumption", *logs)
    first = RESUMING.findall(node_text())[0]

    # 2. A requeue by Slurm, as for a preemption: SIGTERM to every process of the job, SIGKILL
    # KillWait (120 s here) later, then the job goes back to the queue. Once it trains again:
    resumed_at = int(first[2])
    slurm.wait(lambda: len(_records(run)) > resumed_at, 300, "a step after resuming", *logs)
    done_at_requeue = len(_records(run))
    slurm.command("scontrol", "requeue", job)
    preempted = slurm.wait(lambda: "(restart 2)" in _read(out), 300,
                           "restart after scontrol requeue", *logs)
    slurm.wait(lambda: slurm.finished(job, reference), 420, "end of both jobs", *logs)
    for one in (job, reference):
        assert slurm.state(one) == "COMPLETED", _read(tmp_path / f"trb-distill-{one}.out")
    wall = time.monotonic() - t0
    print(f"\n[slurm] job start {job_start:.1f} s after sbatch; time-limit signal "
          f"{warned:.1f} s after the limit was shortened; requeue delay {requeue_delay:.1f} s "
          f"(the script's requeue -> running); scontrol requeue -> running again "
          f"{preempted:.1f} s (checkpoint included); preemption test {wall:.0f} s")

    # the trainer finished its step and wrote a checkpoint on each signal, and the requeued job
    # resumed from exactly that checkpoint: no completed step was lost
    text, batch = node_text(), _read(out)
    assert text.count("preempted: a checkpoint was written") == 2, text[-4000:]
    # rank 0, which prints, may run on either node after a restart
    resumed = sorted(RESUMING.findall(text), key=lambda match: int(match[2]))
    assert len(resumed) == 2, text[-4000:]
    for (directory, name, step), done in zip(resumed, (done_at_signal, done_at_requeue)):
        assert directory == str(run / "checkpoints") and int(name) == int(step) >= done, resumed
    assert int(resumed[0][2]) < int(resumed[1][2]) < STEPS
    assert batch.count("signal: asking the trainer to checkpoint") == 2, batch
    assert batch.count("requeueing job") == 1, batch  # the time limit; Slurm requeues preemptions
    assert "no container:" in batch and "(restart 2)" in batch
    assert all(log.stat().st_size > 0 for log in node_logs)  # RUN_DIR/logs/, as cluster.md says
    assert json.loads((run / "summary.json").read_text())["status"] == "done"

    # the result is that of an uninterrupted run, bit for bit
    got, want = _records(run), _records(tmp_path / "reference")
    assert [r["step"] for r in got] == list(range(STEPS))
    assert [_computed(r) for r in got] == [_computed(r) for r in want]
