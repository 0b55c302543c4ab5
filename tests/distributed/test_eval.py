"""pass@1 evaluation on real gloo processes with a tiny Qwen3 converted from Hugging Face, and the
student-only rollout engine (teacher=None) and sampling temperature it relies on.

Run: .venv/bin/python -m pytest tests/distributed/test_eval.py -q

One 2-process launch: (1) an engine without a teacher samples exactly what an engine with one
does for the student-only behaviour and refuses behaviours that run the teacher (eps > 0, a
teacher prefix); (2) temperature 0 (greedy) and 0.7 draws equal a teacher-forced reference
(methods.sample_tokens on recomputed logits); (3) evaluate_pass1 at DP=2
(uneven shares, several generate() calls) reproduces responses recorded from one generate() call
over all problems, and its pass@1 equals the count over those recorded responses with the
"exact" verifier; greedy answers give pass@1 = 1.0, perturbed ones 0.0; (4) TP=2 (DP=1) gives
the identical EvalResult. Then the CLI evaluates the Hugging Face directory end to end (one
launch of 2 processes) on a file whose answers are the greedy responses for 3 of 5 problems.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.hf_models import VOCAB, make_hf_model
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.data import DataConfig, load_prompts, load_tokenizer
from trb_megatron.eval import decode_responses, evaluate_pass1
from trb_megatron.eval.command import main
from trb_megatron.models.forward import full_logits
from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine
from trb_megatron.methods import BehaviourStep, VocabLayout, sample_tokens
from trb_megatron.methods.seeds import position_seed

pytestmark = pytest.mark.megatron

PAD, EOS = 0, 1  # tests/hf_models tokenizer: <pad>, <eos>
LAYOUT = VocabLayout(size=VOCAB, stop_ids=(EOS,))
PROMPTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"]
SAMPLES, MAX_NEW, SEED = 3, 6, 77
ROOT = Path(__file__).resolve().parents[2]


def _generate(engine, prompts, *, temperature=1.0, **kwargs):
    kwargs = dict(dict(samples_per_prompt=SAMPLES, max_new_tokens=MAX_NEW, seed=SEED,
                       behaviour=BehaviourStep(temperature=temperature)), **kwargs)
    return engine.generate(prompts, **kwargs)


def _check_temperature(engine, student, groups, prompts, temperature):
    """Every drawn token and its log-prob equal methods.sample_tokens at `temperature` on the full
    recomputed logits of its prefix, with the engine's noise (step seed, row id)."""
    batch = _generate(engine, prompts, temperature=temperature)
    full = full_logits(student, batch.tokens, groups, VOCAB)
    rows, positions = batch.response_mask.nonzero(as_tuple=True)
    for p in positions.unique().tolist():
        r = rows[positions == p]
        drawn = sample_tokens(full[r, p - 1], seed=position_seed(SEED, p), row_ids=r, vocab=LAYOUT,
                              temperature=temperature)
        assert batch.tokens[r, p].tolist() == drawn.token_ids.tolist()
        torch.testing.assert_close(batch.behaviour_logprobs[r, p].double(), drawn.log_prob,
                                   atol=2e-5, rtol=1e-4)
    return batch


def _evaluate(engine, prompts, tokenizer, groups, **kwargs):
    kwargs = dict(dict(samples=SAMPLES, max_new_tokens=MAX_NEW, seed=SEED, verifier="exact",
                       dp_group=groups.dp, problems_per_call=2), **kwargs)
    return evaluate_pass1(engine, prompts, tokenizer, **kwargs)


