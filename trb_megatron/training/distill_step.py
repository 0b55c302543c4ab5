"""One optimiser step of on-policy distillation on a RolloutBatch.

Legend: B sequences on this data-parallel rank, L sequence length, b microbatch size,
V local vocabulary shard (this TP rank's columns).

1. teacher scoring: the frozen teacher runs forward-only through the pipeline schedule; its
   [b, L, V] logit shards stay on the last stage (the loss needs them there);
2. student forward/backward through the same schedule with the vocab-parallel per-prefix reverse
   KL(pi_S || pi_T) at every position whose next token is a response token (token-mean over the
   global batch: every microbatch loss is sum(kl * mask) * num_microbatches * dp / N_global,
   which the schedule's 1/num_microbatches and DDP's 1/dp turn into sum / N_global);
3. grads finalised (DP all-reduce, TP/PP shared weights), clipped, AdamW step.
The result is independent of the TP/PP/DP layout up to floating-point reassociation.

The train-inference mismatch: at every response token the loss pass also recomputes the
behaviour log-prob log mu_trainer(y_t) (the token's beta, the student logits of this forward,
the teacher logits of the scoring pass, the same EOS merge and padding mask) and reports mean
and max of |log mu_engine(y_t) - log mu_trainer(y_t)| against the engine's value. Stale engine
weights, a wrong blend or numerical drift in the rollout engine all show up there.
"""

import dataclasses
import time

import torch
import torch.distributed as dist

from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.trb import VocabLayout, blended_token_log_probs, per_token_reverse_kl


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-mean of the chosen estimator over the global batch (what the gradient follows)."""
    reverse_kl: float
    """Token-mean exact per-prefix reverse KL(pi_S || pi_T) (equals loss for "full")."""
    grad_norm: float
    response_tokens: int
    logprob_diff_mean: float
    """Mean over response tokens of |log mu_engine(y_t) - log mu_trainer(y_t)|."""
    logprob_diff_max: float
    """Max of the same over the global batch."""
    teacher_seconds: float
    train_seconds: float


def _microbatches(batch: RolloutBatch, size: int):
    tokens = batch.tokens
    length = tokens.shape[1]
    # logits at position t predict token t + 1: train where token t + 1 is a response token.
    loss_mask = torch.zeros_like(batch.response_mask, dtype=torch.float32)
    loss_mask[:, :-1] = batch.response_mask[:, 1:].float()
    shifted = {name: torch.roll(x, shifts=-1, dims=1) for name, x in (
        ("next_tokens", tokens), ("next_beta", batch.beta),
        ("next_logprob", batch.behaviour_logprobs))}
    positions = torch.arange(length).expand_as(tokens)
    return [dict(tokens=tokens[i:i + size], positions=positions[i:i + size],
                 loss_mask=loss_mask[i:i + size],
                 **{name: x[i:i + size] for name, x in shifted.items()})
            for i in range(0, tokens.shape[0], size)]


class DistillStep:
    def __init__(self, ddp, teacher, optimizer, groups, vocab: VocabLayout, *, estimator: str,
                 topk: int, micro_batch_size: int, fused: bool = False):
        """fused: compile the `full` loss's vocabulary passes (BackendProfile.compile_trb)."""
        self.ddp, self.teacher, self.optimizer, self.groups = ddp, teacher, optimizer, groups
        self.vocab, self.estimator, self.topk, self.fused = vocab, estimator, topk, fused
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

    def __call__(self, batch: RolloutBatch) -> StepResult:
        from megatron.core.distributed import finalize_model_grads

        microbatches = _microbatches(batch, self.micro_batch_size)
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
                kl = per_token_reverse_kl(
                    logits.reshape(-1, width), mb["teacher_logits"].reshape(-1, width),
                    group=self.groups.tp, estimator=self.estimator, vocab=self.vocab,
                    topk=self.topk, tokens=mb["next_tokens"].reshape(-1), fused=self.fused)
                mask = mb["loss_mask"].reshape(-1).to(kl.dtype)
                kl_sum = (kl * mask).sum()
                exact = kl_sum.detach()
                if self.estimator != "full":
                    with torch.no_grad():
                        exact = (per_token_reverse_kl(
                            logits.reshape(-1, width), mb["teacher_logits"].reshape(-1, width),
                            group=self.groups.tp, vocab=self.vocab) * mask).sum()
                diff = self._logprob_diff(logits.reshape(-1, width),
                                          mb["teacher_logits"].reshape(-1, width), mb)
                # the schedule divides the returned loss in place: report copies
                return kl_sum * scale, {"kl_sum": kl_sum.detach().clone(),
                                        "exact_sum": exact.clone(),
                                        "diff_sum": diff.sum(),
                                        "diff_max": diff.max() if diff.numel() else diff.sum()}

            return output, loss_fn

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._schedule(self.ddp, microbatches, step_fn, forward_only=False)
        finalize_model_grads([self.ddp], pg_collection=self.groups)
        # One value for every rank: last-stage, TP-rank-0 ranks contribute their sums.
        contributes = self.last_stage and self.groups.tp.rank() == 0
        keys = ("kl_sum", "exact_sum", "diff_sum")
        sums = torch.tensor([[float(r[k]) for k in keys] for r in reports]
                            if contributes and reports else [[0.0] * len(keys)],
                            dtype=torch.float64)
        total = sums.sum(0)
        dist.all_reduce(total)
        diff_max = torch.tensor([max((float(r["diff_max"]) for r in reports), default=0.0)
                                 if contributes else 0.0], dtype=torch.float64)
        dist.all_reduce(diff_max, op=dist.ReduceOp.MAX)
        loss, reverse_kl, diff_mean = (float(x) / global_tokens for x in total)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite loss {loss}")
        _, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        return StepResult(loss=loss, reverse_kl=reverse_kl, grad_norm=grad_norm,
                          response_tokens=int(global_tokens), logprob_diff_mean=diff_mean,
                          logprob_diff_max=float(diff_max), teacher_seconds=teacher_seconds,
                          train_seconds=time.perf_counter() - start)
