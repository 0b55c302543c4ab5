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
    assert (cfg.method.name, cfg.method.eps0, cfg.method.anneal_steps, cfg.optim.lr,
            cfg.rollout.samples_per_prompt, cfg.method.topk, cfg.optim.warmup_steps,
            cfg.optim.weight_decay, cfg.optim.grad_clip) == ("trb", 0.02, 50, 1e-5, 4, 16, 15,
                                                             0.01, 1.0)
    tropd = from_dict(Config, {**MINIMAL, "method": {"name": "tropd"}}).validate()
    assert (tropd.method.outlier, tropd.method.outlier_topk, tropd.method.prefix_weight) == (
        "fkl", 64, 0.001)


@pytest.mark.parametrize("data, message", [
    ({**MINIMAL, "trainer": {}}, "unknown key.*trainer.*valid keys of the config: data, eval, fp8, logging, method"),
    ({**MINIMAL, "method": {"eps": 0.1}}, r"unknown key\(s\) method.eps; valid keys of method: "
                                          "anneal_steps, behaviour, eps0"),
    ({**MINIMAL, "train": {"steps": "ten"}}, "train.steps must be int, got 'ten'"),
    ({"model": {"student": "s"}, "train": {"steps": 1}}, "missing required key.*model.teacher"),
])
def test_bad_keys_and_types_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Config, data)


@pytest.mark.parametrize("data, message", [
    ({"trb": {"method": "opd"}}, "trb.method moved to method.name"),
    ({"trb": {"eps0": 0.1, "anneal_steps": 5}},
     "trb.anneal_steps moved to method.anneal_steps; trb.eps0 moved to method.eps0"),
    ({"loss": {"estimator": "full", "topk": 4}},
     "loss.estimator moved to method.estimator; loss.topk moved to method.topk"),
    ({"trb": {}}, "the trb section moved to method"),
])
def test_moved_keys_name_their_replacement(data, message):
    with pytest.raises(ValueError, match=message + r".*method.name picks a preset: trb, opd"):
        from_dict(Config, {**MINIMAL, **data})


def _method(**method):
    return from_dict(Config, {**MINIMAL, "method": method})


@pytest.mark.parametrize("method, message", [
    (dict(name="sft"), "method.name must be one of the presets trb, opd, fixed_eps, tropd, "
                       "trb_tropd"),
    (dict(eps0=-1.0), "method.eps0 must be finite, >= 0"),
    (dict(name="tropd", outlier="drop"), "method.outlier must be one of fkl, clip, mask"),
    (dict(name="tropd", outlier_topk=0), "method.outlier_topk must be >= 1"),
    (dict(topk=0), "method.topk must be >= 1"),
    (dict(name="tropd", outlier_tau=float("inf")), "method.outlier_tau must be finite, > 0"),
    (dict(name="tropd", outlier_tau=float("nan")), "method.outlier_tau must be finite"),
    (dict(name="tropd", prefix_weight=-0.1), "method.prefix_weight must be finite, >= 0"),
    (dict(name="tropd", prefix_max=300), r"method.prefix_max must be in \[0, "
                                         r"rollout.max_new_tokens=256\]"),
    (dict(name="tropd", prefix_anneal_steps=-1), "method.prefix_anneal_steps must be >= 0"),
    (dict(behaviour="sampler"), "method.behaviour must be one of student, trb_blend, "
                                "teacher_prefix"),
    (dict(objective="jsd"), "method.objective must be one of reverse_kl, tropd"),
    (dict(name="opd", eps_schedule="constant"),
     "method.eps_schedule must be unset: it schedules behaviour trb_blend's eps, and the "
     "behaviour is student"),
    (dict(name="tropd", objective="reverse_kl", estimator="sampled"),
     "behaviour teacher_prefix with objective reverse_kl and estimator sampled"),
])
def test_bad_method_settings_are_named_at_validation(method, message):
    with pytest.raises(ValueError, match=message):
        _method(**method).validate()


def test_presets_resolve_to_their_parts_and_take_overrides():
    parts = {name: _method(name=name).validate().resolved_method() for name in
             ("trb", "opd", "fixed_eps", "tropd", "trb_tropd")}
    assert {n: (m.behaviour, m.objective) for n, m in parts.items()} == {
        "trb": ("trb_blend", "reverse_kl"), "opd": ("student", "reverse_kl"),
        "fixed_eps": ("trb_blend", "reverse_kl"), "tropd": ("teacher_prefix", "tropd"),
        "trb_tropd": ("trb_blend", "tropd")}
    assert parts["fixed_eps"].eps_schedule == "constant" and parts["trb"].eps_schedule == "linear"
    # the prefix schedule defaults to the run: the longest response, over the whole run
    assert (parts["tropd"].prefix_max, parts["tropd"].prefix_anneal_steps) == (256, 3)
    student_tropd = _method(name="tropd", behaviour="student").validate()
    assert student_tropd.build_method().behaviour.name == "student"
    assert "clip" in _method(name="tropd", outlier="clip").validate().build_method().describe()
    method = _method(name="trb", eps0=0.1, anneal_steps=4).validate().build_method()
    assert [method.behaviour.at(k).eps for k in (0, 2, 4)] == [0.1, 0.05, 0.0]


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
