"""Training methods by name: the objective each one trains with, shared by the recipes and the benchmark."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from torch import nn

from .attacks import fgsm, nfgsm, pgd
from .config import RRMOptions
from .errors import RRMError
from .memory import CARRIED_STEP, PerturbationMemory
from .objectives import ARD, RRM, RSLAD, AdaAD, AdversarialTraining, Distillation, FreeAdversarialTraining, Natural
from .objectives.rrm import matching_attack
from .teacher_cache import TeacherCache

Method = Literal["natural", "pgd_at", "fast_at", "nfgsm_at", "atta_at", "free_at", "kd", "rrm", "rrm_clean",
                 "rrm_cached", "ard", "rslad", "adaad"]
METHODS: tuple[str, ...] = get_args(Method)
"""`atta_at`: fast-AT whose steps go on from each image's last perturbation (ATTA); `rrm`: RRM as the RRM flags
say (recipes/rrm.py's defaults, except the shared data flags: --pad 2 here unless given); `rrm_clean`: the paper's
matching on the clean images; `rrm_cached`: the same with the teacher's outputs looked up in a `TeacherCache`;
`ard`, `rslad`, `adaad`: robust distillation of the teacher's logits (`rrm_hub.objectives.robust_distillation`),
their attack the RRM flags' (--match-eps, --match-steps, --match-attack, --match-eps-warmup, --match-start)."""
ROBUST_DISTILLATION = {"ard": ARD, "rslad": RSLAD, "adaad": AdaAD}


def make_objective(method: str, *, eps: float, norm: str, teacher: nn.Module | None = None,
                   teacher_layer: str | None = None, attack_steps: int = 7, replays: int = 4,
                   eps_warmup: float = 0.3, rrm_options: dict | None = None, cache: TeacherCache | None = None,
                   memory: PerturbationMemory | None = None, pairs: list | None = None,
                   robust_options: dict | None = None):
    """The objective of `method` for the threat model (eps, norm); `rrm_cached` needs the teacher's `cache` (which
    `rrm`, `ard` and `rslad` take too); `memory` (a `PerturbationMemory`) carries the perturbations of `atta_at`,
    `rrm`, `ard`, `rslad` and `adaad` from epoch to epoch; `pairs` (`RRMStudent.pairs`) make `rrm` match several
    layers instead of `teacher_layer`; `robust_options` (`RobustDistillOptions` fields) are ARD's weight and
    temperature."""
    if method == "natural":
        return Natural()
    if method == "pgd_at":
        return AdversarialTraining(pgd(eps, norm, attack_steps), eps_warmup=eps_warmup)
    if method == "fast_at":
        return AdversarialTraining(fgsm(eps, norm), eps_warmup=eps_warmup)
    if method == "nfgsm_at":
        return AdversarialTraining(nfgsm(eps, norm), eps_warmup=eps_warmup)
    if method == "atta_at":  # fast-AT whose steps of 0.5 eps go on from the last epoch's perturbation (ATTA)
        if memory is None:
            raise RRMError("method 'atta_at' needs a perturbation memory (rrm_hub.memory.PerturbationMemory)")
        attack = replace(fgsm(eps, norm), step_size=CARRIED_STEP * eps)
        return AdversarialTraining(attack, "atta_at", eps_warmup, memory)
    if method == "free_at":
        return FreeAdversarialTraining(eps, norm, replays)
    if method in ("kd", "rrm", "rrm_clean", "rrm_cached", *ROBUST_DISTILLATION) and teacher is None:
        raise RRMError(f"method '{method}' needs a teacher")
    if method == "kd":
        return Distillation(teacher)
    options = dict(rrm_options or {})
    options["eps"] = eps if options.get("eps") is None else options["eps"]  # the matching budget: --eps by default
    if method in ROBUST_DISTILLATION:
        return robust_distillation(method, options, norm, teacher, teacher_layer, cache, memory, robust_options)
    if method == "rrm":
        layers = {"pairs": pairs} if pairs else {"teacher_layer": teacher_layer}
        return RRM(teacher, norm=norm, memory=memory, cache=cache, **layers, **options)
    if method == "rrm_clean":
        return RRM(teacher, teacher_layer, norm=norm, **{**options, "match_on": "clean"})
    if method == "rrm_cached":
        if cache is None:
            raise RRMError("method 'rrm_cached' needs a teacher cache (rrm_hub.teacher_cache.TeacherCache)")
        return RRM(teacher, teacher_layer, norm=norm, cache=cache, **{**options, "match_on": "clean"})
    raise RRMError(f"unknown method '{method}'; use some of {', '.join(METHODS)}")


def robust_distillation(method: str, rrm_options: dict, norm: str, teacher: nn.Module, teacher_layer: str | None,
                        cache: TeacherCache | None, memory: PerturbationMemory | None, robust_options: dict | None):
    """ARD, RSLAD or AdaAD with the RRM options' attack: --match-eps, its steps and step (0.5 eps when carried by a
    `memory`), its warm-up."""
    options = RRMOptions(**rrm_options)
    if options.attack == "free":
        raise RRMError(f"method '{method}' runs its attack: use --match-attack fgsm or n-fgsm")
    step_size = options.step_size or (CARRIED_STEP if memory is not None else None)
    attack_at = lambda factor: matching_attack(options, options.eps * factor, norm, step_size)  # noqa: E731
    extra = {}
    if method == "ard":
        robust = robust_options or {}
        extra = {key: robust[name] for key, name in (("weight", "ard_weight"), ("temperature", "ard_temperature"))
                 if name in robust}
    return ROBUST_DISTILLATION[method](teacher, attack_at, teacher_layer=teacher_layer, cache=cache, memory=memory,
                                       eps_warmup=options.eps_warmup, **extra)


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


FORWARD, BACKWARD = 1 / 3, 2 / 3
"""A forward and a backward pass, in natural steps (one forward and one backward of the student on the batch)."""


def step_cost(method: str, *, attack_steps: int = 7, rrm: RRMOptions | None = None, cached: bool = False,
              ard_weight: float = 1.0, teacher_ratio: float = 1.0) -> float:
    """What one training step of `method` costs, in natural steps, counting passes over the batch: a forward is
    1/3 of a natural step, a backward 2/3, a teacher pass `teacher_ratio` times the student's. `rrm`: the RRM options
    (which also give the other distillation methods' attack steps); `cached`: the teacher's clean outputs looked
    up (`--cache-teacher`). Data loading and the optimizer step are not counted."""
    rrm = rrm or RRMOptions()
    teacher = 0.0 if cached else teacher_ratio * FORWARD
    k = rrm.steps
    if method in ("natural", "free_at"):
        return 1.0
    if method == "pgd_at":
        return attack_steps + 1.0
    if method in ("fast_at", "nfgsm_at", "atta_at"):
        return 2.0
    if method in ("kd", "rrm_clean", "rrm_cached"):
        return 1.0 + (0.0 if method == "rrm_cached" else teacher_ratio * FORWARD)
    if method == "ard":
        return k + (1.0 if ard_weight == 1 else 2.0) + teacher
    if method == "rslad":
        return k + 2.0 + teacher
    if method == "adaad":
        return k * (1.0 + teacher_ratio) + 1.0 + teacher_ratio * FORWARD
    if method != "rrm":
        raise RRMError(f"unknown method '{method}'; use some of {', '.join(METHODS)}")
    both = rrm.clean_weight > 0 and rrm.match_on != "clean"  # the student runs on the view and the clean images
    student = 2.0 if both else 1.0
    if rrm.match_on != "adversarial":
        return student + (teacher_ratio * FORWARD * (2 if both else 1) if not cached else 0.0)
    attack = 0.0 if rrm.attack == "free" else float(k)
    clean_too = both or rrm.attack_loss == "mismatch"  # the teacher's clean outputs are needed besides the view's
    views = 2 if clean_too and rrm.resolved_teacher_input == "matched" else 1
    return attack + student + (0.0 if cached else teacher_ratio * FORWARD * views)
