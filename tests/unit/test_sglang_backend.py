"""The pure parts of the SGLang rollout backend, on CPU without sglang: the graph-safe fixed-
iteration behaviour (methods.token_behaviour with `iterations`) against methods.solve_beta and
methods.blended_log_probs, teacher-prefix rows, weight-name routing and teacher vocabulary
alignment, the per-request parameters (wire.py), the composite model's override arguments,
request building and RolloutBatch assembly (EOS canonicalisation as in the megatron backend),
the version pin, and that the plugin fails clearly without sglang.

Run: .venv/bin/python -m pytest tests/unit/test_sglang_backend.py -q
"""

import json
import subprocess
import sys
import types

import pytest
import torch

from tests.cases import logit_cases
from trb_megatron.methods import (SOURCE_POLICY, SOURCE_TEACHER, BehaviourStep, Shard,
                                  VocabLayout, blended_log_probs, solve_beta, token_behaviour)
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.sglang_engine import engine_kwargs
from trb_megatron.rollout.sglang_requests import assemble_batch, prompt_ids, sampling_params
from trb_megatron.rollout.weight_sync import buckets
from trb_megatron.sglang_plugin.composite_config import (TRBSettings, composite_overrides,
                                                         read_settings)
from trb_megatron.sglang_plugin.version import (SGLANG_VERSION, SGLangUnavailable,
                                                check_version, require_sglang)
from trb_megatron.sglang_plugin.weights import TEACHER_PREFIX, align_vocab_rows, route
from trb_megatron.sglang_plugin.wire import (EPS_KEY, TEACHER_UNTIL_KEY, fill_rows,
                                             request_eps, request_teacher_until)

LAYOUT = VocabLayout(size=93, stop_ids=(90, 2))  # padding columns 93..96, two stop tokens
EPSILONS = (0.0, 1e-3, 1e-2, 0.1, 1e9)


def _shard(width=97):
    return Shard.equal_split(group=None, rank=0, world=1, width=width, layout=LAYOUT)


def _fixed(s, t, eps_N, iterations, dtype=torch.float64, tol=1e-6, from_teacher=None):
    return token_behaviour(s, t, eps_N, from_teacher, shard=_shard(), iterations=iterations,
                           dtype=dtype, tol=tol)


@pytest.mark.parametrize("name", sorted(logit_cases()))
def test_fixed_iteration_solver_matches_solve_beta(name):
    """Enough iterations: beta equals solve_beta's (float64 to 1e-7, float32 to 1e-4); any
    count: KL(mu || pi_S) <= eps + tol and beta does not exceed solve_beta's."""
    s, t = logit_cases()[name]
    for eps in EPSILONS:
        ref = solve_beta(s, t, eps, vocab=LAYOUT)
        eps_N = torch.full((s.shape[0],), eps)
        for dtype, tol, beta_tol in ((torch.float64, 1e-6, 1e-7), (torch.float32, 1e-5, 1e-4)):
            got = _fixed(s, t, eps_N, 12, dtype=dtype, tol=tol)
            torch.testing.assert_close(got.beta.double(), ref.beta, atol=beta_tol, rtol=0)
            torch.testing.assert_close(got.reverse_kl.double(), ref.reverse_kl, atol=1e-5,
                                       rtol=1e-5)
            assert (got.kl_to_student.double() <= eps + tol).all()
        few = _fixed(s, t, eps_N, 2)
        assert (few.kl_to_student <= eps + 1e-6).all()
        assert (few.beta <= ref.beta + 1e-6).all()  # equal up to the acceptance window
        assert torch.equal(few.beta == 1, ref.teacher_feasible)
        if eps == 0:
            assert (few.beta == 0).all() and (few.kl_to_student == 0).all()


