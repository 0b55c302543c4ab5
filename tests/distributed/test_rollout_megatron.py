"""The megatron rollout backend on real gloo processes, with tiny Qwen3 student and teacher
(different random weights, one tokenizer) converted from Hugging Face.

Run: .venv/bin/python -m pytest tests/distributed/test_rollout_megatron.py -q

One 2-process launch decodes the same requests at TP=1 (two replicas), TP=2 and PP=2 and checks:
KV-cache logits equal a full recomputation (forward.full_logits on the final sequences); every
drawn token, its log mu, beta and KLs equal a teacher-forced, unsharded reference
(trb.solve_beta + trb.sample_tokens on the full recomputed logits at each prefix) for eps = 0
(student only; the teacher never runs), a huge eps (teacher only, beta = 1) and an active
budget (KL(mu || pi_S) <= eps); all layouts give identical tokens; prompts of unequal length,
decoded together, alone or in small decode batches, give the same rows; EOS stops rows, which
are then padded; bad input raises ValueError.

A second launch pins GPTModel's inference path that CachedStage relies on, on a tiny model at
TP=2: a prefill returns only the last token's logits, [B, 1, V_full] (megatron-core >= 0.18 takes
that path only inside InferenceMode, which CachedStage enters), gathered over TP.
"""

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import tiny_gpt
from tests.distributed.launcher import run_distributed
from tests.hf_models import VOCAB, make_hf_model
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.models.forward import full_logits
from trb_megatron.parallel import detect_profile, initialize_parallel
from trb_megatron.rollout.cached_stage import CachedStage, inference_mode
from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine
from trb_megatron.methods import (SOURCE_POLICY, SOURCE_TEACHER, BehaviourStep, VocabLayout,
                                  sample_tokens, solve_beta)
from trb_megatron.methods.seeds import position_seed

pytestmark = pytest.mark.megatron

PAD, EOS = 0, 1  # tests/hf_models tokenizer: <pad>, <eos>
LAYOUT = VocabLayout(size=VOCAB, stop_ids=(EOS,))
PROMPTS = ([2, 17, 33, 5, 81], [2, 9], [2, 44, 45, 46, 47, 48, 49, 50])  # unequal lengths
SAMPLES, MAX_NEW, SEED = 2, 10, 1234
# The tiny random models are close: KL(pi_T || pi_S) is 0.008-0.016 at their prefixes, so this
# budget leaves the teacher feasible at some prefixes and is active at others.
EPS = 0.011
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (TP, PP) on 2 processes; TP=1 runs two replicas
CLOSE = dict(atol=2e-5, rtol=1e-4)


def _same_on_every_rank(x: torch.Tensor):
    every = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(every, x.contiguous())
    assert all(torch.equal(e, x) for e in every), "ranks disagree"


def _check_structure(batch, prompts, samples, max_new):
    """Row layout, masks, padding and finish reasons of a RolloutBatch."""
    rows = len(prompts) * samples
    assert batch.tokens.shape == (rows, max(map(len, prompts)) + max_new)
    assert batch.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(samples)]
    for b in range(rows):
        prompt = prompts[int(batch.prompt_index[b])]
        p, r = len(prompt), int(batch.response_lengths[b])
        assert int(batch.prompt_lengths[b]) == p and 1 <= r <= max_new
        assert batch.tokens[b, :p].tolist() == list(prompt)
        assert batch.response_mask[b].nonzero().squeeze(1).tolist() == list(range(p, p + r))
        assert (batch.tokens[b, p + r:] == PAD).all()
        response = batch.tokens[b, p:p + r]
        assert not (response[:-1] == EOS).any(), "a row went on after EOS"
        stopped = int(response[-1]) == EOS
        assert batch.finish_reasons[b] == ("stop" if stopped else "length")
        assert stopped or r == max_new
    outside = ~batch.response_mask
    for x in (batch.behaviour_logprobs, *batch.stats.values()):
        assert (x[outside] == 0).all()
    assert (batch.behaviour_logprobs[batch.response_mask] < 0).all()
    _same_on_every_rank(batch.tokens)
    _same_on_every_rank(batch.behaviour_logprobs)