def _dp2_checks(root, prompts, tokenizer, groups):
    _, student = load_megatron(root / "megatron", groups)
    _, teacher = load_megatron(root / "megatron", groups)
    engine = MegatronRolloutEngine(student, None, groups, vocab=LAYOUT, pad_id=PAD)

    # (1) teacher=None: the same draws as with a teacher for the student alone; behaviours that
    # run the teacher are refused.
    recorded = _generate(engine, prompts.token_ids)
    with_teacher = MegatronRolloutEngine(student, teacher, groups, vocab=LAYOUT, pad_id=PAD)
    assert torch.equal(_generate(with_teacher, prompts.token_ids).tokens, recorded.tokens)
    for behaviour in (BehaviourStep(eps=0.01), BehaviourStep(prefix_max=2)):
        with pytest.raises(ValueError, match=r"needs the teacher, but this engine was "
                                             r"built with teacher=None"):
            _generate(engine, prompts.token_ids, behaviour=behaviour)

    # (2) temperature 0 (greedy: all samples of a prompt agree) and 0.7 against the reference.
    greedy = _check_temperature(engine, student, groups, prompts.token_ids, 0.0)
    assert all(torch.equal(greedy.tokens[i], greedy.tokens[i - i % SAMPLES])
               for i in range(len(greedy.tokens)))
    _check_temperature(engine, student, groups, prompts.token_ids, 0.7)

    # (3) counting: answers = sample 0's recorded response for even problems, else perturbed.
    texts = decode_responses(recorded, tokenizer)
    answers = [texts[i * SAMPLES] + ("" if i % 2 == 0 else " w7") for i in range(len(prompts))]
    expected = sum(sum(texts[i * SAMPLES + s].strip() == answers[i].strip()
                       for s in range(SAMPLES)) / SAMPLES
                   for i in range(len(prompts))) / len(prompts)
    result = _evaluate(engine, dataclasses.replace(prompts, answers=answers), tokenizer, groups)
    assert result.pass1 == pytest.approx(expected) and 0 < expected < 1
    assert [r for p in result.per_problem for r in p.responses] == texts
    assert [n for p in result.per_problem for n in p.response_tokens] == \
        recorded.response_lengths.tolist()
    assert result.mean_response_tokens == pytest.approx(recorded.response_lengths.double().mean())
    assert (result.problems, result.samples) == (len(prompts), SAMPLES)

    # greedy answers: pass@1 = 1.0 exactly; perturbed: 0.0.
    greedy_texts = decode_responses(greedy, tokenizer)[::SAMPLES]
    exact = _evaluate(engine, dataclasses.replace(prompts, answers=greedy_texts), tokenizer,
                      groups, temperature=0.0)
    assert exact.pass1 == 1.0
    perturbed = [t + " w7" for t in greedy_texts]
    wrong = _evaluate(engine, dataclasses.replace(prompts, answers=perturbed), tokenizer, groups,
                      temperature=0.0)
    assert wrong.pass1 == 0.0
    with pytest.raises(ValueError, match="prompt_set has no answers"):
        _evaluate(engine, dataclasses.replace(prompts, answers=None), tokenizer, groups)
    return dataclasses.replace(prompts, answers=answers), result, greedy_texts


def _body(rank, world, root):
    root = Path(root)
    hf_to_megatron(root / "hf", root / "megatron", progress=False)
    tokenizer = load_tokenizer(root / "megatron")
    prompts = load_prompts(DataConfig(path_or_name=str(root / "prompts.jsonl"),
                                      chat_template=False), root / "megatron")
    with parallel_layout(1, 1) as groups:
        assert groups.dp.size() == 2
        prompts, dp2, greedy_texts = _dp2_checks(root, prompts, tokenizer, groups)
    # (4) TP=2, DP=1: the identical result (same noise per problem whatever the layout).
    with parallel_layout(2, 1) as groups:
        _, student = load_megatron(root / "megatron", groups)
        engine = MegatronRolloutEngine(student, None, groups, vocab=LAYOUT, pad_id=PAD)
        assert _evaluate(engine, prompts, tokenizer, groups, problems_per_call=32) == dp2
    if rank == 0:
        (root / "greedy.json").write_text(json.dumps(greedy_texts))


def test_eval_and_cli(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen3", seed=0)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run_distributed(_body, 2, str(tmp_path))

    greedy = json.loads((tmp_path / "greedy.json").read_text())
    answers = [g if i < 3 else g + " w7" for i, g in enumerate(greedy)]
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"question": p, "solution": a}) + "\n" for p, a in zip(PROMPTS, answers)))
    out = tmp_path / "results" / "eval.json"
    command = [sys.executable, "-m", "trb_megatron.eval", "--checkpoint", str(tmp_path / "hf"),
               "--data", str(tmp_path / "data.jsonl"), "--prompt-field", "question",
               "--answer-field", "solution", "--no-chat-template", "--verifier", "exact",
               "--samples", "2", "--max-new-tokens", str(MAX_NEW), "--temperature", "0",
               "--nproc", "2", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "problems  samples   pass@1" in run.stdout
    assert "       5        2   0.6000" in run.stdout, run.stdout
    record = json.loads(out.read_text())
    assert (record["problems"], record["samples"], record["dp"], record["pass1"]) == (5, 2, 2, 0.6)
    assert [p["responses"] for p in record["per_problem"]] == [[g, g] for g in greedy]
    assert [p["correct"] for p in record["per_problem"]] == [[True] * 2] * 3 + [[False] * 2] * 2
    assert record["per_problem"][1]["prompt"] == "w4" and record["loaded"] == 5
    assert not list(Path(tmp_path).glob("trb-eval-*")), "the temporary conversion was left"


def test_cli_rejects_bad_input_before_starting_processes(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen3", seed=0)
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "w1", "answer": "2"}) + "\n")
    base = ["--checkpoint", str(tmp_path / "hf"), "--data", str(tmp_path / "data.jsonl"),
            "--max-new-tokens", "8"]
    for extra, message in (
            (["--no-chat-template", "--answer-field", "solution"],
             "data.answer_field='solution' is not a column"),
            (["--no-chat-template", "--verifier", "gsm"], "verifier must be one of math, exact"),
            (["--no-chat-template", "--max-new-tokens", "64"], "leaves no room for a prompt"),
            (["--no-chat-template", "--tp", "3"], "TP=3"),
            (["--no-chat-template", "--nproc", "3", "--tp", "2"], "must be a multiple of TP x PP"),
            ([], "data.chat_template is true but the tokenizer"),
            (["--checkpoint", str(tmp_path)], "is not a Hugging Face model directory"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(base + extra)