def test_fixed_iteration_solver_takes_per_row_budgets_and_teacher_rows():
    """Per-row budgets; a teacher-prefix row gets beta = 1 and KL(pi_T || pi_S) whatever its
    budget, and source SOURCE_TEACHER."""
    s, t = logit_cases()["random"]
    eps_N = torch.tensor([0.0, 1e-3, 1e-2, 0.1, 1e9, 0.05])
    from_teacher = torch.tensor([False, False, True, False, False, True])
    got = _fixed(s, t, eps_N, 12, from_teacher=from_teacher)
    for row, eps in enumerate(eps_N.tolist()):
        ref = solve_beta(s[row:row + 1], t[row:row + 1], 1e12 if from_teacher[row] else eps,
                         vocab=LAYOUT)
        assert abs(float(got.beta[row]) - float(ref.beta[0])) < 1e-7
        assert abs(float(got.kl_to_student[row]) - float(ref.kl_to_student[0])) < 1e-9
    assert got.beta[from_teacher].eq(1).all()
    assert got.source.tolist() == [SOURCE_TEACHER if f else SOURCE_POLICY
                                   for f in from_teacher.tolist()]


def test_the_graph_safe_path_makes_no_host_decision(monkeypatch):
    """With a fixed iteration count nothing reads a tensor's value on the host (the decode step
    must stay CUDA-graph capturable): bool(), .item() and .tolist() raise inside it."""
    s, t = logit_cases()["peaked"]
    eps_N = torch.full((s.shape[0],), 1e-2)
    from_teacher = torch.zeros(s.shape[0], dtype=torch.bool)

    def refuse(*_):
        raise AssertionError("a host synchronisation in the graph-safe path")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = _fixed(s, t, eps_N, 4, dtype=torch.float32, from_teacher=from_teacher)
    monkeypatch.undo()
    assert (got.kl_to_student <= 1e-2 + 1e-6).all()


def test_behaviour_logits_are_log_mu_up_to_a_row_constant():
    """log_softmax of the behaviour logits = methods.blended_log_probs (stops merged into the
    student's EOS, merged-away stop and padding columns -inf); the student alone without the
    teacher."""
    s, t = logit_cases()["peaked"]
    eps_N = torch.tensor([0.0, 1e-3, 1e-2, 0.1, 1e9, 0.05])
    drawn = _fixed(s, t, eps_N, 12, dtype=torch.float32)
    got = torch.log_softmax(drawn.logits.double(), dim=1)
    want = blended_log_probs(s, t, drawn.beta, vocab=LAYOUT, dtype=torch.float64)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=0)
    assert torch.isinf(got[:, [2, 93, 96]]).all()  # merged-away stop, padding
    alone = token_behaviour(s, None, eps_N, None, shard=_shard(), iterations=12,
                            dtype=torch.float32)
    assert (alone.beta == 0).all() and (alone.source == SOURCE_POLICY).all()
    want = blended_log_probs(s, None, 0.0, vocab=LAYOUT, dtype=torch.float64)
    got = torch.log_softmax(alone.logits.double(), 1)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=0)


def test_equal_split_shards_reject_bad_layouts():
    with pytest.raises(ValueError, match="vocab size 200 must be in"):
        Shard.equal_split(group=None, rank=0, world=2, width=48, layout=VocabLayout(size=200))
    with pytest.raises(ValueError, match="stop id"):
        Shard.equal_split(group=None, rank=0, world=1, width=97,
                          layout=VocabLayout(size=93, stop_ids=(95,)))
    second = Shard.equal_split(group=None, rank=1, world=2, width=50, layout=LAYOUT)
    assert second.offset == 50 and second.total == 100
    excluded = second.excluded(None)
    assert excluded[43:].all() and not excluded[:40].any() and excluded[40] == False  # noqa
    first = Shard.equal_split(group=None, rank=0, world=2, width=50, layout=LAYOUT)
    assert first.excluded(None).nonzero().squeeze(1).tolist() == [2]  # the merged-away stop


def test_weight_names_route_by_teacher_prefix():
    assert route("teacher.model.layers.0.mlp.up_proj.weight") == (
        "teacher", "model.layers.0.mlp.up_proj.weight")
    assert route("model.embed_tokens.weight") == ("student", "model.embed_tokens.weight")
    assert route("lm_head.weight") == ("student", "lm_head.weight")
    assert TEACHER_PREFIX == "teacher."


