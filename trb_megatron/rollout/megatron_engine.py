"""The "megatron" rollout backend: the trainer's own student and frozen teacher GPTModels decode
in lockstep with KV caches, and every token is drawn from the behaviour step's law
(methods.token_behaviour: a teacher-prefix token, the TRB blend, or the student alone) on the
vocab-parallel logits.

Tests: .venv/bin/python -m pytest tests/distributed/test_rollout_megatron.py -q

Legend: B rows (prompts x samples per prompt), L = longest prompt + max_new_tokens,
b rows of one decode batch, M rows drawing a token at a step, V this TP rank's vocabulary shard,
K = len(COLUMNS) per-token values.

A decode batch runs megatron's own static-batching scheme: every row starts at position 0. The
first step prefills the shortest prompt's length P_min of every row; each later step feeds one
token per row: the next prompt token of a row whose prompt is longer (what the models predict
there is ignored), the token the row drew at the previous step, or pad_id once the row has
stopped. Row b draws at positions P_b .. P_b + max_new_tokens - 1 (from the teacher before
teacher_until_b) and stops early on the canonical EOS (vocab.stop_ids[0]; the method functions
merge the other stop ids into it). No left padding and no attention mask are involved, so the
result is the same with local and Transformer Engine attention and a row's tokens do not depend
on the other rows (see request.py for the noise); the price is that prompt tokens beyond P_min
are fed one step at a time, which length-sorted decode batches (`max_batch_size`) keep small.
"""

import contextlib
from typing import Sequence

import torch
import torch.distributed as dist

from trb_megatron.methods import (BLEND_STATS, BehaviourStep, VocabLayout, describe_shard,
                                  sample_log_probs, token_behaviour)
from trb_megatron.methods.sampling import normalise
from trb_megatron.methods.seeds import position_seed
from trb_megatron.rollout.cached_stage import CachedStage
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.types import RolloutBatch

COLUMNS = ("token", "behaviour_logprob", "source", *BLEND_STATS)


def draw_tokens(student_MV, teacher_MV, behaviour: BehaviourStep, from_teacher_M, *, seed: int,
                row_ids_M, group, vocab, tol: float = 1e-6, fused: bool = False
                ) -> torch.Tensor:
    """Draw one token per row as `behaviour` says; returns [M, K] float64 with COLUMNS.

    student_MV, teacher_MV: [M, V] logits shards (vocabulary sharded over `group`); teacher_MV
    None when the behaviour does not run the teacher (student only: beta and the KLs are 0).
    from_teacher_M: [M] bool, rows drawing a teacher-prefix token. The token ids (exact in
    float64) and values are identical on every rank of `group`.
    """
    _check_finite(student_MV, group)
    pair = (student_MV,) if teacher_MV is None else (student_MV, teacher_MV)
    shard = describe_shard(*pair, group=group, vocab=vocab)
    eps_M = torch.full((student_MV.shape[0],), behaviour.eps, dtype=torch.float64,
                       device=student_MV.device)
    drawn = token_behaviour(student_MV, teacher_MV, eps_M, from_teacher_M, shard=shard, tol=tol,
                            fused=fused)
    sampled = sample_log_probs(normalise(drawn.logits, shard), shard, seed=seed,
                               row_ids=row_ids_M, temperature=behaviour.temperature)
    return torch.stack([sampled.token_ids.double(), sampled.log_prob.double(),
                        drawn.source.double(), *(drawn.stats()[k].double() for k in BLEND_STATS)],
                       dim=1)


def _check_finite(student_MV, group):
    """A student whose logits overflow has diverged (a numerical failure, not bad input): raise
    FloatingPointError on every rank of the group so the trainer can stop cleanly."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(student_MV).all()) else 1.0])
    if group is not None:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if bool(bad):
        raise FloatingPointError("the student's logits are not finite during rollout")


@contextlib.contextmanager
def _eval_mode(*models):
    """Put models in eval mode for the block, then restore each one's training flag."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


