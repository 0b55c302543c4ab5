"""The TRB composite model inside a real SGLang engine (CPU here, through the CPU backend): it
generates with per-token beta and KLs for every response token; the realised KL(mu || pi_S)
stays within eps; eps = 1e9 samples the teacher (beta 1) and eps = 0 the student (beta 0) with
the tokens and log-probs of a plain student engine; teacher prefixes (TrOPD) are decided inside
the engine, per row; the megatron and sglang backends agree in
distribution; a TP=2 engine gives the TP=1 statistics; SGLang's failures that it only reports
by a return value or a log line raise in the product.

Run: .venv/bin/python -m pytest tests/sglang/test_engine.py -q   (3 engine starts, ~2-4 min)
"""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.sglang.conftest import (LAYOUT, PROMPTS, passthrough, raw_outputs, rollout_request,
                                   sample, start_engine)
from trb_megatron.rollout.sglang_engine import PROBE_EPS, checked, verify_trb_model
from trb_megatron.rollout.sglang_requests import STAT_KEYS
from trb_megatron.sglang_plugin.engine_shutdown import shutdown_engine
from trb_megatron.sglang_plugin.wire import meta_key

KL_TOL = 1e-5  # float32 fixed-iteration solve (rollout.sglang.solver_iterations = 10)


@pytest.fixture(scope="module")
def composite(models):
    engine = start_engine(models, teacher=True)
    yield engine
    shutdown_engine(engine)


def test_composite_engine_samples_within_the_budget(composite):
    for eps in (1e-3, 1e-2, 0.1):
        batch = sample(composite, eps)
        mask = batch.response_mask
        assert (batch.response_lengths >= 1).all()
        for x in (*batch.stats.values(), batch.behaviour_logprobs):
            assert torch.isfinite(x[mask]).all()
        beta = batch.stat("beta")[mask]
        assert ((beta >= 0) & (beta <= 1)).all()
        assert (batch.stat("kl_to_student")[mask] <= eps + KL_TOL).all(), eps
        assert (batch.stat("reverse_kl")[mask] > 0).all()  # two different random models
        assert (batch.behaviour_logprobs[mask] <= 0).all()
        assert not batch.from_teacher.any()
    teacher = sample(composite, 1e9)
    assert (teacher.stat("beta")[teacher.response_mask] == 1).all()


def test_teacher_prefixes_are_decided_inside_the_engine(composite):
    """A row's tokens before its teacher_until are the teacher's: the very tokens and log-probs
    an all-teacher request (beta 1 everywhere) draws with the same seeds, source teacher and
    beta 1; the rest the student's (eps 0: beta 0)."""
    kwargs = dict(samples=8, max_new=12)
    request = rollout_request(0.0, prefix_max=12, **kwargs)
    prefixed = sample(composite, 0.0, prefix_max=12, **kwargs)
    teacher = sample(composite, 1e9, **kwargs)
    lengths = (request.teacher_until_B - request.prompt_lengths_B).tolist()
    assert 0 < sum(lengths) < 12 * len(lengths)
    for b, l_b in enumerate(lengths):
        p, r = int(prefixed.prompt_lengths[b]), int(prefixed.response_lengths[b])
        n = min(l_b, r)
        assert prefixed.from_teacher[b, p:p + n].all()
        assert not prefixed.from_teacher[b, p + n:].any()
        assert (prefixed.stat("beta")[b, p:p + n] == 1).all()
        assert (prefixed.stat("beta")[b, p + n:p + r] == 0).all()
        span = slice(p, p + min(n, int(teacher.response_lengths[b])))
        assert torch.equal(prefixed.tokens[b, span], teacher.tokens[b, span]), b
        torch.testing.assert_close(prefixed.behaviour_logprobs[b, span],
                                   teacher.behaviour_logprobs[b, span], atol=1e-5, rtol=0)


def test_every_response_token_carries_its_statistics(composite):
    request = rollout_request(1e-2)
    for output in raw_outputs(composite, request):
        meta = output["meta_info"]
        tokens = len(meta["output_token_logprobs"])
        assert tokens >= 1 and all(len(meta[key]) == tokens for key in STAT_KEYS)


def test_eps_0_is_the_plain_student_engine(composite, models):
    blended_at_0 = sample(composite, 0.0)
    request = rollout_request(0.0)
    composite_raw = raw_outputs(composite, request)
    assert all(set(o["meta_info"][meta_key("beta")]) == {0.0} for o in composite_raw)
    plain = start_engine(models, teacher=False, plain=True)
    try:
        alone = sample(plain, 0.0)
        with pytest.raises(RuntimeError, match="not serving TRBForCausalLM"):
            verify_trb_model(raw_outputs(plain, rollout_request(PROBE_EPS, samples=1,
                                                                max_new=1)), teacher=True)
    finally:
        shutdown_engine(plain)
    assert torch.equal(blended_at_0.tokens, alone.tokens)
    torch.testing.assert_close(blended_at_0.behaviour_logprobs, alone.behaviour_logprobs,
                               atol=1e-4, rtol=0)