def test_teacher_vocabulary_rows_are_aligned_to_the_student():
    table = torch.arange(12.0).view(6, 2)
    padded = align_vocab_rows("lm_head.weight", table, rows=8, true_size=5)
    assert padded.shape == (8, 2) and torch.equal(padded[:6], table) and (padded[6:] == 0).all()
    sliced = align_vocab_rows("model.embed_tokens.weight", table, rows=5, true_size=5)
    assert torch.equal(sliced, table[:5])
    other = align_vocab_rows("model.norm.weight", table, rows=8, true_size=5)
    assert other is table
    with pytest.raises(ValueError, match="fewer than the 7 tokens"):
        align_vocab_rows("lm_head.weight", table, rows=8, true_size=7)


def test_behaviour_parameters_come_from_custom_params_with_defaults():
    assert request_eps({EPS_KEY: 0.02}, 0.5) == 0.02
    assert request_eps(None, 0.5) == 0.5 and request_eps({"other": 1}, 0.0) == 0.0
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="trb_eps"):
            request_eps({EPS_KEY: bad}, 0.0)
    assert request_teacher_until({TEACHER_UNTIL_KEY: 7}) == 7 and request_teacher_until(None) == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="trb_teacher_until"):
            request_teacher_until({TEACHER_UNTIL_KEY: bad})
    eps, until = torch.full((5,), 7.0), torch.full((5,), 9, dtype=torch.int64)
    fill_rows(eps, until, [{EPS_KEY: 0.1, TEACHER_UNTIL_KEY: 4}, None, {EPS_KEY: 0.0}], 3,
              default_eps=0.01)
    torch.testing.assert_close(eps, torch.tensor([0.1, 0.01, 0.0, 0.0, 0.0]))
    assert until.tolist() == [4, 0, 0, 0, 0]
    fill_rows(eps, until, None, 2, default_eps=0.3)
    torch.testing.assert_close(eps, torch.tensor([0.3, 0.3, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="exceeds the per-row buffers"):
        fill_rows(eps, until, None, 6, default_eps=0.0)


def _settings(**kw):
    base = dict(student_architecture="Qwen3ForCausalLM", student_layers=2, teacher_path="/t",
                vocab_size=120, stop_ids=(1, 5), iterations=10, max_rows=64)
    return TRBSettings(**{**base, **kw})


def _cfg(layers, kv=2, head_dim=16, **kw):
    return {"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": kv, "head_dim": head_dim,
            "hidden_size": 32, "vocab_size": 120, **kw}


def test_composite_overrides_share_one_kv_pool():
    overrides = composite_overrides(_cfg(2), _cfg(3), _settings())
    assert overrides["architectures"] == ["TRBForCausalLM"]
    assert overrides["num_hidden_layers"] == 5
    assert read_settings(types.SimpleNamespace(**overrides)) == _settings()
    alone = composite_overrides(_cfg(2), None, _settings())
    assert alone["architectures"] == ["TRBForCausalLM"] and "num_hidden_layers" not in alone
    assert read_settings(types.SimpleNamespace(**alone)) == _settings()
    with pytest.raises(ValueError, match="num_key_value_heads"):
        composite_overrides(_cfg(2), _cfg(3, kv=4), _settings())
    with pytest.raises(ValueError, match="head_dim"):
        composite_overrides(_cfg(2), _cfg(3, head_dim=8), _settings())
    with pytest.raises(ValueError, match="'trb' section"):
        read_settings(types.SimpleNamespace())


def test_engine_arguments(tmp_path):
    from trb_megatron.config import SGLangConfig

    for role, layers in (("s", 2), ("t", 3)):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps(_cfg(layers)))
    vocab = VocabLayout(size=120, stop_ids=(1, 5))
    kw = engine_kwargs(SGLangConfig(), student_dir=tmp_path / "s", teacher_dir=tmp_path / "t",
                       vocab=vocab, tp_size=2, seed=3)
    overrides = json.loads(kw["json_model_override_args"])
    assert overrides["num_hidden_layers"] == 5 and overrides["trb"]["teacher_path"] == str(
        tmp_path / "t")
    assert overrides["trb"]["stop_ids"] == [1, 5] and overrides["trb"]["max_rows"] == 256
    assert kw["tp_size"] == 2 and kw["enable_custom_logit_processor"]
    assert kw["disable_prefill_cuda_graph"] and kw["enable_deterministic_inference"]
    assert kw["cuda_graph_max_bs_decode"] == 256  # the sglang 0.5.23 name
    # without CUDA the CPU backend's arguments replace the GPU ones (test_sglang_cpu_backend)
    assert kw["enable_memory_saver"] == torch.cuda.is_available()
    student = engine_kwargs(SGLangConfig(mode="disaggregated", max_total_tokens=5000),
                            student_dir=tmp_path / "s", teacher_dir=None, vocab=vocab,
                            tp_size=1, seed=3)
    alone = json.loads(student["json_model_override_args"])
    assert alone["architectures"] == ["TRBForCausalLM"] and alone["trb"]["teacher_path"] == ""
    assert not student["enable_memory_saver"] and student["max_total_tokens"] == 5000


PROMPTS = ([2, 17, 33], [2, 9])
EOS, TEACHER_EOS, PAD = 1, 5, 0
VOCAB = VocabLayout(size=120, stop_ids=(EOS, TEACHER_EOS))


def _request(eps=0.02, max_new=4, prefix_max=0):
    return RolloutRequest.build(PROMPTS, samples_per_prompt=2, max_new_tokens=max_new,
                                behaviour=BehaviourStep(eps=eps, prefix_max=prefix_max), seed=11,
                                prompt_offset=3, vocab_size=120, max_positions=64)


def _output(tokens, finish, teacher=True, teacher_tokens=0):
    meta = {"output_token_logprobs": [(-0.5 - 0.1 * i, tok, None)
                                      for i, tok in enumerate(tokens)],
            "finish_reason": {"type": finish}}
    if teacher:
        meta.update(trb_beta=[1.0] + [0.25] * (len(tokens) - 1),
                    trb_kl_to_student=[0.003] * len(tokens), trb_reverse_kl=[0.01] * len(tokens),
                    trb_source=[float(SOURCE_TEACHER)] * teacher_tokens
                    + [float(SOURCE_POLICY)] * (len(tokens) - teacher_tokens))
    return {"output_ids": list(tokens), "meta_info": meta}


def test_requests_sample_the_blend_with_per_row_seeds_and_budgets():
    params = sampling_params(_request(), VOCAB)
    assert len(params) == 4
    for p in params:
        assert (p["temperature"], p["top_p"], p["top_k"], p["min_p"]) == (1.0, 1.0, -1, 0.0)
        assert p["stop_token_ids"] == [EOS]
        assert p["custom_params"] == {EPS_KEY: 0.02, TEACHER_UNTIL_KEY: 3 if p is params[0]
                                      or p is params[1] else 2}
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 4 and seeds == [p["sampling_seed"] for p in
                                              sampling_params(_request(), VOCAB)]
    assert prompt_ids(_request()) == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]


