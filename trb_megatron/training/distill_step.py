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
"""

import dataclasses
import time

import torch
import torch.distributed as dist

from trb_megatron.rollout.types import RolloutBatch
from trb_megatron.trb import VocabLayout, per_token_reverse_kl


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-mean of the chosen estimator over the global batch (what the gradient follows)."""
    reverse_kl: float
    """Token-mean exact per-prefix reverse KL(pi_S || pi_T) (equals loss for "full")."""
    grad_norm: float
    response_tokens: int
    teacher_seconds: float
    train_seconds: float


def _microbatches(batch: RolloutBatch, size: int):
    tokens = batch.tokens
    length = tokens.shape[1]
    # logits at position t predict token t + 1: train where token t + 1 is a response token.
    loss_mask = torch.zeros_like(batch.response_mask, dtype=torch.float32)
    loss_mask[:, :-1] = batch.response_mask[:, 1:].float()
    next_tokens = torch.roll(tokens, shifts=-1, dims=1)
    positions = torch.arange(length).expand_as(tokens)
    return [dict(tokens=tokens[i:i + size], positions=positions[i:i + size],
                 loss_mask=loss_mask[i:i + size], next_tokens=next_tokens[i:i + size])
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
                # the schedule divides the returned loss in place: report copies
                return kl_sum * scale, {"kl_sum": kl_sum.detach().clone(),
                                        "exact_sum": exact.clone()}

            return output, loss_fn

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._schedule(self.ddp, microbatches, step_fn, forward_only=False)
        finalize_model_grads([self.ddp], pg_collection=self.groups)
        # One value for every rank: last-stage, TP-rank-0 ranks contribute their sums.
        contributes = self.last_stage and self.groups.tp.rank() == 0
        sums = torch.tensor([[float(r["kl_sum"]), float(r["exact_sum"])] for r in reports]
                            if contributes and reports else [[0.0, 0.0]], dtype=torch.float64)
        total = sums.sum(0)
        dist.all_reduce(total)
        loss, reverse_kl = (float(x) / global_tokens for x in total)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"non-finite loss {loss}")
        _, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm}")
        return StepResult(loss=loss, reverse_kl=reverse_kl, grad_norm=grad_norm, response_tokens=int(global_tokens),
                          teacher_seconds=teacher_seconds,
                          train_seconds=time.perf_counter() - start)
