"""The SGLang backend on a GPU with tiny random Qwen3 student and teacher (one tokenizer):
the composite engine generates; at eps = 0 it samples what a plain student engine samples with
the same seeds; the realised KL(mu || pi_S) <= eps; the megatron and sglang backends agree in
distribution (mean beta and realised KL within sampling error).

Run (a CUDA machine with the sglang extra and this package installed, so SGLang finds the
plugin entry point): pip install -e '.[sglang]' && python -m pytest tests/gpu/test_sglang_gpu.py
"""

import math
from types import SimpleNamespace

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.gpu.marks import GPU, NEEDS_CUDA, NEEDS_SGLANG
from tests.hf_models import make_hf_model
from trb_megatron.config import SGLangConfig
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.sglang_engine import engine_kwargs
from trb_megatron.rollout.sglang_requests import assemble_batch, prompt_ids, sampling_params
from trb_megatron.trb import VocabLayout

pytestmark = [GPU, NEEDS_CUDA, NEEDS_SGLANG]

LAYOUT = VocabLayout(size=120, stop_ids=(1,))
PROMPTS = ([2, 17, 33, 5], [2, 9, 44])
SETTINGS = SGLangConfig(mem_fraction=0.3, max_running_requests=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    make_hf_model(root / "student", "qwen3", seed=0)
    make_hf_model(root / "teacher", "qwen3", seed=1)
    return root


def _engine(root, teacher: bool):
    import sglang

    kw = engine_kwargs(SETTINGS, student_dir=root / "student",
                       teacher_dir=root / "teacher" if teacher else None, vocab=LAYOUT,
                       tp_size=1, seed=0)
    return sglang.Engine(**kw, dtype="float32", enable_deterministic_inference=True)


def _sample(engine, eps, samples=4, seed=5, max_new=12):
    from trb_megatron.sglang_plugin.passthrough import PassThrough

    request = RolloutRequest.build(PROMPTS, samples_per_prompt=samples, max_new_tokens=max_new,
                                   eps=eps, seed=seed, prompt_offset=0, vocab_size=120,
                                   max_positions=64)
    outputs = engine.generate(input_ids=prompt_ids(request),
                              sampling_params=sampling_params(request, LAYOUT),
                              return_logprob=True,
                              custom_logit_processor=[PassThrough().to_str()] * request.rows)
    return assemble_batch(request, outputs, vocab=LAYOUT, pad_id=0)


def test_composite_engine_generates_within_the_budget_and_matches_the_student_at_eps_0(models):
    engine = _engine(models, teacher=True)
    try:
        for eps in (1e-3, 1e-2, 1e9):
            batch = _sample(engine, eps)
            assert (batch.response_lengths >= 1).all()
            assert (batch.kl_to_student[batch.response_mask] <= eps + 1e-5).all()
            assert (batch.beta[batch.response_mask] >= 0).all()
        blended_at_0 = _sample(engine, 0.0)
    finally:
        engine.shutdown()
    student = _engine(models, teacher=False)
    try:
        alone = _sample(student, 0.0)
    finally:
        student.shutdown()
    assert torch.equal(blended_at_0.tokens, alone.tokens)
    torch.testing.assert_close(blended_at_0.behaviour_logprobs, alone.behaviour_logprobs,
                               atol=1e-4, rtol=0)


def _megatron_rollouts(rank, world, root, eps, samples, out):
    from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine

    for name in ("student", "teacher"):
        hf_to_megatron(f"{root}/{name}", f"{root}/{name}-megatron", progress=False)
    with parallel_layout(1, 1) as groups:
        _, student = load_megatron(f"{root}/student-megatron", groups)
        _, teacher = load_megatron(f"{root}/teacher-megatron", groups)
        engine = MegatronRolloutEngine(student, teacher, groups, vocab=LAYOUT, pad_id=0)
        batch = engine.generate(PROMPTS, samples_per_prompt=samples, max_new_tokens=12,
                                eps=eps, seed=9)
        torch.save({k: getattr(batch, k).cpu() for k in ("beta", "kl_to_student",
                                                        "response_mask")}, out)


def _mean_and_se(values: torch.Tensor):
    values = values.double()
    return float(values.mean()), math.sqrt(float(values.var()) / values.numel())


def test_megatron_and_sglang_backends_agree_in_distribution(models, tmp_path):
    eps, samples = 1e-2, 128
    run_distributed(_megatron_rollouts, 1, str(models), eps, samples, str(tmp_path / "m.pt"))
    megatron = SimpleNamespace(**torch.load(tmp_path / "m.pt"))
    engine = _engine(models, teacher=True)
    try:
        sglang_batch = _sample(engine, eps, samples=samples, seed=9)
    finally:
        engine.shutdown()
    for field in ("beta", "kl_to_student"):
        a = getattr(megatron, field)[megatron.response_mask]
        b = getattr(sglang_batch, field)[sglang_batch.response_mask].cpu()
        (mean_a, se_a), (mean_b, se_b) = _mean_and_se(a), _mean_and_se(b)
        assert abs(mean_a - mean_b) <= 4 * math.hypot(se_a, se_b) + 1e-6, (field, mean_a,
                                                                          mean_b)