def test_teacher_prefixes_are_drawn_per_row_under_their_maximum():
    """Each row's prefix length is uniform on {0..prefix_max}, keyed by (seed, row id): the
    same request gives the same lengths, the ends are sent as teacher_until = P_b + l_b."""
    many = RolloutRequest.build([[2, 3]] * 500, samples_per_prompt=2, max_new_tokens=8,
                                behaviour=BehaviourStep(prefix_max=4), seed=5, prompt_offset=0,
                                vocab_size=120, max_positions=64)
    lengths = many.teacher_until_B - many.prompt_lengths_B
    assert set(lengths.tolist()) == {0, 1, 2, 3, 4}
    counts = torch.bincount(lengths, minlength=5).double() / lengths.numel()
    assert (counts - 0.2).abs().max() < 0.05  # 1000 draws: 4.5 standard errors
    again = RolloutRequest.build([[2, 3]] * 500, samples_per_prompt=2, max_new_tokens=8,
                                 behaviour=BehaviourStep(prefix_max=4), seed=5, prompt_offset=0,
                                 vocab_size=120, max_positions=64)
    assert torch.equal(again.teacher_until_B, many.teacher_until_B)
    ends = [p["custom_params"][TEACHER_UNTIL_KEY] for p in sampling_params(many, VOCAB)]
    assert ends == many.teacher_until_B.tolist()
    assert torch.equal(_request().teacher_until_B, _request().prompt_lengths_B)  # no prefix


