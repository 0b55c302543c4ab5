"""Plot training curves of one or more runs on top of each other (e.g. TRB vs OPD).

    python tools/plot_metrics.py runs/toy_trb runs/toy_opd [--out runs/compare.png]

Reads RUN/metrics.jsonl of every run and writes one PNG with four panels: loss and exact
reverse KL, eps and mean beta, evaluation accuracy (when logged), response length. Runs whose
directory names differ only in a `_s<seed>` suffix (benchmarks/toy_trb_vs_opd.py: trb_s0,
trb_s1, ...) are one method: same colour, one legend entry.
"""

import argparse
import collections
import json
import re
import sys
from pathlib import Path

PANELS = (("loss / reverse KL", ("loss", "reverse_kl")), ("eps and beta", ("eps", "beta_mean")),
          ("eval accuracy", ("eval/accuracy",)), ("response length", ("response_len_mean",)))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def method_of(run_name: str) -> str:
    """'trb_s2' -> 'trb': the run's name without its seed suffix."""
    return re.sub(r"_s\d+$", "", run_name)


def plot_runs(run_dirs, out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    sizes = collections.Counter(method_of(name) for name in runs)  # first-seen order
    groups = list(sizes)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        labelled = set()
        for name, records in runs.items():
            group = method_of(name)
            color = f"C{groups.index(group) % 10}"
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    style = "-" if key == keys[0] else "--"
                    label = None
                    if (group, key) not in labelled:
                        labelled.add((group, key))
                        runs_note = f" ({sizes[group]} runs)" if sizes[group] > 1 else ""
                        label = f"{group}{runs_note}: {key}"
                    ax.plot(steps, values, style, color=color, alpha=0.8, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
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