def _reference(batch, full_s, full_t, *, teacher_only=False, vocab=LAYOUT, eps=EPS):
    """Teacher-forced unsharded draws at every response position of `batch`, from the full
    recomputed logits of each prefix: [N, 5] (token, log mu, beta, kl_to_student, reverse_kl)
    at batch.response_mask (row-major). full_t None: the student alone; teacher_only: the
    teacher alone (its own sampler call, no blend); teacher-prefix tokens (batch.source) are
    the teacher's own draws too, with the trust region's statistics at an unbounded budget."""
    rows, positions = batch.response_mask.nonzero(as_tuple=True)
    out = torch.zeros(len(rows), 5, dtype=torch.float64)
    for p in positions.unique().tolist():
        sel = positions == p
        r = rows[sel]
        s = full_s[r, p - 1]
        kwargs = dict(seed=position_seed(SEED, p), row_ids=r, vocab=vocab)
        if full_t is None:
            out[sel, :2] = _as_columns(sample_tokens(s, **kwargs))
            continue
        t = full_t[r, p - 1]
        prefix = batch.source[r, p] == SOURCE_TEACHER
        sol = solve_beta(s, t, torch.where(prefix, 1e12, eps), vocab=vocab)
        alone = sample_tokens(t, **kwargs)
        drawn = alone if teacher_only else sample_tokens(s, t, sol.beta, **kwargs)
        drawn = torch.where(prefix.unsqueeze(1), _as_columns(alone), _as_columns(drawn))
        out[sel, :2] = drawn
        out[sel, 2:] = torch.stack([sol.beta, sol.kl_to_student, sol.reverse_kl], 1)
    return out


def _as_columns(drawn):
    return torch.stack([drawn.token_ids.double(), drawn.log_prob.double()], 1)


def _check_against_reference(batch, reference):
    mask = batch.response_mask
    assert batch.tokens[mask].tolist() == reference[:, 0].long().tolist()
    torch.testing.assert_close(batch.behaviour_logprobs[mask].double(), reference[:, 1], **CLOSE)
    torch.testing.assert_close(batch.stat("beta")[mask].double(), reference[:, 2], **CLOSE)
    torch.testing.assert_close(batch.stat("kl_to_student")[mask].double(), reference[:, 3],
                               **CLOSE)
    torch.testing.assert_close(batch.stat("reverse_kl")[mask].double(), reference[:, 4], **CLOSE)


@contextlib.contextmanager
def _recorded(model):
    """The outputs of every forward call of `model` inside the block."""
    calls = []
    handle = model.register_forward_hook(lambda _m, _args, out: calls.append(out.detach()))
    try:
        yield calls
    finally:
        handle.remove()


def _check_kv_cache(calls, full, batch, groups, arch):
    """(1) each decode step's last-token logits equal the full recomputation at that prefix.
    Outputs are TP-gathered (GPTModel insists in inference mode): all padded columns."""
    if groups.pp.rank() != groups.pp.size() - 1:
        return  # earlier stages output hidden states
    first = int(batch.prompt_lengths.min())
    order = torch.sort(batch.prompt_lengths, stable=True).indices  # the decode batch's rows
    assert len(calls) > 1
    for k, out in enumerate(calls):
        assert out.shape == (batch.tokens.shape[0], 1, arch.padded_vocab_size)
        torch.testing.assert_close(out[:, 0, :VOCAB], full[order, first + k - 1], atol=1e-5,
                                   rtol=1e-5)


def _generate(engine, prompts=PROMPTS, *, eps=0.0, prefix_max=0, **kwargs):
    kwargs = dict(dict(samples_per_prompt=SAMPLES, max_new_tokens=MAX_NEW, seed=SEED), **kwargs)
    return engine.generate(prompts, behaviour=BehaviourStep(eps=eps, prefix_max=prefix_max),
                           **kwargs)