def test_batch_assembly_has_the_megatron_layout():
    outputs = [_output([7, 8, EOS], "stop", teacher_tokens=2), _output([9, 10, 11, 12], "length"),
               _output([EOS], "stop"), _output([3, 4, 6, EOS], "stop")]
    batch = assemble_batch(_request(prefix_max=3), outputs, vocab=VOCAB, pad_id=PAD)
    assert batch.tokens.shape == (4, 3 + 4)
    assert batch.tokens[0].tolist() == [2, 17, 33, 7, 8, EOS, PAD]
    assert batch.tokens[2].tolist() == [2, 9, EOS, PAD, PAD, PAD, PAD]
    assert batch.response_lengths.tolist() == [3, 4, 1, 4]
    assert batch.finish_reasons == ("stop", "length", "stop", "stop")
    assert batch.response_mask[1].nonzero().squeeze(1).tolist() == [3, 4, 5, 6]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert batch.row_ids.tolist() == [6, 7, 8, 9]
    torch.testing.assert_close(batch.behaviour_logprobs[0, 3:6], torch.tensor([-0.5, -0.6,
                                                                                -0.7]))
    assert batch.from_teacher[0].tolist() == [False] * 3 + [True, True] + [False] * 2
    assert not batch.from_teacher[1:].any()
    torch.testing.assert_close(batch.stat("beta")[3, 2:6], torch.tensor([1.0, 0.25, 0.25, 0.25]))
    assert (batch.stat("reverse_kl")[~batch.response_mask] == 0).all()
    assert (batch.stat("kl_to_student")[batch.response_mask] == 0.003).all()
    assert batch.behaviour == BehaviourStep(eps=0.02, prefix_max=3)


