"""The TrOPD objective against dense float64 references (tests/reference.py), values and
gradients, for each outlier term, with stop tokens merged and padding; the top-k forward KL on
its own; the trust mask's empirical rate against its probability; bad settings named."""

import math

import pytest
import torch

from tests import reference as ref
from tests.cases import logit_cases
from trb_megatron.methods import (TokenInputs, TrOPD, VocabLayout, counter_uniform, describe_shard,
                                  teacher_topk_forward_kl)
from trb_megatron.methods.vocab import merge_stops

LAYOUT = VocabLayout(size=93, stop_ids=(90, 2))  # padding 93..96, a merged-away stop id
N = 6


def _inputs(s, t, *, seed=0):
    """Tokens (real, not merged away), every other row a teacher-prefix token, and uniforms
    at the extremes so the trust mask is fixed whatever rounding: 1e-9 keeps a student token
    (M = 1), 1 - 1e-9 rejects it unless pi_T(x) >= pi_S(x)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 90, (s.shape[0],), generator=g)
    from_teacher = torch.arange(s.shape[0]) % 3 == 1
    uniforms = torch.where(torch.arange(s.shape[0]) % 2 == 0, 1e-9, 1 - 1e-9).double()
    return TokenInputs(tokens=tokens, from_teacher=from_teacher, uniforms=uniforms)


def _grad(fn, s):
    s = s.detach().double().requires_grad_(True)
    value = fn(s)
    (value * torch.arange(1.0, s.shape[0] + 1, dtype=torch.float64)).sum().backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("outlier", ["fkl", "clip", "mask"])
@pytest.mark.parametrize("case", ["random", "peaked", "near"])
def test_objective_equals_the_dense_formula(outlier, case):
    s, t = logit_cases(n=N)[case]
    inputs = _inputs(s, t)
    objective = TrOPD(outlier=outlier, outlier_topk=7, outlier_tau=1.5, prefix_weight=0.3)
    got, got_grad = _grad(lambda x: objective.terms(x, t.double(), inputs, group=None,
                                                    vocab=LAYOUT).loss, s)

    def dense(x):
        loss, _ = ref.tropd(x[:, :93], t[:, :93], inputs.tokens, inputs.from_teacher,
                            inputs.uniforms, outlier=outlier, k=7, tau=1.5, weight=0.3,
                            stop_ids=LAYOUT.stop_ids)
        return loss

    want, want_grad = _grad(dense, s)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_grad[:, :93], want_grad[:, :93], atol=1e-10, rtol=1e-8)
    assert (got_grad[:, 93:] == 0).all()  # padding gets no gradient


def test_every_part_appears_and_the_sums_split_the_loss():
    s, t = logit_cases(n=N)["random"]
    inputs = _inputs(s, t)
    terms = TrOPD(outlier_topk=7, prefix_weight=0.3).terms(s.double(), t.double(), inputs,
                                                           group=None, vocab=LAYOUT)
    _, trust = ref.tropd(s[:, :93], t[:, :93], inputs.tokens, inputs.from_teacher,
                         inputs.uniforms, outlier="fkl", k=7, tau=1.5, weight=0.3,
                         stop_ids=LAYOUT.stop_ids)
    sums = terms.sums
    assert torch.equal(sums["trust_tokens"].bool(), trust)
    assert trust.any() and sums["outlier_tokens"].bool().any() and inputs.from_teacher.any()
    assert torch.equal(sums["policy_tokens"].bool(), ~inputs.from_teacher)
    total = sums["loss_trust"] + sums["loss_outlier"] + sums["loss_prefix"]
    torch.testing.assert_close(total, terms.loss.detach())
    metrics = TrOPD().metrics({k: float(v.sum()) for k, v in sums.items()}, float(N))
    assert metrics["tropd_trust_frac"] + metrics["tropd_outlier_frac"] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 5, 64, 97])
def test_topk_forward_kl_equals_the_dense_formula(k):
    s, t = logit_cases(n=N)["random"]
    shard = describe_shard(s, t)
    got, got_grad = _grad(lambda x: teacher_topk_forward_kl(x, t.double(), shard, k), s)
    want, want_grad = _grad(lambda x: ref.topk_forward_kl(x, t, k), s)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-9)
    if k == 97:  # the whole vocabulary: the exact forward KL(pi_T || pi_S)
        torch.testing.assert_close(got, ref.kl(ref.log_softmax64(t), ref.log_softmax64(s)))


def test_topk_forward_kl_in_float32_and_past_the_vocabulary():
    s, t = logit_cases(n=N)["peaked"]
    shard = describe_shard(s, t)
    got = teacher_topk_forward_kl(s, t, shard, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.topk_forward_kl(s, t, 16), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="k=98 exceeds the 97 tokens of the vocabulary"):
        teacher_topk_forward_kl(s, t, shard, 98)
    merged = describe_shard(s, t, vocab=LAYOUT)  # 93 real columns, one merged away
    value = teacher_topk_forward_kl(merge_stops(s, merged), merge_stops(t, merged), merged, 93)
    assert torch.isfinite(value).all()


def test_the_trust_mask_rate_is_its_probability():
    """Over 20,000 draws of the counter-based uniforms (the trainer's: keyed by seed, row id,
    position), the fraction of kept student tokens equals mean min(pi_T(x)/pi_S(x), 1) within
    4.5 binomial standard errors."""
    s, t = logit_cases(n=N)["random"]
    rows, positions = torch.meshgrid(torch.arange(200), torch.arange(100), indexing="ij")
    count = rows.numel()
    token_row = torch.arange(count) % N
    s_rows, t_rows = s[token_row], t[token_row]
    tokens = torch.arange(count) * 7 % 90
    uniforms = counter_uniform(12345, rows.reshape(-1), positions.reshape(-1))
    inputs = TokenInputs(tokens=tokens, from_teacher=torch.zeros(count, dtype=torch.bool),
                         uniforms=uniforms)
    terms = TrOPD(outlier_topk=7).terms(s_rows.double(), t_rows.double(), inputs, group=None,
                                        vocab=None)
    log_s, log_t = ref.log_softmax64(s_rows), ref.log_softmax64(t_rows)
    ratio = (log_t - log_s)[torch.arange(count), tokens].exp().clamp(max=1.0)
    p = float(ratio.mean())
    rate = float(terms.sums["trust_tokens"].mean())
    bound = 4.5 * math.sqrt(p * (1 - p) / count)
    assert 0.05 < p < 0.95 and abs(rate - p) <= bound, (rate, p, bound)
    # per token too: the mask keeps exactly the draws below its probability
    assert torch.equal(terms.sums["trust_tokens"].bool(), uniforms < ratio)


def test_the_objective_refuses_bad_settings_and_missing_draws():
    s, t = logit_cases(n=N)["random"]
    for kwargs, message in ((dict(outlier="drop"), "outlier must be one of"),
                            (dict(outlier_topk=0), "outlier_topk must be an int >= 1"),
                            (dict(outlier_tau=float("inf")), "outlier_tau must be finite"),
                            (dict(prefix_weight=-1.0), "prefix_weight must be finite and >= 0")):
        with pytest.raises(ValueError, match=message):
            TrOPD(**kwargs)
    inputs = TokenInputs(tokens=torch.zeros(N, dtype=torch.int64),
                         from_teacher=torch.zeros(N, dtype=torch.bool))
    with pytest.raises(ValueError, match="draws its trust mask from inputs.uniforms"):
        TrOPD().terms(s, t, inputs, group=None, vocab=None)
