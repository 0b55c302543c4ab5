"""One distillation step on a fixed batch gives the same loss and the same updated weights on
one rank (every rank computing the whole batch), TP=2 x PP=2, TP=2 x DP=2, PP=2 x DP=2 and DP=4,
for each reverse-KL estimator and for the TrOPD objective (its trust mask drawn per token from
(seed, row id, position): the same under every layout). Weights are compared after resharding
every result to TP=1."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launcher import run_distributed
from tests.hf_models import VOCAB, make_hf_model
from tests.rollout_fixtures import fixed_batch, rows_of
from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
from trb_megatron.config import OptimConfig
from trb_megatron.training.distill_step import DistillStep
from trb_megatron.training.optim import wrap_and_optimize
from trb_megatron.methods import ReverseKL, TrOPD, VocabLayout

pytestmark = pytest.mark.megatron

LAYOUTS = {"one-rank": (1, 1), "tp2-pp2": (2, 2), "tp2-dp2": (2, 1), "pp2-dp2": (1, 2),
           "dp4": (1, 1)}
# A large Adam eps keeps the first update continuous in the gradient: with the default 1e-8,
# step one moves every weight by +-lr whatever its gradient, so gradients of ~1e-12 whose sign
# depends on summation order would flip whole updates between layouts.
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.01, grad_clip=0.5, adam_eps=1e-3)
OBJECTIVES = {"full": ReverseKL(estimator="full"), "topk": ReverseKL(estimator="topk", topk=5),
              "sampled": ReverseKL(estimator="sampled"),
              "tropd": TrOPD(outlier_topk=8, prefix_weight=0.5)}


def _one_step(root, name, tp, pp, estimator):
    from megatron.core import dist_checkpointing

    objective = OBJECTIVES[estimator]
    batch = fixed_batch(VOCAB, rows=8, length=12, teacher_prefix=objective.name == "tropd")
    with parallel_layout(tp, pp) as groups:
        dp, dp_rank = groups.dp.size(), groups.dp.rank()
        if name != "one-rank":
            share = batch.tokens.shape[0] // dp
            batch = rows_of(batch, slice(dp_rank * share, (dp_rank + 1) * share))
        _, student = load_megatron(root / "student", groups, trainable=True)
        _, teacher = load_megatron(root / "teacher", groups)
        ddp, optimizer = wrap_and_optimize(student, OPTIM, groups)
        step = DistillStep(ddp, teacher, optimizer, groups,
                           VocabLayout(size=VOCAB, stop_ids=(1,)), objective=objective,
                           micro_batch_size=1)
        result = step(batch, noise_seed=5)
        out = root / f"{estimator}-{name}"
        if dist.get_rank() == 0:
            out.mkdir()
        dist.barrier()
        dist_checkpointing.save(ddp.module.sharded_state_dict(), str(out))
    return result


def _body(rank, world, root):
    root = Path(root)
    hf_to_megatron(root / "hf-student", root / "student", progress=False)
    hf_to_megatron(root / "hf-teacher", root / "teacher", progress=False)
    exact = []
    for estimator in OBJECTIVES:
        results = {name: _one_step(root, name, tp, pp, estimator)
                   for name, (tp, pp) in LAYOUTS.items()}
        reference = results["one-rank"]
        exact.append(reference.reverse_kl)  # same weights before the step: same exact KL
        assert abs(exact[-1] - exact[0]) < 1e-6 and (estimator != "full"
                                                     or reference.loss == reference.reverse_kl)
        assert reference.loss != 0 and reference.grad_norm > 0  # K1 may be negative
        if estimator == "tropd":  # the mask kept some tokens and rejected others
            metrics = reference.objective_metrics
            assert 0 < metrics["tropd_trust_frac"] < 1, metrics
            assert metrics["loss_prefix"] != 0
            for result in results.values():
                for key, value in metrics.items():
                    assert abs(result.objective_metrics[key] - value) <= 1e-5 * abs(value) + 1e-9
        with parallel_layout(1, 1) as groups:
            from megatron.core import dist_checkpointing

            _, model = load_megatron(root / "student", groups, trainable=True)
            states = {name: dist_checkpointing.load(model.sharded_state_dict(),
                                                    str(root / f"{estimator}-{name}"))
                      for name in LAYOUTS}
        for name, result in results.items():
            assert abs(result.loss - reference.loss) < 1e-4 * abs(reference.loss), (
                estimator, name, result, reference)
            assert abs(result.grad_norm - reference.grad_norm) < 1e-4 * reference.grad_norm
            for key, value in states[name].items():
                torch.testing.assert_close(value, states["one-rank"][key], rtol=1e-4, atol=1e-6,
                                           msg=f"{estimator} {name} {key}")
        moved = states["one-rank"]["decoder.final_layernorm.weight"]
        with parallel_layout(1, 1) as groups:
            _, before = load_megatron(root / "student", groups)
        assert not torch.equal(moved, before.decoder.final_layernorm.weight)


def test_distillation_step_is_layout_independent(tmp_path):
    make_hf_model(tmp_path / "hf-student", "qwen3", seed=1)
    make_hf_model(tmp_path / "hf-teacher", "qwen3", seed=2)
    run_distributed(_body, 4, str(tmp_path))