def test_probe_checks_the_serving_model(composite):
    probe = composite.generate(input_ids=[[0]], sampling_params=[{
        "max_new_tokens": 1, "custom_params": {"trb_eps": PROBE_EPS}}], return_logprob=True,
        custom_logit_processor=[passthrough()])
    verify_trb_model(probe, teacher=True)
    with pytest.raises(RuntimeError, match=r"beta \[1.0\].*expected \[0.0\]"):
        verify_trb_model(probe, teacher=False)


def test_a_refused_weight_update_raises_naming_the_call(composite):
    """SGLang refuses updates outside a weight-update session by a return value only."""
    tensors = [("model.norm.weight", torch.ones(32))]
    refused = composite.update_weights_from_tensor(named_tensors=tensors)
    assert refused[0] is False and "begin_weight_update" in refused[1]
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: .*"
                                           "begin_weight_update"):
        checked("update_weights_from_tensor", refused)
    checked("begin_weight_update", composite.begin_weight_update())
    try:
        with pytest.raises(RuntimeError, match="begin_weight_update failed: a weight-update "
                                               "session is already open"):
            checked("begin_weight_update", composite.begin_weight_update())
    finally:
        checked("end_weight_update", composite.end_weight_update())
    with pytest.raises(RuntimeError, match="end_weight_update failed: no weight-update session"):
        checked("end_weight_update", composite.end_weight_update())
    with pytest.raises(RuntimeError, match="cannot tell whether it worked"):
        checked("release_memory_occupation", None)


def _megatron_rollouts(rank, world, root, eps, samples, out):
    from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
    from trb_megatron.methods import BehaviourStep
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine

    for name in ("student", "teacher"):
        hf_to_megatron(f"{root}/{name}", f"{root}/{name}-megatron", progress=False,
                       overwrite=True)
    with parallel_layout(1, 1) as groups:
        _, student = load_megatron(f"{root}/student-megatron", groups)
        _, teacher = load_megatron(f"{root}/teacher-megatron", groups)
        engine = MegatronRolloutEngine(student, teacher, groups, vocab=LAYOUT, pad_id=0)
        batch = engine.generate(PROMPTS, samples_per_prompt=samples, max_new_tokens=12,
                                behaviour=BehaviourStep(eps=eps), seed=9)
        torch.save({"beta": batch.stat("beta").cpu(),
                    "kl_to_student": batch.stat("kl_to_student").cpu(),
                    "response_mask": batch.response_mask.cpu()}, out)


def _mean_and_se(values: torch.Tensor):
    values = values.double()
    return float(values.mean()), math.sqrt(float(values.var()) / values.numel())


def test_megatron_and_sglang_backends_agree_in_distribution(composite, models, tmp_path):
    eps, samples = 1e-2, 128
    run_distributed(_megatron_rollouts, 1, str(models), eps, samples, str(tmp_path / "m.pt"))
    megatron = SimpleNamespace(**torch.load(tmp_path / "m.pt"))
    sglang_batch = sample(composite, eps, samples=samples, seed=9)
    for field in ("beta", "kl_to_student"):
        a = getattr(megatron, field)[megatron.response_mask]
        b = sglang_batch.stat(field)[sglang_batch.response_mask]
        (mean_a, se_a), (mean_b, se_b) = _mean_and_se(a), _mean_and_se(b)
        assert abs(mean_a - mean_b) <= 4 * math.hypot(se_a, se_b) + 1e-6, (field, mean_a,
                                                                          mean_b)


def test_tensor_parallel_engine_matches_tp1(composite, models):
    """TP=2 inside SGLang on CPU (gloo): the vocab-sharded solve and blend give the TP=1
    statistics and draws (float rounding aside)."""
    one = sample(composite, 1e-2)
    engine = start_engine(models, teacher=True, tp_size=2)
    try:
        two = sample(engine, 1e-2)
    finally:
        shutdown_engine(engine)
    assert torch.equal(one.tokens, two.tokens)
    for name in ("beta", "kl_to_student"):
        torch.testing.assert_close(two.stat(name), one.stat(name), atol=1e-4, rtol=0)
    torch.testing.assert_close(two.behaviour_logprobs, one.behaviour_logprobs, atol=1e-4, rtol=0)


def _without_plugin(prelude: str) -> str:
    code = (prelude + "from trb_megatron.sglang_plugin.version import require_sglang\n"
            "from trb_megatron.rollout.sglang_engine import check_plugin\nrequire_sglang()\n"
            "try:\n    check_plugin()\nexcept RuntimeError as err:\n    print(err)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_a_plugin_that_sglang_would_skip_raises_before_the_engine_starts():
    """SGLang only logs a plugin that fails to import (or is left out by SGLANG_PLUGINS) and
    then serves without it: the product checks the entry point before every engine start."""
    broken = _without_plugin("import sys\nsys.modules['trb_megatron.sglang_plugin.model'] = None\n")
    assert "fails to import (ModuleNotFoundError" in broken and "trb_megatron.sglang_plugin.model" \
        in broken
    excluded = _without_plugin("import os\nos.environ['SGLANG_PLUGINS'] = 'other'\n")
    assert "SGLANG_PLUGINS='other' leaves out the TRB plugin 'trb_megatron'" in excluded
