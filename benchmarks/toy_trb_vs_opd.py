"""The embedded toy task with trb, opd and fixed_eps, several seeds each, the same budget.

    .venv/bin/python benchmarks/toy_trb_vs_opd.py [--seeds 0 1 2] [--steps N] [--out runs/bench_toy]
        [--jobs J --nproc P] [section.key=value ...]

Every run is `bash examples/run_trb_distill.sh` (the toy default: 2 gloo processes, TP=2) with
overrides; results come from each run's metrics.jsonl and summary.json. Prints held-out pass@1
at the evaluation steps and at the end (mean and spread over seeds) and writes
OUT/curves.png overlaying all runs. About 8 minutes per run on 2 cores; on 2 cores the fastest
way through the 9 runs is `--jobs 2 --nproc 1 parallel.tensor_parallel=1` (results do not depend
on the layout: rollouts and steps are layout-invariant, tested). Each run's output goes to
OUT/<method>_s<seed>.log; a run whose summary.json says it finished is reused, so rerunning
the same command after a failure only runs what is missing. Never part of the test suite. On
this task TRB and OPD are expected within noise of each other (docs/toy.md).
"""

import argparse
import concurrent.futures
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


def run(method: str, seed: int, args, port: int) -> Path:
    run_dir = ROOT / args.out / f"{method}_s{seed}"
    overrides = [f"method.name={method}", f"train.seed={seed}", f"train.run_dir={run_dir}",
                 *args.overrides]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    env = {**os.environ, "MASTER_PORT": str(port), "NPROC_PER_NODE": str(args.nproc)}
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "done":
        print(f"{method} seed {seed}: finished before, reusing {run_dir}", flush=True)
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    print(f"{method} seed {seed}: running, log {log}", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(["bash", str(ROOT / "examples" / "run_trb_distill.sh"), *overrides],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{method} seed {seed} failed (exit {done.returncode}); see {log}")
    print(f"{method} seed {seed}: done", flush=True)
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
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    out = ROOT / args.out
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {m: [pool.submit(run, m, s, args, 29600 + 10 * i + s) for s in args.seeds]
                   for i, m in enumerate(METHODS)}
        runs = {m: [f.result() for f in fs] for m, fs in futures.items()}
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
