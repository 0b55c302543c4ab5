"""eps schedules: the linear TRB anneal, fixed eps and vanilla OPD."""

import pytest

from trb_megatron.trb import EpsSchedule


def test_linear_anneal_reaches_zero_and_stays():
    sched = EpsSchedule(method="trb", eps0=0.02, anneal_steps=50)
    assert sched(0) == 0.02
    assert sched(25) == pytest.approx(0.01)
    assert sched(49) == pytest.approx(0.02 / 50)
    assert sched(50) == 0.0 and sched(10_000) == 0.0
    assert sched.teacher_in_rollouts(49) and not sched.teacher_in_rollouts(50)


def test_baselines():
    assert EpsSchedule(method="opd", eps0=0.5)(3) == 0.0
    assert EpsSchedule(method="fixed_eps", eps0=0.05)(1000) == 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="sft"), "is not one of"),
    (dict(eps0=-1.0), "eps0 must be"),
    (dict(eps0=float("nan")), "eps0 must be"),
    (dict(anneal_steps=0), "anneal_steps"),
])
def test_invalid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpsSchedule(**kwargs)
