"""MetricsLog on resume: records of steps the run redoes are dropped, a last line cut by a kill
mid-write is ignored, other damage is named."""

import json

import pytest

from trb_megatron.training.metrics import MetricsLog


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_redone_steps_and_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(4))
    path.write_text(whole + '{"step": 4, "lo')  # killed while writing step 4
    log = MetricsLog(tmp_path, enabled=True, resume_step=2)
    assert [r["step"] for r in _lines(path)] == [0, 1]
    log.log({"step": 2, "loss": 0.5})
    log.close()
    assert [r["step"] for r in _lines(path)] == [0, 1, 2]


def test_damage_before_the_last_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        MetricsLog(tmp_path, enabled=True, resume_step=2)
    assert path.read_text().startswith('{"step": 0}\n{"step": 1, "lo')  # left as it was
