"""Checks on a finished main job's run directory shared by the job tests of both rollout
backends (tests/distributed/test_launcher.py: megatron; tests/sglang/test_job.py: SGLang)."""

import json
import math
from pathlib import Path

TROPD_OVERRIDES = ["method.name=tropd", "method.prefix_anneal_steps=1"]
"""The miniature toy's tropd run: 2 steps, the longest prefix 48 at step 0 and 0 from step 1."""


def check_tropd_run(run_dir: Path, output: str):
    """Two steps of the tropd preset with its prefix schedule at 0 from step 1: teacher
    prefixes at step 0 only, every metric finite, the engine's log-probs the trainer's."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1], output
    for record in records:
        numbers = [v for v in record.values() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers), record
        assert {"tropd_trust_frac", "tropd_outlier_frac", "tropd_reward_mean", "loss_trust",
                "loss_outlier", "loss_prefix"} <= set(record)
        assert record["rollout_logprob_diff_max"] <= 1e-3, record
    assert records[0]["prefix_len_max"] == 48 and records[0]["teacher_prefix_frac"] > 0
    assert records[1]["prefix_len_max"] == 0 and records[1]["teacher_prefix_frac"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["method"].startswith("tropd: teacher_prefix")