def test_batch_assembly_without_teacher_and_bad_outputs():
    outputs = [_output([7, EOS], "stop", teacher=False)] * 4
    batch = assemble_batch(_request(eps=0.0), outputs, vocab=VOCAB, pad_id=PAD)
    assert batch.stats == {} and (batch.stat("beta") == 0).all()
    assert batch.behaviour == BehaviourStep() and (batch.source == SOURCE_POLICY).all()
    cases = [
        ([_output([7, TEACHER_EOS], "stop")] + outputs[1:], "merged-away stop id"),
        ([_output([EOS, 7], "length")] + outputs[1:], "stop token inside the response"),
        ([_output([7, 8], "abort")] + outputs[1:], "without EOS"),
        ([{"output_ids": [7], "meta_info": {}}] + outputs[1:], "return_logprob=True"),
        (outputs[:3], "3 SGLang outputs for 4 rows"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            assemble_batch(_request(eps=0.0), bad, vocab=VOCAB, pad_id=PAD)
    with pytest.raises(ValueError, match="trb_source"):
        assemble_batch(_request(), outputs, vocab=VOCAB, pad_id=PAD)


def test_weight_buckets_bound_their_bytes():
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate((10, 10, 30, 5, 5, 5))]
    groups = list(buckets(named, max_bytes=80))  # float32: 40, 40, 120, 20, 20, 20 bytes
    assert [[n for n, _ in g] for g in groups] == [["w0", "w1"], ["w2"], ["w3", "w4", "w5"]]
    with pytest.raises(ValueError):
        list(buckets(named, 0))


def test_version_pin():
    check_version(SGLANG_VERSION)
    with pytest.raises(SGLangUnavailable, match="0.5.22 is installed.*0.5.23 only"):
        check_version("0.5.22")


# Runs Python with sglang made unimportable (sys.modules["sglang"] = None), as on a machine
# without the sglang extra.
WITHOUT_SGLANG = "import sys; sys.modules['sglang'] = None\n"


def _without_sglang(code: str) -> str:
    return subprocess.run([sys.executable, "-c", WITHOUT_SGLANG + code], capture_output=True,
                          text=True, check=True).stdout


def test_plugin_imports_without_sglang_and_fails_clearly_when_used():
    out = _without_sglang(
        "import trb_megatron.sglang_plugin, trb_megatron.sglang_plugin.wire, "
        "trb_megatron.sglang_plugin.weights, trb_megatron.rollout.sglang_engine\n"
        "try:\n    import trb_megatron.sglang_plugin.model\n"
        "except Exception as err:\n    print(type(err).__name__, err)")
    assert out.startswith("SGLangUnavailable") and "trb-megatron[sglang]" in out


def test_trainer_refuses_the_sglang_backend_before_building_models():
    out = _without_sglang(
        "from trb_megatron.config import Config, from_dict\n"
        "from trb_megatron.training.trainer import Trainer\n"
        "config = from_dict(Config, {'model': {'student': '/missing/s', 'teacher': "
        "'/missing/t'}, 'train': {'steps': 1}, 'rollout': {'backend': 'sglang'}})\n"
        "try:\n    Trainer(config, [[2, 3]])\n"
        "except Exception as err:\n    print(type(err).__name__, err)")
    assert out.startswith("SGLangUnavailable") and "trb-megatron[sglang]" in out


def test_sglang_config_is_validated_with_the_fix_named():
    from trb_megatron.config import Config, from_dict

    base = {"model": {"student": "s", "teacher": "t"}, "train": {"steps": 1}}

    def config(rollout, parallel=None):
        return from_dict(Config, {**base, "rollout": rollout, "parallel": parallel or {}})

    assert config({"backend": "sglang"}).validate().rollout.sglang.mode == "colocated"
    remote = {"mode": "disaggregated", "servers": "http://a:30000,http://b:30000",
              "update_master": "trainer0:29600"}
    config({"backend": "sglang", "sglang": remote}).validate()
    cases = [
        ({"backend": "vllm"}, None, "rollout.backend must be megatron or sglang"),
        ({"backend": "sglang", "sglang": {"mode": "remote"}}, None, "sglang.mode must be"),
        ({"backend": "sglang", "sglang": {"mode": "disaggregated"}}, None,
         "sglang.servers must be set .* exactly when mode is disaggregated"),
        ({"backend": "sglang", "sglang": {**remote, "update_master": "trainer0"}}, None,
         "update_master must be host:port"),
        ({"backend": "sglang", "sglang": {"servers": "http://a:1"}}, None, "sglang.servers"),
        ({"backend": "sglang", "sglang": {"mem_fraction": 1.5, "solver_iterations": 0}}, None,
         "mem_fraction must be in \\(0, 1\\).*solver_iterations must be >= 1"),
        ({"backend": "sglang"}, {"pipeline_parallel": 2},
         "pipeline_parallel must be 1 with rollout.backend=sglang"),
    ]
    for rollout, parallel, match in cases:
        with pytest.raises(ValueError, match=match):
            config(rollout, parallel).validate()
    config({"backend": "megatron", "sglang": {"mem_fraction": 1.5}}, {"pipeline_parallel": 2}
           ).validate()  # sglang settings are ignored by the megatron backend
    with pytest.raises(ValueError, match="unknown key.*rollout.sglang.tp"):
        config({"sglang": {"tp": 2}})
