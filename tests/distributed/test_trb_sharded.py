"""The method functions on a vocabulary sharded over real gloo groups equal the unsharded result:
the trust-region solve, sampling, the reverse-KL estimators, the TrOPD objective (each outlier
term; values and gradients) and the teacher top-64 forward KL (against the dense formula).

One launch per world size runs every check; shards are contiguous and, at 4 ranks, uneven.
"""

import pytest
import torch
import torch.distributed as dist

from tests import reference as ref
from tests.cases import logit_cases
from tests.distributed.launcher import run_distributed
from trb_megatron.methods import (TokenInputs, TrOPD, VocabLayout, blended_log_probs,
                                  describe_shard, per_token_reverse_kl, sample_tokens, solve_beta,
                                  teacher_topk_forward_kl)

V = 97
LAYOUT = VocabLayout(size=93, stop_ids=(90, 2))  # stop tokens on the last and first shard


def _bounds(rank, world):
    sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _local(x, rank, world):
    a, b = _bounds(rank, world)
    return x[:, a:b].contiguous()


def _check_solver(s, t, rank, world):
    group = dist.group.WORLD
    for vocab in (None, LAYOUT):
        for eps in (0.0, 0.003, 0.05):
            dense = solve_beta(s, t, eps, vocab=vocab)
            shard = solve_beta(_local(s, rank, world), _local(t, rank, world), eps,
                               group=group, vocab=vocab)
            for field in ("beta", "kl_to_student", "reverse_kl"):
                torch.testing.assert_close(getattr(shard, field), getattr(dense, field),
                                           atol=1e-12, rtol=1e-10)
            assert torch.equal(shard.teacher_feasible, dense.teacher_feasible)
            assert shard.iterations == dense.iterations


def _check_sampling(s, t, rank, world):
    group = dist.group.WORLD
    beta = torch.linspace(0, 1, s.shape[0])
    dense = blended_log_probs(s, t, beta, vocab=LAYOUT, dtype=torch.float64)
    shard = blended_log_probs(_local(s, rank, world), _local(t, rank, world), beta, group=group,
                              vocab=LAYOUT, dtype=torch.float64)
    torch.testing.assert_close(shard, _local(dense, rank, world), atol=1e-12, rtol=0)
    for temperature in (1.0, 0.7, 0.0):
        want = sample_tokens(s, t, beta, seed=3, vocab=LAYOUT, temperature=temperature)
        got = sample_tokens(_local(s, rank, world), _local(t, rank, world), beta, seed=3,
                            group=group, vocab=LAYOUT, temperature=temperature)
        assert torch.equal(got.token_ids, want.token_ids)
        torch.testing.assert_close(got.log_prob, want.log_prob, atol=1e-12, rtol=0)
    tokens = torch.stack([got.token_ids])
    every = [torch.empty_like(tokens) for _ in range(world)]
    dist.all_gather(every, tokens)
    assert all(torch.equal(x, tokens) for x in every)


def _check_losses(s, t, rank, world):
    group = dist.group.WORLD
    tokens = torch.arange(s.shape[0]) * 13 % 90
    for estimator, kw in (("full", {}), ("topk", {"topk": 6}), ("sampled", {"tokens": tokens})):
        s_dense = s.double().requires_grad_(True)
        want = per_token_reverse_kl(s_dense, t.double(), estimator=estimator, vocab=LAYOUT, **kw)
        (want * torch.arange(1.0, s.shape[0] + 1, dtype=torch.float64)).sum().backward()
        s_local = _local(s, rank, world).double().requires_grad_(True)
        got = per_token_reverse_kl(s_local, _local(t, rank, world).double(), group=group,
                                   estimator=estimator, vocab=LAYOUT, **kw)
        (got * torch.arange(1.0, s.shape[0] + 1, dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s_local.grad, _local(s_dense.grad, rank, world), atol=1e-12,
                                   rtol=1e-10)


def _sharded_grad(fn, s, rank, world):
    """(value, this rank's gradient shard) of sum(fn(x) * weights) on the local shard x."""
    x = _local(s, rank, world).double().requires_grad_(True)
    value = fn(x)
    (value * torch.arange(1.0, s.shape[0] + 1, dtype=torch.float64)).sum().backward()
    return value.detach(), x.grad


def _check_tropd(s, t, rank, world):
    """TrOPD at TP=world equals TP=1 (values, gradients), every outlier term; the teacher's
    top-64 forward KL equals the dense formula."""
    group = dist.group.WORLD
    n = s.shape[0]
    inputs = TokenInputs(tokens=torch.arange(n) * 13 % 90, from_teacher=torch.arange(n) % 4 == 3,
                         uniforms=torch.where(torch.arange(n) % 2 == 0, 1e-9, 1 - 1e-9).double())
    t_local = _local(t, rank, world).double()
    for outlier in ("fkl", "clip", "mask"):
        objective = TrOPD(outlier=outlier, outlier_topk=64, outlier_tau=1.0, prefix_weight=0.2)
        dense, dense_grad = _sharded_grad(
            lambda x: objective.terms(x, t.double(), inputs, group=None, vocab=LAYOUT).loss,
            s, 0, 1)
        got, got_grad = _sharded_grad(
            lambda x: objective.terms(x, t_local, inputs, group=group, vocab=LAYOUT).loss,
            s, rank, world)
        torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got_grad, _local(dense_grad, rank, world), atol=1e-12,
                                   rtol=1e-10)
    want, want_grad = _sharded_grad(lambda x: ref.topk_forward_kl(x, t, 64), s, 0, 1)
    got, got_grad = _sharded_grad(
        lambda x: teacher_topk_forward_kl(x, t_local, describe_shard(x, t_local, group=group),
                                          64), s, rank, world)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, _local(want_grad, rank, world), atol=1e-12, rtol=1e-10)


def _check_bad_input(s, t, rank, world):
    group = dist.group.WORLD
    s_local, t_local = _local(s, rank, world), _local(t, rank, world)
    rows = s.shape[0] - (1 if rank == 0 else 0)
    with pytest.raises(ValueError, match="different numbers of rows"):
        solve_beta(s_local[:rows], t_local[:rows], 0.01, group=group)
    poisoned = s_local.clone()
    if rank == world - 1:
        poisoned[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        solve_beta(poisoned, t_local, 0.01, group=group)


def _body(rank, world):
    for s, t in logit_cases(n=8, v=V).values():
        _check_solver(s, t, rank, world)
        _check_sampling(s, t, rank, world)
        _check_losses(s, t, rank, world)
        _check_tropd(s, t, rank, world)
    _check_bad_input(*logit_cases(n=8, v=V)["random"], rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_unsharded(world):
    run_distributed(_body, world)
