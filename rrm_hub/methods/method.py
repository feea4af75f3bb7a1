"""`Method`: one training method as one object: what it needs, how its objective is built from the parts a run
provides (`Parts`), what a step costs (`Cost`), the rules across its options, and what a run reports of it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from ..teachers.cache import TeacherCache
from .base import Objective
from .memory import PerturbationMemory
from .options import RobustDistillOptions, RRMOptions

FORWARD, BACKWARD = 1 / 3, 2 / 3
"""A forward and a backward pass, in natural steps (one forward and one backward of the student on the batch)."""


@dataclass(frozen=True)
class Parts:
    """What a run provides to build an objective: the threat model, the teacher (and the layer or layer pairs
    matched), the matching and attack options, ARD's options, adversarial training's attack steps, free-AT's
    replays, the epsilon warm-up of adversarial training, a teacher cache, a perturbation memory and unlabeled
    images."""

    eps: float
    norm: str = "linf"
    teacher: nn.Module | None = None
    teacher_layer: str | None = None
    pairs: tuple = ()
    options: RRMOptions = field(default_factory=RRMOptions)
    robust: RobustDistillOptions = field(default_factory=RobustDistillOptions)
    attack_steps: int = 7
    replays: int = 4
    eps_warmup: float = 0.3
    cache: TeacherCache | None = None
    memory: PerturbationMemory | None = None
    unlabeled: Iterable | None = None  # batches of images the teacher labels (--unlabeled-split)

    @property
    def matching_eps(self) -> float:
        """The matching attack's budget: --match-eps, else the run's --eps."""
        return self.eps if self.options.eps is None else self.options.eps


@dataclass(frozen=True)
class Cost:
    """What a step's cost depends on: the matching and attack options, adversarial training's attack steps, whether
    the teacher's outputs are looked up (`cached`), ARD's weight, and a teacher forward's cost relative to the
    student's (`teacher_ratio`)."""

    options: RRMOptions = field(default_factory=RRMOptions)
    attack_steps: int = 7
    cached: bool = False
    ard_weight: float = 1.0
    teacher_ratio: float = 1.0

    @property
    def teacher(self) -> float:
        """One teacher forward, in natural steps (none when cached)."""
        return 0.0 if self.cached else self.teacher_ratio * FORWARD


def never(options: RRMOptions, match_start: str) -> bool:
    return False


def no_rules(options: RRMOptions, *, cached: bool, pairs: int, carried: bool) -> None:
    """A method without rules across the options."""


def attack_facts(objective: Objective) -> dict:
    """metrics.json's account of an objective that runs an attack: its name, budget, step and start."""
    current = getattr(objective, "current", None)
    attack = None if current is None else {"name": current.name, "eps": current.eps, "step_size": current.alpha,
                                            "match_start": "previous" if objective.memory else "random"}
    return {"rrm_options": None, "attack": attack}


@dataclass(frozen=True)
class Method:
    """One training method. `offered_by`: the recipes that offer it ("distill": recipes/rrm.py --method,
    "adversarial": recipes/adversarial_train.py --method, "benchmark": recipes/benchmark.py --methods); `teacher`:
    needs one; `cache`: whether a `TeacherCache` of the teacher's clean outputs serves it ("can") or it needs one
    ("needs"); `carries(options, match_start)`: whether it keeps a perturbation memory; `check`: the rules across
    its options (raising `RRMError`); `facts(objective)`: what metrics.json says of it."""

    name: str
    summary: str
    offered_by: tuple[str, ...]
    build: Callable[[Parts], Objective]
    cost: Callable[[Cost], float]
    teacher: bool = False
    cache: str = "no"
    carries: Callable[[RRMOptions, str], bool] = never
    check: Callable[..., None] = no_rules
    facts: Callable[[Objective], dict] = attack_facts