def _checks_at_layout(root, groups):
    arch, student = load_megatron(root / "student", groups, trainable=True)
    _, teacher = load_megatron(root / "teacher", groups)
    engine = MegatronRolloutEngine(student, teacher, groups, vocab=LAYOUT, pad_id=PAD)

    # (2) eps = 0: student-only sampling; the teacher never runs; KV cache == recomputation.
    with _recorded(student) as student_steps, _recorded(teacher) as teacher_steps:
        opd = _generate(engine, eps=0.0)
    assert teacher_steps == [] and opd.stats == {}
    assert student.training and not teacher.training, "training flags not restored"
    _check_structure(opd, PROMPTS, SAMPLES, MAX_NEW)
    full_s = full_logits(student, opd.tokens, groups, VOCAB)
    _check_kv_cache(student_steps, full_s, opd, groups, arch)
    _check_against_reference(opd, _reference(opd, full_s, None))
    assert (opd.stat("beta") == 0).all() and (opd.source == SOURCE_POLICY).all()

    # (3) huge eps: the teacher is always feasible, beta = 1, tokens from the teacher alone.
    with _recorded(teacher) as teacher_steps:
        taught = _generate(engine, eps=1e9)
    mask = taught.response_mask
    assert (taught.stat("beta")[mask] == 1).all()
    _check_structure(taught, PROMPTS, SAMPLES, MAX_NEW)
    full_s = full_logits(student, taught.tokens, groups, VOCAB)
    full_t = full_logits(teacher, taught.tokens, groups, VOCAB)
    _check_kv_cache(teacher_steps, full_t, taught, groups, arch)
    _check_against_reference(taught, _reference(taught, full_s, full_t, teacher_only=True,
                                                eps=1e9))

    # (4) an active budget: KL(mu || pi_S) <= eps, beta in [0, 1], draws equal the reference.
    blend = _generate(engine, eps=EPS)
    mask = blend.response_mask
    beta, kl = blend.stat("beta")[mask], blend.stat("kl_to_student")[mask]
    assert (beta >= 0).all() and (beta <= 1).all() and (kl <= EPS + 1e-6).all()
    assert ((beta > 0) & (beta < 1)).any(), "the budget was never active"
    assert (beta == 1).any(), "the teacher was never feasible"
    assert (blend.stat("reverse_kl")[mask] > 0).all()
    _check_structure(blend, PROMPTS, SAMPLES, MAX_NEW)
    full_s = full_logits(student, blend.tokens, groups, VOCAB)
    full_t = full_logits(teacher, blend.tokens, groups, VOCAB)
    _check_against_reference(blend, _reference(blend, full_s, full_t))

    # (6) unequal prompts: each prompt alone, and decode batches of 2 rows, give the same rows.
    for i, prompt in enumerate(PROMPTS):
        alone = _generate(engine, [prompt], eps=EPS, prompt_offset=i)
        rows = blend.prompt_index == i
        width = alone.tokens.shape[1]
        assert torch.equal(alone.tokens, blend.tokens[rows, :width])
        assert (blend.tokens[rows, width:] == PAD).all()
        torch.testing.assert_close(alone.behaviour_logprobs, blend.behaviour_logprobs[rows, :width],
                                   **CLOSE)
        torch.testing.assert_close(alone.stat("beta"), blend.stat("beta")[rows, :width], **CLOSE)
    small = MegatronRolloutEngine(student, teacher, groups, vocab=LAYOUT, pad_id=PAD,
                                  max_batch_size=2)
    batched = _generate(small, eps=EPS)
    assert torch.equal(batched.tokens, blend.tokens)
    assert batched.finish_reasons == blend.finish_reasons
    torch.testing.assert_close(batched.stat("kl_to_student"), blend.stat("kl_to_student"),
                               **CLOSE)

    # (7) EOS: with 20 more stop ids merged into EOS, rows often stop; stopped rows are padded.
    stops = VocabLayout(size=VOCAB, stop_ids=(EOS, *range(60, 80)))
    eos_engine = MegatronRolloutEngine(student, teacher, groups, vocab=stops, pad_id=PAD)
    ended = _generate(eos_engine, samples_per_prompt=4, max_new_tokens=6, eps=EPS)
    _check_structure(ended, PROMPTS, 4, 6)
    assert {"stop", "length"} == set(ended.finish_reasons)
    assert ended.response_lengths.min() < 6
    drawn = ended.tokens[ended.response_mask]
    assert not any(int(t) in range(60, 80) for t in drawn), "a merged stop id was emitted"
    full_s = full_logits(student, ended.tokens, groups, VOCAB)
    full_t = full_logits(teacher, ended.tokens, groups, VOCAB)
    _check_against_reference(ended, _reference(ended, full_s, full_t, vocab=stops))

    # (8) teacher prefixes: row b's tokens before its teacher_until are the teacher's own
    # draws (source teacher, beta 1), the rest the student's (eps 0) or the blend's (eps > 0).
    for eps in (0.0, EPS):
        prefixed = _generate(engine, samples_per_prompt=4, eps=eps, prefix_max=MAX_NEW // 2)
        _check_structure(prefixed, PROMPTS, 4, MAX_NEW)
        source = prefixed.source[prefixed.response_mask]
        assert (source == SOURCE_TEACHER).any() and (source == SOURCE_POLICY).any()
        for b in range(prefixed.tokens.shape[0]):  # a prefix, then the policy: never back
            row = prefixed.source[b][prefixed.response_mask[b]].tolist()
            assert row == sorted(row, reverse=True) and row.count(SOURCE_TEACHER) <= MAX_NEW // 2
        assert (prefixed.stat("beta")[prefixed.from_teacher] == 1).all()
        full_s = full_logits(student, prefixed.tokens, groups, VOCAB)
        full_t = full_logits(teacher, prefixed.tokens, groups, VOCAB)
        _check_against_reference(prefixed, _reference(prefixed, full_s, full_t, eps=eps))
    if groups.tp.size() == 2:
        _check_bad_input(engine, student, teacher, groups)
    return {"opd": opd, "teacher": taught, "blend": blend, "eos": ended, "prefixed": prefixed}


def _check_bad_input(engine, student, teacher, groups):
    ok = dict(prompts=[[2, 3]], samples_per_prompt=1, max_new_tokens=2,
              behaviour=BehaviourStep(), seed=0)
    cases = (
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[2, 3], []]), "prompt 1 is empty"),
        (dict(prompts=[[2.5, 3.0]]), "integer token ids"),
        (dict(prompts=[[2, VOCAB]]), f"token id {VOCAB}, outside the vocabulary"),
        (dict(prompts=[[2, -1]]), "token id -1, outside"),
        (dict(prompts=[[2] * 70]), "max_position_embeddings=64"),
        (dict(prompts=[[2] * 60], max_new_tokens=8), "needs 68 positions"),
        (dict(samples_per_prompt=0), "samples_per_prompt must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(behaviour=0.1), "behaviour must be a methods.BehaviourStep"),
        (dict(seed=1.5), "seed must be an int"),
        (dict(prompt_offset=-1), "prompt_offset must be >= 0"),
        (dict(seed=dist.get_rank()), "passed different generate\\(\\) requests"),
    )
    for change, message in cases:
        kwargs = dict(ok, **change)
        with pytest.raises(ValueError, match=message):
            engine.generate(kwargs.pop("prompts"), **kwargs)
    bad_engines = (
        (dict(vocab=VocabLayout(stop_ids=(EOS,))), "true vocab size"),
        (dict(vocab=VocabLayout(size=VOCAB)), "at least one stop id"),
        (dict(vocab=VOCAB), "must be a VocabLayout"),
        (dict(pad_id=VOCAB), "pad_id must be a token id"),
        (dict(max_batch_size=0), "max_batch_size must be"),
        (dict(solver_tol=0.0), "solver_tol must be > 0"),
    )
    for change, message in bad_engines:
        with pytest.raises(ValueError, match=message):
            MegatronRolloutEngine(student, teacher, groups,
                                  **dict(dict(vocab=LAYOUT, pad_id=PAD), **change))


