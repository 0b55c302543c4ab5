"""Plot training curves of one or more runs on top of each other (e.g. TRB vs OPD).

    python tools/plot_metrics.py runs/toy_trb runs/toy_opd [--out runs/compare.png]

Reads RUN/metrics.jsonl of every run and writes one PNG with four panels: loss and exact
reverse KL, eps and mean beta, evaluation accuracy (when logged), response length.
"""

import argparse
import json
import sys
from pathlib import Path

PANELS = (("loss / reverse KL", ("loss", "reverse_kl")), ("eps and beta", ("eps", "beta_mean")),
          ("eval accuracy", ("eval/accuracy",)), ("response length", ("response_len_mean",)))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {run_dir} a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs, out) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for name, records in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    style = "-" if key == keys[0] else "--"
                    ax.plot(steps, values, style, label=f"{name}: {key}")
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
