"""One optimiser step of on-policy distillation on a RolloutBatch.

Legend: B sequences on this data-parallel rank, L sequence length, b microbatch size,
V local vocabulary shard (this TP rank's columns).

1. teacher scoring: the frozen teacher runs forward-only through the pipeline schedule; its
   [b, L, V] logit shards stay on the last stage (the loss needs them there);
2. student forward/backward through the same schedule with the method's objective
   (methods.objectives: the reverse KL, TrOPD, ...) at every position whose next token is a
   response token (token-mean over the global batch: every microbatch loss is
   sum(loss * mask) * num_microbatches * dp / N_global, which the schedule's
   1/num_microbatches and DDP's 1/dp turn into sum / N_global);
3. grads finalised (DP all-reduce, TP/PP shared weights), clipped, AdamW step.
The result is independent of the TP/PP/DP layout up to floating-point reassociation.

A stochastic objective (TrOPD's trust mask) draws U(0, 1) per token from
seeds.counter_uniform(noise_seed, row id, absolute position): the same draws on any layout and
after a resume.

The train-inference mismatch: at every response token the loss pass also recomputes the
behaviour log-prob log mu_trainer(y_t) (the token's beta as the rollout recorded it: 1 for a
teacher-prefix token, the student logits of this forward, the teacher logits of the scoring
pass, the same EOS merge and padding mask) and reports mean and max of
|log mu_engine(y_t) - log mu_trainer(y_t)| against the engine's value. Stale engine weights, a
wrong blend or numerical drift in the rollout engine all show up there.
"""

import dataclasses
import time

import torch
import torch.distributed as dist

from trb_megatron.methods import (TokenInputs, VocabLayout, blended_token_log_probs,
                                  counter_uniform, per_token_reverse_kl)
from trb_megatron.rollout.types import RolloutBatch


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-mean of the objective's loss over the global batch (what the gradient follows)."""
    reverse_kl: float
    """Token-mean exact per-prefix reverse KL(pi_S || pi_T) (equals loss for reverse_kl with
    the full estimator)."""
    grad_norm: float
    response_tokens: int
    logprob_diff_mean: float
    """Mean over response tokens of |log mu_engine(y_t) - log mu_trainer(y_t)|."""
    logprob_diff_max: float
    """Max of the same over the global batch."""
    teacher_seconds: float
    train_seconds: float
    objective_metrics: dict
    """The objective's own metrics (Objective.metrics of its global sums)."""


def _microbatches(batch: RolloutBatch, size: int, noise_seed: int | None):
    """Microbatches of `size` rows; logits at position t score token t + 1, so every per-token
    input is shifted one position left. noise_seed: draw each token's U(0, 1) (None: none)."""
    tokens = batch.tokens
    length = tokens.shape[1]
    # logits at position t predict token t + 1: train where token t + 1 is a response token.
    loss_mask = torch.zeros_like(batch.response_mask, dtype=torch.float32)
    loss_mask[:, :-1] = batch.response_mask[:, 1:].float()
    per_token = {"next_tokens": tokens, "next_beta": batch.stat("beta"),
                 "next_logprob": batch.behaviour_logprobs, "next_from_teacher": batch.from_teacher}
    positions = torch.arange(length, device=tokens.device).expand_as(tokens)
    if noise_seed is not None:
        per_token["next_uniform"] = counter_uniform(noise_seed, batch.row_ids.unsqueeze(1),
                                                    positions)
    shifted = {name: torch.roll(x, shifts=-1, dims=1) for name, x in per_token.items()}
    return [dict(tokens=tokens[i:i + size], positions=positions[i:i + size],
                 loss_mask=loss_mask[i:i + size],
                 **{name: x[i:i + size] for name, x in shifted.items()})
            for i in range(0, tokens.shape[0], size)]