def _body(rank, world, root):
    root = Path(root)
    for name in ("student", "teacher"):
        hf_to_megatron(root / f"{name}-hf", root / name, progress=False)
    results = {}
    for tp, pp in LAYOUTS:
        with parallel_layout(tp, pp) as groups:
            results[(tp, pp)] = _checks_at_layout(root, groups)
    # (5) the same tokens whatever the layout (TP=1, TP=2, PP=2).
    reference = results[LAYOUTS[0]]
    for layout, batches in results.items():
        for name, batch in batches.items():
            assert torch.equal(batch.tokens, reference[name].tokens), (layout, name)
            torch.testing.assert_close(batch.behaviour_logprobs,
                                       reference[name].behaviour_logprobs, **CLOSE)
            torch.testing.assert_close(batch.stat("beta"), reference[name].stat("beta"), **CLOSE)
            assert torch.equal(batch.source, reference[name].source), (layout, name)


def _inference_path_body(rank, world):
    from megatron.core.inference.contexts import StaticInferenceContext

    profile = detect_profile()
    groups = initialize_parallel(profile, tensor_parallel_size=2, pipeline_parallel_size=1,
                                 seed=SEED)
    model = tiny_gpt.tiny_gpt(profile, groups).eval()
    prompts, positions = torch.tensor([[2, 5, 7], [3, 4, 6]]), torch.arange(3).expand(2, 3)
    stage = CachedStage(model, groups, batch_size=2, max_length=8)
    with torch.no_grad(), _recorded(model) as calls:
        prefill = stage.step(prompts)
        stage.step(torch.tensor([[8], [9]]))
    # Only the last token's logits, gathered over TP; outside InferenceMode, 0.18+ returns
    # [2, 3, 64] for the prefill. CachedStage hands out this rank's shard of them.
    vocab = tiny_gpt.VOCAB
    shapes = [tuple(out.shape) for out in calls]
    assert shapes == [(2, 1, vocab)] * 2, shapes
    with torch.no_grad():
        recomputed = model(prompts, positions, None, runtime_gather_output=True)[:, -1]
    torch.testing.assert_close(calls[0][:, 0], recomputed, atol=1e-5, rtol=1e-5)
    shard = recomputed[:, rank * vocab // 2:(rank + 1) * vocab // 2]
    torch.testing.assert_close(prefill, shard, atol=1e-5, rtol=1e-5)
    # On that path GPTModel refuses to return TP shards. If this changes, CachedStage could skip
    # the all-gather (see cached_stage.py).
    with (torch.no_grad(), inference_mode(),
          pytest.raises(AssertionError, match="must always gather TP")):
        model(prompts, positions, None, inference_context=StaticInferenceContext(2, 4),
              runtime_gather_output=False)


def test_prefill_returns_last_token_logits_gathered_over_tp():
    run_distributed(_inference_path_body, 2)


def test_megatron_rollout_engine(tmp_path):
    make_hf_model(tmp_path / "student-hf", "qwen3", seed=0)
    make_hf_model(tmp_path / "teacher-hf", "qwen3", seed=1)
    run_distributed(_body, 2, str(tmp_path))
