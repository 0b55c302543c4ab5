"""The behaviour policies of the methods: how the rollout tokens of optimiser step k are drawn,
as a BehaviourStep (behaviour.py holds the per-token law all of them share). Each is a small
class with its config name, the method settings it reads (`settings`, built by `from_settings`),
`at(k)` and a description.

student:        pi_S alone (vanilla OPD; the teacher does not run in rollouts)
trb_blend:      TRB (arXiv 2605.31159): every token from the blend mu with the largest beta such
                that KL(mu || pi_S) <= eps_k; eps_k from a LinearAnneal (trb) or a Constant
                (fixed_eps)
teacher_prefix: TrOPD's off-policy guidance (arXiv 2606.01249): each rollout's first l tokens
                from the teacher, the rest from the student, l uniform on {0..L_max(k)},
                L_max(k) = floor(CosineAnneal(L_0, K)(k))
Every schedule is non-increasing, so `at(k).teacher_runs` going False is for good.
"""

import dataclasses
import math

from .behaviour import BehaviourStep
from .schedules import Constant, CosineAnneal, LinearAnneal


@dataclasses.dataclass(frozen=True)
class Student:
    name = "student"
    settings = ()

    @classmethod
    def from_settings(cls, settings) -> "Student":
        return cls()

    def at(self, step: int) -> BehaviourStep:
        return BehaviourStep()

    def describe(self) -> str:
        return "student: rollouts from the student alone"


@dataclasses.dataclass(frozen=True)
class TRBBlend:
    eps: LinearAnneal | Constant
    name = "trb_blend"
    settings = ("eps_schedule", "eps0", "anneal_steps", "solver_tol")
    eps_schedules = ("linear", "constant")

    @classmethod
    def from_settings(cls, settings) -> "TRBBlend":
        """solver_tol is read by the rollout engines, which run the solve."""
        if settings["eps_schedule"] not in cls.eps_schedules:
            raise ValueError(f"eps_schedule must be one of {cls.eps_schedules}, got "
                             f"{settings['eps_schedule']!r}")
        if settings["eps_schedule"] == "linear":
            return cls(LinearAnneal(settings["eps0"], settings["anneal_steps"]))
        return cls(Constant(settings["eps0"]))

    def at(self, step: int) -> BehaviourStep:
        return BehaviourStep(eps=self.eps(step))

    def describe(self) -> str:
        return f"trb_blend: rollouts from the trust-region blend, eps {self.eps.describe()}"


@dataclasses.dataclass(frozen=True)
class TeacherPrefix:
    prefix: CosineAnneal
    name = "teacher_prefix"
    settings = ("prefix_max", "prefix_anneal_steps")

    @classmethod
    def from_settings(cls, settings) -> "TeacherPrefix":
        return cls(CosineAnneal(float(settings["prefix_max"]), settings["prefix_anneal_steps"]))

    def at(self, step: int) -> BehaviourStep:
        return BehaviourStep(prefix_max=math.floor(self.prefix(step)))

    def describe(self) -> str:
        return (f"teacher_prefix: a teacher prefix of up to L_max tokens per rollout, then the "
                f"student; L_max {self.prefix.describe()}")

