"""Fixtures shared by the end-to-end job tests (tests/distributed: test_launcher.py,
test_multinode.py; tests/sglang/test_job.py)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mini_config(tmp_path_factory):
    """(root, config path): a miniature toy (built once per session, about a minute on 2 cores)
    and the toy config pointed at it: TP=2, 2 steps of 4 prompts, evaluation on 4 problems, the
    megatron rollout backend (these tests also run in the Python 3.12 environment, which has no
    SGLang; tests/sglang/test_job.py runs the toy's own backend with an override)."""
    from trb_megatron.toy.build import ToyBuildSpec, build_toy_models

    root = tmp_path_factory.mktemp("mini")
    toy = root / "toy"
    build_toy_models(toy, ToyBuildSpec(n_train=256, n_test=16, n_val=16, batch_size=32,
                                       teacher_steps=20, teacher_eval_every=10,
                                       student_max_steps=10, student_eval_every=5),
                     log=lambda *a: None)
    config = yaml.safe_load((ROOT / "examples" / "configs" / "toy_cpu.yaml").read_text())
    del config["toy"]
    config["model"] = {"student": str(toy / "student"), "teacher": str(toy / "teacher")}
    config["data"]["path_or_name"] = str(toy / "data" / "train.jsonl")
    config["eval"]["data"].update(path_or_name=str(toy / "data" / "test.jsonl"), limit=4)
    config["rollout"]["backend"] = "megatron"
    config["train"].update(steps=2, prompts_per_step=4, eval_every=2, save_every=0,
                           progress=False)
    path = root / "mini.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path
