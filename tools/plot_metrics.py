"""Plot training curves of one or more runs on top of each other (e.g. TRB vs OPD).

    python tools/plot_metrics.py runs/toy_trb runs/toy_opd [--out runs/compare.png]

Reads RUN/metrics.jsonl of every run and writes one PNG with five panels: loss and exact
reverse KL, eps and mean beta, evaluation accuracy (when logged), response length and the
longest teacher prefix, and TrOPD's trust mask (kept and outlier fractions of student tokens,
teacher-prefix fraction of response tokens; tropd and trb_tropd runs). The
evaluation panel plots accuracy against optimiser steps completed, each evaluation marked: the
student's accuracy before training (RUN/summary.json's student_accuracy_before, once the run has
written it) at 0, then the evaluations logged during training (an evaluation in the record of
step k measured the weights after k + 1 steps). Runs whose directory names differ only in a
`_s<seed>` suffix (benchmarks/toy_trb_vs_opd.py: trb_s0, trb_s1, ...) are one method: same
colour, one legend entry.
"""

import argparse
import collections
import json
import re
import sys
from pathlib import Path

EVAL = "eval/accuracy"
PANELS = (("loss / reverse KL", ("loss", "reverse_kl")), ("eps and beta", ("eps", "beta_mean")),
          ("eval accuracy", (EVAL,)), ("lengths", ("response_len_mean", "prefix_len_max")),
          ("trust mask and teacher prefixes", ("tropd_trust_frac", "tropd_outlier_frac",
                                               "teacher_prefix_frac")))
STYLES = ("-", "--", ":")


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(run_dir) -> dict[str, list[tuple]]:
    """{metric: [(step, value), ...]} of one run for every plotted metric; EVAL's steps are
    optimiser steps completed, starting with the accuracy before training at 0 when
    summary.json records it."""
    records = read_metrics(run_dir)
    points = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None]
              for _, keys in PANELS for key in keys}
    summary = Path(run_dir) / "summary.json"
    before = json.loads(summary.read_text()).get("student_accuracy_before") \
        if summary.is_file() else None
    evaluations = [(step + 1, value) for step, value in points[EVAL]]
    points[EVAL] = ([(0, before)] if before is not None else []) + evaluations
    return points


def method_of(run_name: str) -> str:
    """'trb_s2' -> 'trb': the run's name without its seed suffix."""
    return re.sub(r"_s\d+$", "", run_name)


def figure(run_dirs):
    """The matplotlib Figure of the runs' curves: one panel per PANELS entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: curves(d) for d in run_dirs}
    sizes = collections.Counter(method_of(name) for name in runs)  # first-seen order
    groups = list(sizes)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        labelled = set()
        for name, points_by_key in runs.items():
            group = method_of(name)
            color = f"C{groups.index(group) % 10}"
            for key in keys:
                if points_by_key[key]:
                    steps, values = zip(*points_by_key[key])
                    style = STYLES[keys.index(key)]
                    label = None
                    if (group, key) not in labelled:
                        labelled.add((group, key))
                        runs_note = f" ({sizes[group]} runs)" if sizes[group] > 1 else ""
                        label = f"{group}{runs_note}: {key}"
                    ax.plot(steps, values, style, color=color, alpha=0.8, label=label,
                            marker="o" if key == EVAL else None, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("steps completed" if keys == (EVAL,) else "step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs, out) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: FIRST_RUN/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.out or Path(args.runs[0]) / "curves.png")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
