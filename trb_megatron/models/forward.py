"""Forward-only logits of a (TP/PP-split) GPTModel, gathered onto every rank.

For checks and evaluation, not for training: it gathers the whole vocabulary. The pipeline
schedule runs the stages; the last stage's TP shards are all-gathered and then broadcast over
the pipeline group.
"""

import torch
import torch.distributed as dist


def full_logits(model, input_ids_BS: torch.Tensor, pg_collection, vocab_size: int):
    """[B, S, vocab_size] float32 logits of next-token prediction, identical on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids_BS.shape
    positions = torch.arange(seq, device=input_ids_BS.device).expand(batch, seq)

    def forward_step(data_iterator, stage):
        tokens = next(data_iterator)
        output = stage(tokens, positions, None)

        def keep_logits(logits, non_loss_data=False):
            return logits

        return output, keep_logits

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([input_ids_BS]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
            collect_non_loss_data=True)
    tp, pp = pg_collection.tp, pg_collection.pp
    last_stage = pp.rank() == pp.size() - 1
    if last_stage:
        local = collected[0].float().contiguous()
        shards = [torch.empty_like(local) for _ in range(tp.size())]
        dist.all_gather(shards, local, group=tp)
        logits = torch.cat(shards, dim=-1)[..., :vocab_size].contiguous()
    else:
        logits = torch.empty(batch, seq, vocab_size, dtype=torch.float32,
                             device=input_ids_BS.device)
    if pp.size() > 1:
        dist.broadcast(logits, group=pp, group_src=pp.size() - 1)
    return logits
