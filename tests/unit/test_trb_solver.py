"""solve_beta against a float64 brute-force bisection over the full vocabulary."""

import pytest
import torch

from tests import reference as ref
from tests.cases import logit_cases
from trb_megatron.methods import VocabLayout, solve_beta

EPS = [0.001, 0.01, 0.05, 0.3]
TOL = 1e-6


@pytest.mark.parametrize("case", list(logit_cases()))
@pytest.mark.parametrize("eps", EPS)
def test_matches_bisection_reference(case, eps):
    s, t = logit_cases()[case]
    sol = solve_beta(s, t, eps, tol=TOL)
    beta_ref = ref.bisect_beta(s, t, eps)
    kl_true = ref.kl_to_student(s, t, sol.beta)
    assert torch.all(kl_true <= eps + TOL)
    torch.testing.assert_close(sol.kl_to_student, kl_true, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.reverse_kl, ref.reverse_kl(s, t), atol=1e-9, rtol=1e-9)
    feasible = ref.kl(ref.log_softmax64(t), ref.log_softmax64(s)) <= eps
    assert torch.equal(sol.teacher_feasible, feasible)
    assert torch.all(sol.beta[feasible] == 1)
    # Active rows sit on the constraint, hence at the largest feasible beta.
    active = ~feasible
    assert torch.all(kl_true[active] >= eps - min(TOL, 1e-3 * eps))
    assert torch.all(sol.beta[active] >= beta_ref[active] - 1e-4)
    assert torch.all(sol.beta[active] <= beta_ref[active] + 1e-4)


def test_eps_zero_is_exactly_pure_student():
    s, t = logit_cases()["random"]
    sol = solve_beta(s, t, 0.0)
    assert torch.all(sol.beta == 0) and torch.all(sol.kl_to_student == 0)
    assert sol.iterations == 0 and not sol.teacher_feasible.any()


def test_identical_models_take_the_teacher():
    s, _ = logit_cases()["random"]
    sol = solve_beta(s, s.clone(), 1e-4)
    assert torch.all(sol.beta == 1) and torch.all(sol.teacher_feasible)
    assert sol.kl_to_student.abs().max() < 1e-12


def test_per_row_eps_and_low_precision_inputs():
    s, t = logit_cases()["random"]
    eps = torch.tensor([0.0, 0.001, 0.01, 0.05, 0.3, 100.0])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s_low, t_low = s.to(dtype), t.to(dtype)
        sol = solve_beta(s_low, t_low, eps)
        kl_true = ref.kl_to_student(s_low, t_low, sol.beta)
        assert torch.all(kl_true <= eps.double() + TOL)
        assert sol.beta[0] == 0 and sol.beta[-1] == 1


def test_qwen_sized_vocabulary():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 151936, generator=g) * 2
    t = s + torch.randn(3, 151936, generator=g)
    s[:, 17] += 12
    t[:, 99] += 12
    for eps in (0.001, 0.05):
        sol = solve_beta(s, t, eps)
        kl_true = ref.kl_to_student(s, t, sol.beta)
        assert torch.all(kl_true <= eps + TOL) and torch.all(kl_true >= eps - 1e-6)
        assert sol.iterations <= 6


def test_iterations_are_few():
    s, t = logit_cases(n=64, v=500)["random"]
    sol = solve_beta(s, t, 0.01)
    assert sol.token_iterations.float().mean() <= 5


def test_max_iters_returns_feasible_end_of_bracket():
    s, t = logit_cases()["peaked"]
    sol = solve_beta(s, t, 0.05, max_iters=1)
    assert torch.all(ref.kl_to_student(s, t, sol.beta) <= 0.05 + TOL)


def test_padded_columns_are_excluded():
    s, t = logit_cases()["random"]
    pad = torch.full((s.shape[0], 7), float("nan"))
    sol = solve_beta(torch.cat([s, pad], 1), torch.cat([t, pad], 1), 0.01, vocab=s.shape[1])
    plain = solve_beta(s, t, 0.01)
    torch.testing.assert_close(sol.beta, plain.beta, atol=1e-12, rtol=0)


def test_stop_tokens_are_merged_before_solving():
    s, t = logit_cases()["random"]
    stops = (4, 9)
    sol = solve_beta(s, t, 0.02, vocab=VocabLayout(stop_ids=stops))
    s_m, _ = ref.merge_stops(s, stops)
    t_m, _ = ref.merge_stops(t, stops)
    assert torch.all(ref.kl_to_student(s_m, t_m, sol.beta) <= 0.02 + TOL)
    torch.testing.assert_close(sol.reverse_kl, ref.reverse_kl(s_m, t_m), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("bad, message", [
    (dict(eps=-0.1), "eps must be finite and >= 0"),
    (dict(eps=float("nan")), "eps must be finite and >= 0"),
    (dict(eps=torch.tensor([0.1, 0.2])), "eps must be a float or a \\[N\\] tensor"),
    (dict(student=float("nan")), "student_logits: 1 NaN/inf"),
    (dict(teacher=float("inf")), "teacher_logits: 1 NaN/inf"),
    (dict(teacher=float("-inf")), "teacher_logits: 1 NaN/inf"),
    (dict(shape=True), "differ in shape"),
    (dict(vocab=500), "vocab size 500 must be in"),
])
def test_bad_input_names_the_problem(bad, message):
    s, t = logit_cases()["random"]
    s, t = s.clone(), t.clone()
    if "student" in bad:
        s[2, 5] = bad["student"]
    if "teacher" in bad:
        t[1, 3] = bad["teacher"]
    if bad.get("shape"):
        t = t[:, :-1]
    with pytest.raises(ValueError, match=message):
        solve_beta(s, t, bad.get("eps", 0.01), vocab=bad.get("vocab"))


def test_fused_kernel_matches_eager():
    """fused=True runs the same evaluation compiled by torch.compile (the production path)."""
    s, t = logit_cases(n=8, v=300)["peaked"]
    pad = torch.zeros(8, 4)
    s, t = torch.cat([s, pad], 1), torch.cat([t, pad], 1)
    eager = solve_beta(s, t, 0.02, vocab=300)
    fused = solve_beta(s, t, 0.02, vocab=300, fused=True)
    torch.testing.assert_close(fused.beta, eager.beta, atol=1e-9, rtol=0)
    assert fused.iterations == eager.iterations
    assert torch.all(ref.kl_to_student(s[:, :300], t[:, :300], fused.beta) <= 0.02 + TOL)
    # float32 statistics resolve KL to ~1e-6 on peaked logits: ask for a matching tolerance.
    fast = solve_beta(s, t, 0.02, vocab=300, fused=True, dtype=torch.float32, tol=1e-5)
    torch.testing.assert_close(fast.beta.double(), eager.beta, atol=1e-4, rtol=0)
    assert torch.all(ref.kl_to_student(s[:, :300], t[:, :300], fast.beta) <= 0.02 + 2e-5)
