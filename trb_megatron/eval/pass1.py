"""pass@1 of the student: k samples per problem from the rollout engine (the student alone), each
verified against the reference answer; pass@1 = mean over problems of the fraction of correct
samples.

    from trb_megatron.eval import evaluate_pass1
    engine = MegatronRolloutEngine(student, None, groups, vocab=vocab, pad_id=vocab.stop_ids[0])
    result = evaluate_pass1(engine, prompt_set, tokenizer, samples=4, max_new_tokens=1024,
                            seed=0, verifier="math", dp_group=groups.dp)
    result.pass1, result.mean_response_tokens, result.per_problem[0].responses

Tests: .venv/bin/python -m pytest tests/distributed/test_eval.py -q

Data parallelism: data-parallel rank r of D evaluates the contiguous problems
[r * ceil(N / D), (r + 1) * ceil(N / D)) and passes each problem's index in the whole set as the
engine's prompt_offset, so every sample draws the same noise whatever D, the TP/PP layout or
`problems_per_call`; the per-problem results are then gathered over the data-parallel group and
every rank returns the same EvalResult.
"""

import dataclasses
import math
from typing import Callable

import torch.distributed as dist

from trb_megatron.data.prompts import PromptSet
from trb_megatron.methods import BehaviourStep
from trb_megatron.eval.verify import get_verifier


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    """One problem: its index in the PromptSet, and per sample (in sample order) whether it was
    correct, its length in tokens (the EOS included), how it finished ("stop" | "length") and its
    decoded text (EOS and special tokens removed)."""

    index: int
    correct: tuple[bool, ...]
    response_tokens: tuple[int, ...]
    finish_reasons: tuple[str, ...]
    responses: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """problems, samples (k per problem); pass1: mean over problems of the fraction of correct
    samples; mean_response_tokens: mean response length (EOS included); truncated_fraction:
    share of samples cut at max_new_tokens; per_problem: ProblemResult in PromptSet order."""

    problems: int
    samples: int
    pass1: float
    mean_response_tokens: float
    truncated_fraction: float
    per_problem: tuple[ProblemResult, ...]

    def to_dict(self) -> dict:
        """JSON-ready dict (per_problem as a list of dicts)."""
        return dataclasses.asdict(self)


def decode_responses(batch, tokenizer) -> list[str]:
    """The response text of every row of a RolloutBatch: the tokens at response_mask without
    the final EOS of a stopped row, decoded with special tokens skipped."""
    texts = []
    for b in range(batch.tokens.shape[0]):
        ids = batch.tokens[b][batch.response_mask[b]].tolist()
        if batch.finish_reasons[b] == "stop":
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def dp_share(problems: int, dp_rank: int, dp_size: int) -> range:
    """The problem indices data-parallel rank `dp_rank` of `dp_size` evaluates (may be empty)."""
    per_rank = math.ceil(problems / dp_size)
    return range(min(problems, dp_rank * per_rank), min(problems, (dp_rank + 1) * per_rank))


def evaluate_pass1(engine, prompt_set: PromptSet, tokenizer, *, samples: int,
                   max_new_tokens: int, seed: int, verifier: str | Callable[[str, str], bool],
                   temperature: float = 1.0, dp_group=None,
                   problems_per_call: int = 32) -> EvalResult:
    """pass@1 over `samples` samples per problem of prompt_set (which needs answers).

    engine: a rollout engine (MegatronRolloutEngine, teacher optional), sampled from the student
    alone (methods.BehaviourStep(temperature=temperature));
    tokenizer: the student's (decodes responses); verifier: a name of eval.verify.VERIFIERS
    ("math", "exact", "toy") or a function (response_text, answer) -> bool; temperature: 1
    samples the student's distribution, 0 is greedy; dp_group: the data-parallel process group
    (None: this process evaluates every problem); problems_per_call: problems per generate()
    call (bounds the [rows, length] tensors). Collective over dp_group; every rank of every
    model replica must call it with the same arguments. ValueError on bad input.
    """
    if prompt_set.answers is None:
        raise ValueError("prompt_set has no answers: load it with DataConfig.answer_field set to "
                         "the column of reference answers")
    if len(prompt_set) == 0:
        raise ValueError(f"prompt_set is empty ({prompt_set.loaded} rows loaded, "
                         f"{prompt_set.dropped_too_long} dropped as too long): raise "
                         "max_prompt_tokens or check the data")
    for name, value in (("samples", samples), ("problems_per_call", problems_per_call)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    check = get_verifier(verifier) if isinstance(verifier, str) else verifier
    rank, size = (0, 1) if dp_group is None else (dp_group.rank(), dp_group.size())
    mine = dp_share(len(prompt_set), rank, size)
    results = []
    for start in range(mine.start, mine.stop, problems_per_call):
        stop = min(start + problems_per_call, mine.stop)
        batch = engine.generate(prompt_set.token_ids[start:stop], samples_per_prompt=samples,
                                max_new_tokens=max_new_tokens,
                                behaviour=BehaviourStep(temperature=temperature), seed=seed,
                                prompt_offset=start)
        texts = decode_responses(batch, tokenizer)
        lengths = batch.response_lengths.tolist()
        for i in range(stop - start):
            rows = range(i * samples, (i + 1) * samples)  # rows are prompt-major
            answer = prompt_set.answers[start + i]
            results.append(ProblemResult(
                index=start + i,
                correct=tuple(bool(check(texts[b], answer)) for b in rows),
                response_tokens=tuple(int(lengths[b]) for b in rows),
                finish_reasons=tuple(batch.finish_reasons[b] for b in rows),
                responses=tuple(texts[b] for b in rows)))
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, results, group=dp_group)
        results = [r for part in gathered for r in part]
    assert [r.index for r in results] == list(range(len(prompt_set)))
    flat_lengths = [n for r in results for n in r.response_tokens]
    flat_finish = [f for r in results for f in r.finish_reasons]
    return EvalResult(
        problems=len(results), samples=samples,
        pass1=sum(sum(r.correct) / samples for r in results) / len(results),
        mean_response_tokens=sum(flat_lengths) / len(flat_lengths),
        truncated_fraction=flat_finish.count("length") / len(flat_finish),
        per_problem=tuple(results))
