"""Reverse-KL losses: values and gradients against dense float64 autograd references."""

import pytest
import torch

from tests import reference as ref
from tests.cases import logit_cases
from trb_megatron.methods import VocabLayout, per_token_reverse_kl, reverse_kl_loss


def _grad(fn, s):
    s = s.detach().double().requires_grad_(True)
    value = fn(s)
    value.sum().backward()
    return value.detach(), s.grad


def _dense_reverse_kl(s, t):
    return ref.kl(torch.log_softmax(s, 1), ref.log_softmax64(t))


@pytest.mark.parametrize("case", list(logit_cases()))
def test_full_matches_dense_value_and_gradient(case):
    s, t = logit_cases()[case]
    got, got_grad = _grad(lambda x: per_token_reverse_kl(x, t.double(), chunk_rows=2), s)
    want, want_grad = _grad(lambda x: _dense_reverse_kl(x, t), s)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-9)


def test_full_in_float32_and_bfloat16():
    s, t = logit_cases()["random"]
    want = ref.reverse_kl(s, t)
    got = per_token_reverse_kl(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    sb = s.bfloat16().requires_grad_(True)
    per_token_reverse_kl(sb, t.bfloat16()).sum().backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()


def test_topk_with_whole_vocabulary_equals_full():
    s, t = logit_cases()["peaked"]
    v = s.shape[1]
    got, got_grad = _grad(lambda x: per_token_reverse_kl(x, t.double(), estimator="topk",
                                                         topk=v), s)
    want, want_grad = _grad(lambda x: _dense_reverse_kl(x, t), s)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-9)


def test_topk_is_the_renormalised_support_estimator():
    s, t = logit_cases()["random"]
    k = 5
    s64, t64 = s.double(), t.double()
    ids = s64.topk(k, 1).indices
    log_p, log_q = ref.log_softmax64(s64), ref.log_softmax64(t64)
    delta = log_p.gather(1, ids) - log_q.gather(1, ids)
    w = torch.softmax(s64.gather(1, ids), 1)
    value = (w * delta).sum(1)
    want_grad = torch.zeros_like(s64).scatter_(1, ids, w * (delta - value[:, None]))
    got, got_grad = _grad(lambda x: per_token_reverse_kl(x, t64, estimator="topk", topk=k), s)
    torch.testing.assert_close(got, value, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=0)


def test_sampled_is_k1_with_detached_advantage():
    s, t = logit_cases()["random"]
    tokens = torch.tensor([0, 5, 9, 96, 40, 3])
    log_p, log_q = ref.log_softmax64(s), ref.log_softmax64(t)
    adv = (log_p - log_q).gather(1, tokens[:, None])[:, 0]
    want_grad = adv[:, None] * (torch.nn.functional.one_hot(tokens, s.shape[1]) - log_p.exp())
    got, got_grad = _grad(lambda x: per_token_reverse_kl(x, t.double(), estimator="sampled",
                                                         tokens=tokens), s)
    torch.testing.assert_close(got, adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=0)


def test_sampled_gradient_is_unbiased_for_the_full_gradient():
    s, t = logit_cases(n=1, v=6)["random"]
    s64 = s.double()
    log_p = ref.log_softmax64(s64)[0]
    grads = []
    for y in range(6):
        _, g = _grad(lambda x: per_token_reverse_kl(x, t.double(), estimator="sampled",
                                                    tokens=torch.tensor([y])), s)
        grads.append(log_p[y].exp() * g)
    _, full = _grad(lambda x: _dense_reverse_kl(x, t), s)
    torch.testing.assert_close(torch.stack(grads).sum(0), full, atol=1e-12, rtol=0)


def test_masked_token_mean_padding_and_stop_merge():
    s, t = logit_cases()["random"]
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    loss = reverse_kl_loss(s.double(), t.double(), mask=mask)
    torch.testing.assert_close(loss, ref.reverse_kl(s, t)[mask].mean(), atol=1e-12, rtol=0)
    pad = torch.full((6, 3), float("nan"))
    padded = reverse_kl_loss(torch.cat([s, pad], 1).double(), torch.cat([t, pad], 1).double(),
                             vocab=VocabLayout(size=s.shape[1], stop_ids=(1, 2)))
    s_m, _ = ref.merge_stops(s, (1, 2))
    t_m, _ = ref.merge_stops(t, (1, 2))
    torch.testing.assert_close(padded, ref.reverse_kl(s_m, t_m).mean(), atol=1e-12, rtol=0)


def test_teacher_never_receives_gradient():
    s, t = logit_cases()["random"]
    s, t = s.requires_grad_(True), t.clone().requires_grad_(True)
    for est, kw in (("full", {}), ("topk", {}), ("sampled", {"tokens": torch.zeros(6).long()})):
        reverse_kl_loss(s, t, estimator=est, **kw).backward()
    assert t.grad is None and s.grad is not None


def test_bad_input():
    s, t = logit_cases()["random"]
    with pytest.raises(ValueError, match="estimator must be one of"):
        reverse_kl_loss(s, t, estimator="forward")
    with pytest.raises(ValueError, match="needs tokens"):
        reverse_kl_loss(s, t, estimator="sampled")
    with pytest.raises(ValueError, match="finite"):
        reverse_kl_loss(torch.full_like(s, float("nan")), t)
    with pytest.raises(ValueError, match="mask must have shape"):
        reverse_kl_loss(s, t, mask=torch.ones(3))
    with pytest.raises(ValueError, match="differ in shape"):
        reverse_kl_loss(s, t[:, :5])


def test_stop_merge_gradient_reaches_both_stop_columns():
    s, t = logit_cases()["random"]
    stops = (1, 2)

    def dense(x):
        x_m, _ = ref.merge_stops(x, stops)
        t_m, _ = ref.merge_stops(t, stops)
        return _dense_reverse_kl(x_m, t_m)

    for estimator, kw in (("full", {}), ("topk", {"topk": 96})):
        got, got_grad = _grad(lambda x: per_token_reverse_kl(
            x, t.double(), estimator=estimator, vocab=VocabLayout(stop_ids=stops), **kw), s)
        want, want_grad = _grad(dense, s)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-9)
        assert got_grad[:, 2].abs().max() > 0


def test_fused_full_loss_matches_eager():
    s, t = logit_cases(n=9, v=200)["peaked"]
    pad = torch.zeros(9, 3)
    s, t = torch.cat([s, pad], 1), torch.cat([t, pad], 1)
    for dtype in (torch.float32, torch.float64):
        grads = []
        for fused in (False, True):
            x = s.to(dtype).detach().clone().requires_grad_(True)
            value = per_token_reverse_kl(x, t.to(dtype), vocab=200, fused=fused, chunk_rows=4)
            value.sum().backward()
            grads.append((value.detach(), x.grad))
        assert grads[0][1] is not None and grads[0][1].abs().max() > 0
        torch.testing.assert_close(grads[1][0], grads[0][0])
        torch.testing.assert_close(grads[1][1], grads[0][1])