class DistillStep:
    def __init__(self, ddp, teacher, optimizer, groups, vocab: VocabLayout, *, objective,
                 micro_batch_size: int, fused: bool = False):
        """objective: a methods objective (ReverseKL, TrOPD, ...); fused: compile the vocabulary
        passes that support it (BackendProfile.compile_trb)."""
        self.ddp, self.teacher, self.optimizer, self.groups = ddp, teacher, optimizer, groups
        self.vocab, self.objective, self.fused = vocab, objective, fused
        self.micro_batch_size = micro_batch_size
        self.last_stage = groups.pp.rank() == groups.pp.size() - 1

    def _schedule(self, model, microbatches, step_fn, forward_only):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = microbatches[0]["tokens"]
        return get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=first.shape[1],
            micro_batch_size=first.shape[0], forward_only=forward_only,
            collect_non_loss_data=forward_only)

    def _logprob_diff(self, student_NV, teacher_NV, mb) -> torch.Tensor:
        """[R] |log mu_engine - log mu_trainer| at the R response tokens of a microbatch."""
        rows = mb["loss_mask"].reshape(-1).nonzero().squeeze(1)
        with torch.no_grad():
            trainer = blended_token_log_probs(
                student_NV.detach()[rows], teacher_NV[rows], mb["next_beta"].reshape(-1)[rows],
                mb["next_tokens"].reshape(-1)[rows], group=self.groups.tp, vocab=self.vocab)
        engine = mb["next_logprob"].reshape(-1)[rows].to(trainer.dtype)
        return (engine - trainer).abs().double()

    def score_teacher(self, microbatches):
        """Teacher logit shards per microbatch ([b, L, V] on the last stage, None elsewhere)."""
        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb["tokens"], mb["positions"], None)
            return output, lambda logits, non_loss_data=False: logits

        with torch.no_grad():
            logits = self._schedule(self.teacher, microbatches, step_fn, forward_only=True)
        return logits if self.last_stage else [None] * len(microbatches)

    def __call__(self, batch: RolloutBatch, *, noise_seed: int | None = None) -> StepResult:
        """One step on `batch`; noise_seed keys a stochastic objective's per-token draws (the
        trainer passes one per optimiser step)."""
        from megatron.core.distributed import finalize_model_grads

        if self.objective.stochastic and noise_seed is None:
            raise ValueError(f"objective {self.objective.name} draws per-token noise: pass "
                             "noise_seed")
        microbatches = _microbatches(batch, self.micro_batch_size,
                                     noise_seed if self.objective.stochastic else None)
        start = time.perf_counter()
        for mb, teacher_logits in zip(microbatches, self.score_teacher(microbatches)):
            mb["teacher_logits"] = teacher_logits
        teacher_seconds = time.perf_counter() - start

        start = time.perf_counter()
        local_tokens = torch.tensor([float(batch.response_mask.sum())])
        dist.all_reduce(local_tokens, group=self.groups.dp)
        global_tokens = max(float(local_tokens), 1.0)
        scale = len(microbatches) * self.groups.dp.size() / global_tokens

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb["tokens"], mb["positions"], None)

            def loss_fn(logits):
                width = logits.shape[-1]
                student_NV = logits.reshape(-1, width)
                teacher_NV = mb["teacher_logits"].reshape(-1, width)
                uniforms = mb.get("next_uniform")
                inputs = TokenInputs(
                    tokens=mb["next_tokens"].reshape(-1),
                    from_teacher=mb["next_from_teacher"].reshape(-1),
                    uniforms=None if uniforms is None else uniforms.reshape(-1))
                terms = self.objective.terms(student_NV, teacher_NV, inputs,
                                             group=self.groups.tp, vocab=self.vocab,
                                             fused=self.fused)
                mask = mb["loss_mask"].reshape(-1).to(terms.loss.dtype)
                loss_sum = (terms.loss * mask).sum()
                exact = loss_sum.detach()
                if not self.objective.exact:
                    with torch.no_grad():
                        exact = (per_token_reverse_kl(student_NV, teacher_NV,
                                                      group=self.groups.tp,
                                                      vocab=self.vocab) * mask).sum()
                diff = self._logprob_diff(student_NV, teacher_NV, mb)
                sums = {f"sum/{name}": (terms.sums[name].to(mask.dtype) * mask).sum()
                        for name in self.objective.sum_names}
                # the schedule divides the returned loss in place: report copies
                return loss_sum * scale, {"loss_sum": loss_sum.detach().clone(),
                                          "exact_sum": exact.clone(),
                                          "diff_sum": diff.sum(),
                                          "diff_max": diff.max() if diff.numel() else diff.sum(),
                                          **sums}

            return output, loss_fn

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._schedule(self.ddp, microbatches, step_fn, forward_only=False)
        finalize_model_grads([self.ddp], pg_collection=self.groups)
        # One value for every rank: last-stage, TP-rank-0 ranks contribute their sums.
        contributes = self.last_stage and self.groups.tp.rank() == 0
        keys = ["loss_sum", "exact_sum", "diff_sum",
                *(f"sum/{name}" for name in self.objective.sum_names)]
        sums = torch.tensor([[float(r[k]) for k in keys] for r in reports]
                            if contributes and reports else [[0.0] * len(keys)],
                            dtype=torch.float64)
        total = sums.sum(0)
        dist.all_reduce(total)
        diff_max = torch.tensor([max((float(r["diff_max"]) for r in reports), default=0.0)
                                 if contributes else 0.0], dtype=torch.float64)
        dist.all_reduce(diff_max, op=dist.ReduceOp.MAX)
        totals = dict(zip(keys, total.tolist()))
        loss, reverse_kl, diff_mean = (totals[k] / global_tokens
                                       for k in ("loss_sum", "exact_sum", "diff_sum"))
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite loss {loss}")
        _, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        objective_totals = {k.removeprefix("sum/"): v for k, v in totals.items()
                            if k.startswith("sum/")}
        return StepResult(loss=loss, reverse_kl=reverse_kl, grad_norm=grad_norm,
                          response_tokens=int(global_tokens), logprob_diff_mean=diff_mean,
                          logprob_diff_max=float(diff_max), teacher_seconds=teacher_seconds,
                          train_seconds=time.perf_counter() - start,
                          objective_metrics=self.objective.metrics(objective_totals,
                                                                   global_tokens))
