"""Config: nested dicts -> typed dataclasses with clear errors; the README reference is current."""

from pathlib import Path

import pytest

from tools.config_reference import reference_table
from trb_megatron.config import Config, from_dict

MINIMAL = {"model": {"student": "s", "teacher": "t"}, "train": {"steps": 3}}


def test_defaults_are_the_paper_settings():
    cfg = from_dict(Config, MINIMAL).validate()
    assert (cfg.trb.eps0, cfg.trb.anneal_steps, cfg.optim.lr, cfg.rollout.samples_per_prompt,
            cfg.loss.topk, cfg.optim.warmup_steps, cfg.optim.weight_decay,
            cfg.optim.grad_clip) == (0.02, 50, 1e-5, 4, 16, 15, 0.01, 1.0)


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "trainer": {}}, "unknown key.*trainer.*valid keys of the config: data, eval, fp8, logging, loss"),
    ({**MINIMAL, "trb": {"eps": 0.1}}, r"unknown key\(s\) trb.eps; valid keys of trb: "
                                       "anneal_steps, eps0, method, solver_tol"),
    ({**MINIMAL, "train": {"steps": "ten"}}, "train.steps must be int, got 'ten'"),
    ({"model": {"student": "s"}, "train": {"steps": 1}}, "missing required key.*model.teacher"),
])
def test_bad_keys_and_types_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Config, data)


def test_validate_names_field_and_rule():
    cfg = from_dict(Config, {**MINIMAL, "trb": {"method": "sft", "eps0": -1.0}})
    with pytest.raises(ValueError, match="trb.method must be one of .*trb.eps0 must be finite"):
        cfg.validate()


def test_readme_reference_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference_table() in readme, "run tools/config_reference.py and paste into README"
