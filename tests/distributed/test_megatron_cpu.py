"""Megatron-Core on CPU with gloo: the same loss and gradients under TP=2 and TP=2 x PP=2 as on
one rank, TP-rank dropout streams, and a DistributedOptimizer checkpoint resharded across TP/DP.

Run: .venv/bin/python -m pytest tests/distributed/test_megatron_cpu.py -q
Each test is one launch of real gloo processes (a launch costs seconds); the reference is built
at TP=1 in the same processes, where the model does no communication, i.e. a single-process run.
"""

import re

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.tiny_gpt import tiny_batch, tiny_gpt, tiny_loss
from trb_megatron.parallel import detect_profile, initialize_parallel, install_cpu_backend
from trb_megatron.parallel.cpu_backend import CpuDeviceMode

pytestmark = pytest.mark.megatron

SEED = 1234
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _tp_shard(full: torch.Tensor, param: torch.nn.Parameter, tp_group) -> torch.Tensor:
    """This rank's shard of a TP=1 tensor, split as megatron's CPU initialisation splits it."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, stride = tp_group.size(), param.partition_stride
    chunks = torch.chunk(full, size * stride, dim=param.partition_dim)
    return torch.cat(chunks[tp_group.rank() :: size], dim=param.partition_dim)


def _assert_grads_match(model, reference_grads, groups, layer_offset=0):
    """model's main_grads (after finalize_model_grads) equal the TP=1 grads of the same weights."""
    for name, param in model.named_parameters():
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m[1]) + layer_offset}.", name)
        if name == "output_layer.weight" and name not in reference_grads:  # tied, last stage
            name = "embedding.word_embeddings.weight"
        expected = _tp_shard(reference_grads[name], param, groups.tp)
        torch.testing.assert_close(param.main_grad, expected, **TOLERANCE, msg=name)


def _ddp(model, use_distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    return DistributedDataParallel(model.config, ddp_config, model)


def _one_rank_reference(profile, **model_kwargs):
    """The TP=1 x PP=1 model: no communication inside it, so it computes what one process would."""
    groups = initialize_parallel(
        profile, tensor_parallel_size=1, pipeline_parallel_size=1, seed=SEED
    )
    return tiny_gpt(profile, groups, seed=SEED, **model_kwargs)


def _tensor_parallel_body(rank, world_size, checkpoint_dir):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    # Installing is idempotent; initialize_parallel installs again.
    assert install_cpu_backend() and install_cpu_backend()
    modes = torch.overrides._get_current_function_mode_stack()
    assert [type(mode) for mode in modes] == [CpuDeviceMode]
    profile = detect_profile()
    batch = tiny_batch(seed=1)

    reference = _one_rank_reference(profile)
    reference_loss = tiny_loss(reference, batch)
    reference_loss.backward()
    reference_grads = {name: param.grad for name, param in reference.named_parameters()}
    parallel_state.destroy_model_parallel()

    # (a) TP=2: same weights (CPU init draws full weights), same loss, same reduced grads; the
    # q/k-norm weights are replicated but see only local heads: finalize_model_grads sums them.
    groups = initialize_parallel(
        profile, tensor_parallel_size=2, pipeline_parallel_size=1, seed=SEED
    )
    model = _ddp(tiny_gpt(profile, groups, seed=SEED))
    loss = tiny_loss(model, batch)
    loss.backward()
    finalize_model_grads([model], pg_collection=groups)
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-5)
    _assert_grads_match(model.module, reference_grads, groups)

    # Dropout inside the tracker's fork differs per TP rank, outside it is the same; reseeding
    # reproduces both.
    def masks():
        torch.manual_seed(SEED)
        model_parallel_cuda_manual_seed(SEED)
        with get_cuda_rng_tracker().fork():
            inside = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        return inside, torch.nn.functional.dropout(torch.ones(64), p=0.5)

    inside, outside = masks()
    gathered = [torch.empty_like(inside) for _ in range(2)]
    dist.all_gather(gathered, inside, group=groups.tp)
    assert not torch.equal(gathered[0], gathered[1])
    dist.all_gather(gathered, outside, group=groups.tp)
    assert torch.equal(gathered[0], gathered[1])
    assert all(torch.equal(a, b) for a, b in zip(masks(), (inside, outside)))

    # DistributedOptimizer (torch Adam) checkpoint: save at TP=2 x DP=1 after two steps, load at
    # TP=1 x DP=2; the third step must give the same model as continuing without the round trip.
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    config = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True)

    def build():
        ddp = _ddp(tiny_gpt(profile, groups, seed=SEED), use_distributed_optimizer=True)
        return ddp, get_megatron_optimizer(config, [ddp])

    def step(ddp, optimizer, batch_seed):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tiny_loss(ddp, tiny_batch(batch_seed)).backward()
        finalize_model_grads([ddp], pg_collection=groups)
        assert optimizer.step()[0]

    def sharded_state_dict(ddp, optimizer, is_loading):
        model_state = ddp.module.sharded_state_dict()
        optimizer_state = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=metadata
        )
        return {"model": model_state, "optimizer": optimizer_state}

    ddp, optimizer = build()
    step(ddp, optimizer, 2)
    step(ddp, optimizer, 3)
    dist_checkpointing.save(sharded_state_dict(ddp, optimizer, False), checkpoint_dir)
    step(ddp, optimizer, 4)
    with torch.no_grad():
        expected_loss = tiny_loss(ddp, tiny_batch(5))
    parallel_state.destroy_model_parallel()

    groups = initialize_parallel(
        profile, tensor_parallel_size=1, pipeline_parallel_size=1, seed=SEED
    )
    ddp, optimizer = build()
    loaded = dist_checkpointing.load(sharded_state_dict(ddp, optimizer, True), checkpoint_dir)
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    step(ddp, optimizer, 4)
    with torch.no_grad():
        torch.testing.assert_close(tiny_loss(ddp, tiny_batch(5)), expected_loss, **TOLERANCE)
    parallel_state.destroy_model_parallel()


