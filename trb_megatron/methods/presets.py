"""Methods by name: a method is a behaviour policy (policies.py) and an objective
(objectives.py, tropd.py); a preset names one pair, and `build_method` assembles a Method from a
preset's parts and their settings (config.MethodConfig holds and documents them).

| preset    | behaviour      | objective  | source |
|-----------|----------------|------------|--------|
| trb       | trb_blend      | reverse_kl | TRB, arXiv 2605.31159 (eps annealed linearly) |
| opd       | student        | reverse_kl | vanilla on-policy distillation |
| fixed_eps | trb_blend      | reverse_kl | the TRB paper's fixed-eps baseline (eps constant) |
| tropd     | teacher_prefix | tropd      | TrOPD, arXiv 2606.01249 |
| trb_tropd | trb_blend      | tropd      | no paper: TRB's blended warmup with TrOPD's objective |

A new method is one module with its behaviour or objective class (its config name, the
settings it reads, `from_settings`), one entry in BEHAVIOURS or OBJECTIVES and a preset row.
"""

import dataclasses

from .objectives import ReverseKL
from .policies import Student, TeacherPrefix, TRBBlend
from .tropd import TrOPD

BEHAVIOURS = {cls.name: cls for cls in (Student, TRBBlend, TeacherPrefix)}
OBJECTIVES = {cls.name: cls for cls in (ReverseKL, TrOPD)}
PRESETS = {
    "trb": {"behaviour": "trb_blend", "objective": "reverse_kl", "eps_schedule": "linear"},
    "opd": {"behaviour": "student", "objective": "reverse_kl"},
    "fixed_eps": {"behaviour": "trb_blend", "objective": "reverse_kl",
                  "eps_schedule": "constant"},
    "tropd": {"behaviour": "teacher_prefix", "objective": "tropd"},
    "trb_tropd": {"behaviour": "trb_blend", "objective": "tropd", "eps_schedule": "linear"},
}
PART_KEYS = ("behaviour", "objective", "eps_schedule")
"""The method keys a preset decides (the other settings have one default for every preset)."""
MEANINGLESS = {
    ("teacher_prefix", "reverse_kl", "sampled"):
        "the K1 (sampled) estimator needs tokens drawn from the student, and teacher-prefix "
        "tokens are not: use estimator full or topk, or objective tropd (which weights them "
        "as guidance)",
}
"""(behaviour, objective, estimator) combinations refused at validation, and why."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A named method: its behaviour policy (`at(step)` -> BehaviourStep) and its objective."""

    name: str
    behaviour: object
    objective: object

    def describe(self) -> str:
        return f"{self.name}: {self.behaviour.describe()}; {self.objective.describe()}"


def build_method(name: str, settings) -> Method:
    """The Method of resolved settings (a mapping with every MethodConfig key, as
    MethodConfig.resolve leaves it); ValueError naming a bad part or setting."""
    behaviour, objective = settings["behaviour"], settings["objective"]
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {tuple(BEHAVIOURS)}, got {behaviour!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {objective!r}")
    return Method(name=name, behaviour=BEHAVIOURS[behaviour].from_settings(settings),
                  objective=OBJECTIVES[objective].from_settings(settings))
