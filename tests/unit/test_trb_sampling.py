"""Blended log-probs and seeded Gumbel-max sampling against dense references."""

import pytest
import torch

from tests import reference as ref
from tests.cases import logit_cases
from trb_megatron.methods import VocabLayout, blended_log_probs, canonicalize_eos, sample_tokens

# 99.9% quantile of chi-square with 7 degrees of freedom: a fixed-seed test that fails only if
# the sampler's distribution is wrong.
CHI2_7DOF_999 = 24.32


def _chi_square(tokens, log_p):
    counts = torch.bincount(tokens, minlength=log_p.numel()).double()
    expected = log_p.exp() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _one_row(rows, v=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(1, v, generator=g), torch.randn(1, v, generator=g) * 1.5
    return s.expand(rows, v), t.expand(rows, v)


def test_blended_log_probs_match_dense_reference():
    for s, t in logit_cases().values():
        beta = torch.linspace(0, 1, s.shape[0])
        got = blended_log_probs(s, t, beta, dtype=torch.float64)
        torch.testing.assert_close(got, ref.blend_log_probs(s, t, beta), atol=1e-10, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_empirical_distribution_matches_mu(beta):
    s, t = _one_row(40000)
    out = sample_tokens(s, t, beta, seed=11)
    log_mu = ref.blend_log_probs(s[:1], t[:1], beta)[0]
    assert _chi_square(out.token_ids, log_mu) < CHI2_7DOF_999
    torch.testing.assert_close(out.log_prob, log_mu[out.token_ids], atol=1e-12, rtol=0)


def test_temperature_scales_the_sampled_distribution():
    s, t = _one_row(40000, seed=3)
    out = sample_tokens(s, t, 0.5, seed=5, temperature=0.7)
    log_q = torch.log_softmax(ref.blend_log_probs(s[:1], t[:1], 0.5)[0] / 0.7, dim=0)
    assert _chi_square(out.token_ids, log_q) < CHI2_7DOF_999
    torch.testing.assert_close(out.log_prob, log_q[out.token_ids], atol=1e-10, rtol=0)


def test_greedy_takes_the_mode():
    s, t = logit_cases()["random"]
    out = sample_tokens(s, t, 0.3, seed=0, temperature=0.0)
    log_mu = ref.blend_log_probs(s, t, 0.3)
    assert torch.equal(out.token_ids, log_mu.argmax(1))


def test_seeded_and_student_only_path_is_identical():
    s, t = logit_cases(n=64)["random"]
    a = sample_tokens(s, t, 0.0, seed=7)
    b = sample_tokens(s, None, seed=7)
    assert torch.equal(a.token_ids, b.token_ids)
    assert not torch.equal(a.token_ids, sample_tokens(s, None, seed=8).token_ids)
    rows = torch.arange(64) + 1000
    shifted = sample_tokens(s, None, seed=7, row_ids=rows)
    assert torch.equal(shifted.token_ids[1:], sample_tokens(
        s[1:], None, seed=7, row_ids=rows[1:]).token_ids)


def test_excluded_columns_are_never_sampled():
    s, t = _one_row(5000)
    layout = VocabLayout(size=6, stop_ids=(2, 4))
    out = sample_tokens(s, t, 0.5, seed=1, vocab=layout)
    assert not torch.isin(out.token_ids, torch.tensor([4, 6, 7])).any()
    merged = canonicalize_eos(s, (2, 4))
    assert torch.isclose(merged[0, 2], torch.logaddexp(s[0, 2], s[0, 4]))
    assert merged[0, 4] == float("-inf")


def test_bad_input():
    s, t = logit_cases()["random"]
    with pytest.raises(ValueError, match="beta must lie in"):
        sample_tokens(s, t, 1.5, seed=0)
    with pytest.raises(ValueError, match="teacher_logits is None"):
        sample_tokens(s, None, 0.5, seed=0)
    with pytest.raises(ValueError, match="row_ids must have shape"):
        sample_tokens(s, t, 0.5, seed=0, row_ids=torch.arange(3))
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(s, t, 0.5, seed=0, temperature=-1.0)
