"""Multi-node launch without GPUs: two torchrun "nodes" of 2 gloo processes each, joined by
torchrun's c10d rendezvous on loopback exactly as on a cluster (examples/slurm/), run the main job
(examples/run_trb_distill.sh) for two steps of the miniature toy at TP=2 x DP=2, and match a
single-node run of the same 4-rank layout step for step.

Run: .venv/bin/python -m pytest tests/distributed/test_multinode.py -q   (~2 min on 2 cores with
the miniature toy built; the toy build adds ~1 min when run alone)
"""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.distributed.launcher import free_port

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "run_trb_distill.sh"
# Both runs compute the same sums in the same order on CPU; what may differ is only how gloo
# orders a 2-rank all-reduce, which is exact for two addends. Allow float32 rounding noise.
RTOL = 1e-6
COMPARED = ("loss", "reverse_kl", "grad_norm", "beta_mean", "kl_to_student_max",
            "response_len_mean", "eps", "lr")


def _torchrun(nproc: int, run_dir: Path, *rendezvous: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous,
            "--nproc-per-node", str(nproc), str(LAUNCHER), f"train.run_dir={run_dir}",
            "eval=null"]


def _launch(commands, config, timeout=420):
    """Start every command at once (own process groups), wait, return their outputs; on a hang
    kill the groups this test started and fail with what they printed."""
    env = {**os.environ, "CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_match_one_node(mini_config):
    root, config = mini_config
    endpoint = f"127.0.0.1:{free_port()}"
    multi = root / "two-nodes"
    node = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1"]
    outputs = _launch([_torchrun(2, multi, *node), _torchrun(2, multi, *node)], config)
    # rank 0 (which prints the summary) ran on exactly one of the two nodes
    assert sum("summary:" in out for out in outputs) == 1, outputs[0][-2000:]

    single = root / "one-node"
    _launch([_torchrun(4, single, "--nnodes", "1", "--master-port", free_port())], config)

    got, want = _records(multi), _records(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1]
    for g, w in zip(got, want):
        for key in COMPARED:
            assert abs(g[key] - w[key]) <= RTOL * max(1.0, abs(w[key])), (key, g, w)
    assert g["loss"] != 0 and got[0]["loss"] != got[1]["loss"]  # the steps really trained
    for run in (multi, single):
        assert (run / "checkpoints" / "latest").read_text() == "step_000002"
        assert json.loads((run / "summary.json").read_text())["status"] == "done"
