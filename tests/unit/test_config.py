"""Config: nested dicts -> typed dataclasses with clear errors; the reference in
docs/configuration.md is current; missing paths are named."""

import dataclasses
from pathlib import Path

import pytest

from tools.config_reference import reference_table
from trb_megatron.config import Config, from_dict, missing_paths

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


def test_configuration_reference_is_current():
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert reference_table() in page, \
        "run tools/config_reference.py and paste its table into docs/configuration.md"


def _toy_config(root: Path, **model) -> Config:
    """The toy default's shape: a toy section and every path inside its out_dir."""
    toy = root / "toy"
    return from_dict(Config, {
        "toy": {"out_dir": str(toy)}, "train": {"steps": 1},
        "model": {"student": str(toy / "student"), "teacher": str(toy / "teacher"), **model},
        "data": {"path_or_name": str(toy / "data" / "train.jsonl")},
        "eval": {"data": {"path_or_name": str(toy / "data" / "test.jsonl")}}}).validate()


def test_toy_outputs_are_not_missing_before_the_build(tmp_path):
    assert missing_paths(_toy_config(tmp_path)) == {}
    # the same paths without the toy section that would build them
    assert set(missing_paths(dataclasses.replace(_toy_config(tmp_path), toy=None))) == {
        "model.student", "model.teacher", "data.path_or_name", "eval.data.path_or_name"}


def test_an_override_outside_the_toy_build_is_missing(tmp_path):
    missing = missing_paths(_toy_config(tmp_path, student="/nonexistent"))
    assert missing == {"model.student": "model.student=/nonexistent: no such directory"}
    # inside out_dir but not something the build creates
    config = _toy_config(tmp_path, teacher=str(tmp_path / "toy" / "teacher2"))
    assert list(missing_paths(config)) == ["model.teacher"]


def _with_models(root: Path, **sections) -> Config:
    """A config whose student and teacher directories exist, plus `sections`."""
    for name in ("student", "teacher"):
        (root / name).mkdir()
    return from_dict(Config, {"model": {"student": str(root / "student"),
                                        "teacher": str(root / "teacher")},
                              "train": {"steps": 1}, **sections})


@pytest.mark.parametrize("value, is_path", [
    ("prompts.jsonl", True), ("data/test.parquet", True), ("/data/prompts", True),
    ("./prompts", True), ("../prompts", True), ("~/prompts", True),
    ("gsm8k", False), ("openai/gsm8k", False), ("HuggingFaceH4/MATH-500", False),
])
def test_data_paths_are_told_from_dataset_names(tmp_path, value, is_path):
    config = _with_models(tmp_path, data={"path_or_name": value})
    expected = {"data.path_or_name": f"data.path_or_name={value}: no such file or directory"}
    assert missing_paths(config) == (expected if is_path else {})


def test_existing_paths_pass(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1="}\n')
    config = _with_models(tmp_path, data={"path_or_name": str(tmp_path / "train.jsonl")})
    assert missing_paths(config) == {}