class MegatronRolloutEngine:
    """Rollouts from this rank's student and teacher GPTModel stages (the RolloutEngine protocol).

    student, teacher: this rank's stages from models.build_model (student trainable, teacher
    frozen), unwrapped (not DDP), with one TP/PP layout and one padded vocabulary; teacher None
    builds a student-only engine (evaluation), whose generate() accepts only behaviours that do
    not run the teacher. groups: the
    ProcessGroupCollection of initialize_parallel. vocab: VocabLayout with the true vocab size
    and the stop ids (student's EOS first), e.g. models.pairing.shared_vocab_layout. pad_id:
    fills rows after they stop. max_batch_size: rows per decode batch (KV-cache memory grows
    with it; None: all rows at once). solver_tol: absolute KL tolerance of the beta solver
    (nats; KL(mu || pi_S) <= eps + solver_tol). fused_solver: compile the solver's pass (GPUs).
    Every rank of a model replica (its TP x PP ranks) calls generate() with the same request.
    """

    def __init__(self, student, teacher, groups, *, vocab: VocabLayout, pad_id: int,
                 max_batch_size: int | None = None, solver_tol: float = 1e-6,
                 fused_solver: bool = False):
        if not isinstance(vocab, VocabLayout) or vocab.size is None or not vocab.stop_ids:
            raise ValueError(
                f"vocab must be a VocabLayout with the true vocab size and at least one stop id "
                f"(models.pairing.shared_vocab_layout builds it), got {vocab!r}; without the "
                "size Megatron's padding columns could be sampled")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab.size:
            raise ValueError(f"pad_id must be a token id in [0, {vocab.size}), got {pad_id!r}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(
                max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be an int >= 1 or None, got {max_batch_size!r}")
        if not solver_tol > 0:
            raise ValueError(f"solver_tol must be > 0 (nats), got {solver_tol!r}")
        self.student, self.teacher, self.groups = student, teacher, groups
        self.vocab, self.pad_id = vocab, pad_id
        self.max_batch_size = max_batch_size
        self.solver_tol, self.fused_solver = solver_tol, fused_solver
        self.max_positions = min(m.max_sequence_length for m in self._models())
        self.device = next(student.parameters()).device

    def _models(self) -> list:
        return [self.student] + ([] if self.teacher is None else [self.teacher])

    def sync_weights(self) -> None:
        """Nothing to do: the engine decodes the trainer's own student."""

    def release_teacher(self) -> None:
        """Nothing to do: a behaviour step that does not need the teacher never runs it here."""

    def shutdown(self) -> None:
        """Nothing to do: the engine holds only the trainer's own models."""

    def generate(self, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                 max_new_tokens: int, behaviour: BehaviourStep, seed: int,
                 prompt_offset: int = 0) -> RolloutBatch:
        """Sample `samples_per_prompt` responses per prompt as `behaviour` says (the teacher
        runs only when behaviour.teacher_runs; an engine without a teacher refuses such steps).

        prompts: token id sequences; seed: the same on every data-parallel rank;
        prompt_offset: global index of prompts[0] in this step's prompts across data-parallel
        ranks (rows are numbered (prompt_offset + i) * samples_per_prompt + s for the sampling
        noise). behaviour.temperature: sample from softmax(log mu / temperature) (1: the blend
        itself, as distillation needs; 0: greedy); the beta solve is unaffected. Deterministic
        in (seed, row id, position) and independent of TP size and batching. Returns the
        RolloutBatch on the models' device, identical on every rank of the model replica;
        ValueError on invalid input.
        """
        request = RolloutRequest.build(
            prompts, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
            behaviour=behaviour, seed=seed, prompt_offset=prompt_offset,
            vocab_size=self.vocab.size, max_positions=self.max_positions)
        request.check_same_on(self.groups.mp, self.device)
        if self.teacher is None and behaviour.teacher_runs:
            raise ValueError(f"{behaviour} needs the teacher, but this engine was built with "
                             "teacher=None (student-only sampling); pass a student-only "
                             "behaviour (BehaviourStep()), or build the engine with the teacher")
        tokens_BL = request.initial_tokens(self.pad_id).to(self.device)
        values_BLK = torch.zeros(*tokens_BL.shape, len(COLUMNS), dtype=torch.float64,
                                 device=self.device)
        drawn_BL = torch.zeros_like(tokens_BL, dtype=torch.bool)
        with torch.no_grad(), _eval_mode(*self._models()):
            for rows_b in request.decode_batches(self.max_batch_size):
                self._decode(request, rows_b.to(self.device), tokens_BL, values_BLK, drawn_BL)
        return self._batch(request, tokens_BL, values_BLK, drawn_BL)

    def _decode(self, request: RolloutRequest, rows_b, tokens_BL, values_BLK, drawn_BL):
        """Decode rows `rows_b` in lockstep, writing their tokens and values in place."""
        lengths_b = request.prompt_lengths_B.to(self.device)[rows_b]
        until_b = request.teacher_until_B.to(self.device)[rows_b]
        row_ids_b = request.row_ids_B.to(self.device)[rows_b]
        width = int(lengths_b.max()) + request.max_new_tokens
        tokens_bL = tokens_BL[rows_b, :width]
        models = [self.student] + ([self.teacher] if request.behaviour.teacher_runs else [])
        stages = [CachedStage(m, self.groups, batch_size=len(rows_b), max_length=width)
                  for m in models]
        done_b = torch.zeros_like(lengths_b, dtype=torch.bool)
        start, pos = 0, int(lengths_b.min())
        while True:
            logits = [stage.step(tokens_bL[:, start:pos]) for stage in stages]
            active_b = (lengths_b <= pos) & ~done_b
            if bool(active_b.any()):
                drawn_MK = self._draw(logits, active_b, row_ids_b[active_b],
                                      pos < until_b[active_b], request, pos)
                token_M = drawn_MK[:, 0].long()
                tokens_bL[active_b, pos] = token_M
                values_BLK[rows_b[active_b], pos] = drawn_MK
                drawn_BL[rows_b[active_b], pos] = True
                full_M = pos + 1 - lengths_b[active_b] >= request.max_new_tokens
                done_b[active_b] = (token_M == self.vocab.stop_ids[0]) | full_M
            if bool(done_b.all()):
                break
            start, pos = pos, pos + 1
        tokens_BL[rows_b, :width] = tokens_bL

    def _draw(self, logits, active_b, row_ids_M, from_teacher_M, request: RolloutRequest,
              pos: int):
        """[M, K] draws of the active rows at position `pos` on every rank: computed by the last
        pipeline stage's TP ranks, then broadcast over the pipeline group."""
        pp = self.groups.pp
        if pp.rank() == pp.size() - 1:
            student_MV = logits[0][active_b]
            teacher_MV = logits[1][active_b] if len(logits) > 1 else None
            drawn_MK = draw_tokens(student_MV, teacher_MV, request.behaviour, from_teacher_M,
                                   seed=position_seed(request.seed, pos), row_ids_M=row_ids_M,
                                   group=self.groups.tp, vocab=self.vocab, tol=self.solver_tol,
                                   fused=self.fused_solver)
        else:
            drawn_MK = torch.empty(len(row_ids_M), len(COLUMNS), dtype=torch.float64,
                                   device=self.device)
        if pp.size() > 1:
            dist.broadcast(drawn_MK, group=pp, group_src=pp.size() - 1)
        return drawn_MK

    def _batch(self, request: RolloutRequest, tokens_BL, values_BLK, drawn_BL) -> RolloutBatch:
        lengths_B = request.prompt_lengths_B.to(self.device)
        response_B = drawn_BL.sum(dim=1)
        last_B = tokens_BL.gather(1, (lengths_B + response_B - 1).unsqueeze(1)).squeeze(1)
        stopped = (last_B == self.vocab.stop_ids[0]).tolist()
        column = {name: values_BLK[..., k] for k, name in enumerate(COLUMNS)}
        return RolloutBatch(
            tokens=tokens_BL,
            prompt_lengths=lengths_B,
            response_lengths=response_B,
            response_mask=drawn_BL,
            behaviour_logprobs=column["behaviour_logprob"].float(),
            source=column["source"].to(torch.int8),
            stats={name: column[name].float() for name in BLEND_STATS}
            if request.behaviour.teacher_runs else {},
            finish_reasons=tuple("stop" if s else "length" for s in stopped),
            prompt_index=request.prompt_index_B.to(self.device),
            row_ids=request.row_ids_B.to(self.device),
            behaviour=request.behaviour,
        )
