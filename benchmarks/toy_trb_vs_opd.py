"""The embedded toy task with trb, opd and fixed_eps, several seeds each, the same budget.

    .venv/bin/python benchmarks/toy_trb_vs_opd.py [--seeds 0 1 2] [--steps N] [--out runs/bench_toy]

Every run is `bash examples/run_trb_distill.sh` (the toy default, 2 gloo processes, TP=2) with
overrides; results come from each run's metrics.jsonl and summary.json. Prints held-out pass@1
at the evaluation steps and at the end (mean and spread over seeds) and writes
OUT/curves.png overlaying all runs. About 5-10 minutes per run on 2 cores. Never part of the
test suite; toy-calibration.md predicts TRB and OPD within noise of each other on this task.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.plot_metrics import plot_runs  # noqa: E402

METHODS = ("trb", "opd", "fixed_eps")


def run(method: str, seed: int, steps: int | None, out: Path, port: int) -> Path:
    run_dir = out / f"{method}_s{seed}"
    overrides = [f"trb.method={method}", f"train.seed={seed}", f"train.run_dir={run_dir}"]
    if steps:
        overrides.append(f"train.steps={steps}")
    env = {**os.environ, "MASTER_PORT": str(port)}
    subprocess.run(["bash", str(ROOT / "examples" / "run_trb_distill.sh"), *overrides],
                   check=True, cwd=ROOT, env=env)
    return run_dir


def _accuracy_by_step(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"] + 1: r["eval/accuracy"] for r in map(json.loads, lines)
            if "eval/accuracy" in r}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--out", default="runs/bench_toy")
    args = parser.parse_args()
    out = ROOT / args.out
    runs = {m: [run(m, s, args.steps, out, 29600 + 10 * i + s)
                for s in args.seeds] for i, m in enumerate(METHODS)}
    print(f"\n## toy task, held-out pass@1 (mean +- stdev over seeds {args.seeds})")
    steps = sorted(_accuracy_by_step(runs["trb"][0]))
    print(f"{'method':<11}{'before':>14}" + "".join(f"{'step ' + str(s):>14}" for s in steps))
    for method, dirs in runs.items():
        before = [json.loads((d / "summary.json").read_text())["student_accuracy_before"]
                  for d in dirs]
        per_step = [[_accuracy_by_step(d)[s] for d in dirs] for s in steps]
        cells = [before] + per_step

        def fmt(values):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f}+-{spread:.3f}"

        print(f"{method:<11}" + "".join(f"{fmt(c):>14}" for c in cells))
    print(f"wrote {plot_runs([d for dirs in runs.values() for d in dirs], out / 'curves.png')}")


if __name__ == "__main__":
    main()
