"""Every training method by name, one `Method` each; the recipes' `--method` choices, the rules, the objectives and
the step costs are lookups here.

Adding a method: write its objective and a `METHODS = [Method(...)]` list in a file of this package (see
`methods/kd.py`), then add that module to `MODULES` below; `--method` (recipes/rrm.py or adversarial_train.py, as its
`offered_by` says) and recipes/benchmark.py then offer it, and the study and the benchmark count its cost.
"""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from ..errors import RRMError
from ..teachers.cache import TeacherCache
from . import adversarial, kd, natural, robust_distillation, rrm
from .base import Objective
from .memory import PerturbationMemory
from .method import Cost, Method, Parts
from .options import RobustDistillOptions, RRMOptions

MODULES = (natural, adversarial, rrm, robust_distillation, kd)
METHODS: dict[str, Method] = {method.name: method for module in MODULES for method in module.METHODS}


def get(name: str) -> Method:
    """The method called `name` (a one-line error naming the others)."""
    if name not in METHODS:
        raise RRMError(f"unknown method '{name}'; use one of {', '.join(METHODS)}")
    return METHODS[name]


def names(offered_by: str | None = None) -> tuple[str, ...]:
    """The methods a recipe offers ("distill", "adversarial", "benchmark"), or all."""
    return tuple(name for name, method in METHODS.items() if offered_by is None or offered_by in method.offered_by)


def cacheable() -> tuple[str, ...]:
    """The methods a `TeacherCache` of the teacher's clean outputs can serve (--cache-teacher)."""
    return tuple(name for name, method in METHODS.items() if method.cache == "can")


def cache_refusal(name: str, options: RRMOptions, pairs: int = 0) -> str | None:
    """Why a `TeacherCache` of the teacher's clean outputs cannot serve method `name` with these options (None where
    it can): the method reads one, and the options' targets are the teacher's on the clean image, at one layer."""
    if get(name).cache == "no":
        served = ", ".join(n for n in cacheable() if "distill" in METHODS[n].offered_by)
        return (f"--cache-teacher holds the teacher's outputs on clean images: it serves --method {served}, "
                f"not {name} (drop --cache-teacher)")
    return options.targets_refusal(pairs)


def check(name: str, options: RRMOptions, *, cached: bool = False, pairs: int = 0,
          match_start: str = "random") -> None:
    """The rules of a run of method `name` with these options: a teacher cache only where one serves, then the
    method's own rules across its options."""
    method = get(name)
    if cached and (refusal := cache_refusal(name, options, pairs)):
        raise RRMError(refusal)
    method.check(options, cached=cached, pairs=pairs, carried=method.carries(options, match_start))


def build(name: str, parts: Parts) -> Objective:
    """Method `name`'s objective from the parts a run provides (its rules checked first)."""
    method = get(name)
    if method.teacher and parts.teacher is None:
        raise RRMError(f"method '{name}' needs a teacher")
    if method.cache != "needs":
        check(name, parts.options, cached=parts.cache is not None, pairs=len(parts.pairs),
              match_start="previous" if parts.memory is not None else "random")
    return method.build(parts)


def make_objective(method: str, *, eps: float, norm: str, teacher: nn.Module | None = None,
                   teacher_layer: str | None = None, attack_steps: int = 7, replays: int = 4,
                   eps_warmup: float = 0.3, rrm_options: dict | None = None, cache: TeacherCache | None = None,
                   memory: PerturbationMemory | None = None, pairs: list | None = None,
                   robust_options: dict | None = None) -> Objective:
    """`build` with the parts as keywords: the RRM options and ARD's as dicts of their fields (the matching budget
    `eps` is the run's `eps` unless the options give one)."""
    given = {"eps": None, **(rrm_options or {})}
    options = RRMOptions(**{f.name: given[f.name] for f in fields(RRMOptions) if f.name in given})
    robust = RobustDistillOptions(**(robust_options or {}))
    parts = Parts(eps=eps, norm=norm, teacher=teacher, teacher_layer=teacher_layer, pairs=tuple(pairs or ()),
                  options=options, robust=robust, attack_steps=attack_steps, replays=replays, eps_warmup=eps_warmup,
                  cache=cache, memory=memory)
    return build(method, parts)


def step_cost(method: str, *, attack_steps: int = 7, rrm: RRMOptions | None = None, cached: bool = False,
              ard_weight: float = 1.0, teacher_ratio: float = 1.0) -> float:
    """What one training step of `method` costs, in natural steps, counting passes over the batch: a forward is
    1/3 of a natural step, a backward 2/3, a teacher pass `teacher_ratio` times the student's. `rrm`: the RRM options
    (which also give the other distillation methods' attack steps); `cached`: the teacher's clean outputs looked
    up (`--cache-teacher`). Data loading and the optimizer step are not counted."""
    cost = Cost(options=rrm or RRMOptions(), attack_steps=attack_steps, cached=cached, ard_weight=ard_weight,
                teacher_ratio=teacher_ratio)
    return get(method).cost(cost)


def forward_ratio(teacher: nn.Module, student: nn.Module, sample, repeats: int = 5) -> float:
    """The seconds of a teacher forward over a student forward on the batch `sample`, without a graph (the median of
    `repeats` after a warm-up each): the measured `teacher_ratio` of `step_cost`."""
    import time

    import torch

    def seconds(model: nn.Module) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                started = time.perf_counter()
                model(sample)
                times.append(time.perf_counter() - started)
        return sorted(times[1:])[repeats // 2]

    was_training = student.training
    student.eval()
    try:
        return seconds(teacher) / seconds(student)
    finally:
        student.train(was_training)