def test_tensor_parallel_matches_one_rank(tmp_path):
    run_distributed(_tensor_parallel_body, 2, str(tmp_path))


def _pipeline_body(rank, world_size, checkpoint_dir):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    profile = detect_profile()
    microbatches = [tiny_batch(seed=s) for s in (1, 2)]

    reference = _one_rank_reference(profile, num_layers=4, tied=True)
    losses = [tiny_loss(reference, batch) for batch in microbatches]
    reference_loss = torch.stack(losses).mean()
    reference_loss.backward()
    reference_grads = {name: param.grad for name, param in reference.named_parameters()}
    dist_checkpointing.save(reference.sharded_state_dict(), checkpoint_dir)
    parallel_state.destroy_model_parallel()

    # (b) TP=2 x PP=2, weights from the TP=1 checkpoint (each stage only builds its own layers).
    groups = initialize_parallel(
        profile, tensor_parallel_size=2, pipeline_parallel_size=2, seed=SEED
    )
    stage = tiny_gpt(profile, groups, num_layers=4, tied=True)
    stage.load_state_dict(dist_checkpointing.load(stage.sharded_state_dict(), checkpoint_dir))
    model = _ddp(stage)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss):
            loss = per_token_loss.mean()
            # The schedule divides the returned loss in place: report a copy.
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    reported = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0]["input_ids"].shape[1],
        micro_batch_size=microbatches[0]["input_ids"].shape[0],
    )
    finalize_model_grads([model], pg_collection=groups)
    if groups.pp.rank() == groups.pp.size() - 1:
        pipeline_loss = torch.stack([r["loss"] for r in reported]).mean()
        torch.testing.assert_close(pipeline_loss, reference_loss, rtol=0, atol=1e-5)
    else:
        assert reported == []
    _assert_grads_match(stage, reference_grads, groups, layer_offset=2 * groups.pp.rank())
    parallel_state.destroy_model_parallel()


def test_pipeline_and_tensor_parallel_match_one_rank(tmp_path):
    run_distributed(_pipeline_body, 4, str(tmp_path))
