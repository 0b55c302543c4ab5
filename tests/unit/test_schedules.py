"""Scalar schedules: the linear TRB anneal, constant values, the cosine TrOPD prefix anneal; and
the behaviour policies built on them (what each step's rollouts are drawn from)."""

import math

import pytest

from trb_megatron.methods import BehaviourStep, Constant, CosineAnneal, LinearAnneal
from trb_megatron.methods.policies import Student, TeacherPrefix, TRBBlend


def test_linear_anneal_reaches_zero_and_stays():
    sched = LinearAnneal(0.02, 50)
    assert sched(0) == 0.02
    assert sched(25) == pytest.approx(0.01)
    assert sched(49) == pytest.approx(0.02 / 50)
    assert sched(50) == 0.0 and sched(10_000) == 0.0


def test_cosine_anneal_starts_at_its_value_and_ends_at_zero():
    sched = CosineAnneal(48.0, 10)
    assert sched(0) == 48.0 and sched(5) == pytest.approx(24.0) and sched(10) == 0.0
    values = [sched(k) for k in range(12)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing
    assert sched(2) == pytest.approx(48.0 * (1 + math.cos(math.pi * 0.2)) / 2)


def test_constant():
    assert Constant(0.05)(1000) == 0.05


@pytest.mark.parametrize("make, message", [
    (lambda: LinearAnneal(-1.0, 5), "start value must be finite and >= 0"),
    (lambda: LinearAnneal(float("nan"), 5), "start value"),
    (lambda: LinearAnneal(0.1, 0), "anneal steps must be an int >= 1"),
    (lambda: CosineAnneal(5.0, 0), "anneal steps"),
    (lambda: Constant(float("inf")), "finite"),
])
def test_invalid(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    with pytest.raises(ValueError, match="step must be >= 0"):
        LinearAnneal(0.1, 5)(-1)


def test_policies_give_each_step_its_behaviour():
    assert Student().at(7) == BehaviourStep() and not Student().at(0).teacher_runs
    trb = TRBBlend(LinearAnneal(0.1, 4))
    assert [trb.at(k).eps for k in range(5)] == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    assert trb.at(3).teacher_runs and not trb.at(4).teacher_runs
    prefix = TeacherPrefix(CosineAnneal(48.0, 4))
    assert [prefix.at(k).prefix_max for k in range(5)] == [48, 40, 24, 7, 0]
    assert prefix.at(0).eps == 0 and prefix.at(3).teacher_runs and not prefix.at(4).teacher_runs


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=-0.1), "eps must be a finite float >= 0"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(prefix_max=-1), "prefix_max must be an int >= 0"),
    (dict(prefix_max=2.5), "prefix_max must be an int"),
    (dict(temperature=-1.0), "temperature must be a finite float >= 0"),
])
def test_bad_behaviour_steps_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BehaviourStep(**kwargs)
