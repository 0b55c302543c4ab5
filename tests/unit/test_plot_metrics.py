"""tools/plot_metrics.py: curves of several runs in one PNG, seeds of a method grouped, the
evaluation curve from the accuracy before training on, each evaluation marked."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.plot_metrics import EVAL, curves, figure, main, method_of, plot_runs  # noqa: E402


def _write_run(run_dir: Path, eps0: float, steps: int = 6) -> Path:
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(steps):
            record = {"step": step, "loss": 1.0 / (step + 1), "reverse_kl": 1.0 / (step + 1),
                      "eps": eps0 * (1 - step / steps), "beta_mean": 0.5,
                      "response_len_mean": 40.0}
            if step % 3 == 2:
                record["eval/accuracy"] = 0.1 * step
            f.write(json.dumps(record) + "\n")
    return run_dir


def test_method_of_strips_only_a_seed_suffix():
    assert method_of("trb_s2") == "trb"
    assert method_of("fixed_eps_s10") == "fixed_eps"
    assert method_of("toy_trb") == "toy_trb"
    assert method_of("trb_seed") == "trb_seed"


def test_plot_runs_writes_a_png(tmp_path):
    runs = [_write_run(tmp_path / name, eps) for name, eps in
            (("trb_s0", 0.1), ("trb_s1", 0.1), ("opd_s0", 0.0))]
    out = plot_runs(runs, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_missing_run_directory_is_named(tmp_path, capsys):
    _write_run(tmp_path / "trb_s0", 0.1)
    with pytest.raises(SystemExit, match="not_a_run/metrics.jsonl does not exist"):
        main([str(tmp_path / "trb_s0"), str(tmp_path / "not_a_run")])


def test_evaluation_curve_starts_before_training(tmp_path):
    """Evaluations logged with the records of steps 2 and 5 measured the weights after 3 and 6
    steps; summary.json's accuracy before training is the point at 0."""
    run = _write_run(tmp_path / "trb_s0", 0.1)
    assert curves(run)[EVAL] == [(3, pytest.approx(0.2)), (6, pytest.approx(0.5))]
    (run / "summary.json").write_text(json.dumps({"student_accuracy_before": 0.05}))
    assert curves(run)[EVAL] == [(0, 0.05), (3, pytest.approx(0.2)), (6, pytest.approx(0.5))]
    # a resumed run's summary has no accuracy before training
    (run / "summary.json").write_text(json.dumps({"status": "done"}))
    assert curves(run)[EVAL][0][0] == 3


def test_tropd_runs_get_their_panel(tmp_path):
    import matplotlib.pyplot as plt

    run = _write_run(tmp_path / "tropd_s0", 0.0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 0.1, "tropd_trust_frac": 0.9,
                            "tropd_outlier_frac": 0.1, "teacher_prefix_frac": 0.3,
                            "prefix_len_max": 12}) + "\n")
    fig = figure([run, _write_run(tmp_path / "trb_s0", 0.1)])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        labels = [line.get_label() for line in panels["trust mask and teacher prefixes"].lines]
        assert labels == ["tropd: tropd_trust_frac", "tropd: tropd_outlier_frac",
                          "tropd: teacher_prefix_frac"]
        assert "tropd: prefix_len_max" in [line.get_label() for line in panels["lengths"].lines]
    finally:
        plt.close(fig)


def test_evaluations_are_marked(tmp_path):
    import matplotlib.pyplot as plt

    run = _write_run(tmp_path / "trb_s0", 0.1)
    (run / "summary.json").write_text(json.dumps({"student_accuracy_before": 0.05}))
    fig = figure([run])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes}
        (line,) = panels["eval accuracy"].lines
        assert line.get_marker() == "o"
        assert line.get_xydata().ravel().tolist() == pytest.approx([0, 0.05, 3, 0.2, 6, 0.5])
        assert all(line.get_marker() == "None" for line in panels["loss / reverse KL"].lines)
    finally:
        plt.close(fig)
