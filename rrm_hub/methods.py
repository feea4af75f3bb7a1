"""Training methods by name: the objective each one trains with, shared by the recipes and the benchmark."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from torch import nn

from .attacks import fgsm, nfgsm, pgd
from .errors import RRMError
from .memory import CARRIED_STEP, PerturbationMemory
from .objectives import RRM, AdversarialTraining, Distillation, FreeAdversarialTraining, Natural
from .teacher_cache import TeacherCache

Method = Literal["natural", "pgd_at", "fast_at", "nfgsm_at", "atta_at", "free_at", "kd", "rrm", "rrm_clean",
                 "rrm_cached"]
METHODS: tuple[str, ...] = get_args(Method)
"""`atta_at`: fast-AT whose steps go on from each image's last perturbation (ATTA); `rrm`: RRM as the RRM flags
say (recipes/rrm.py's defaults, except the shared data flags: --pad 2 here unless given); `rrm_clean`: the paper's
matching on the clean images; `rrm_cached`: the same with the teacher's outputs looked up in a `TeacherCache`."""


def make_objective(method: str, *, eps: float, norm: str, teacher: nn.Module | None = None,
                   teacher_layer: str | None = None, attack_steps: int = 7, replays: int = 4,
                   eps_warmup: float = 0.3, rrm_options: dict | None = None, cache: TeacherCache | None = None,
                   memory: PerturbationMemory | None = None, pairs: list | None = None):
    """The objective of `method` for the threat model (eps, norm); `rrm_cached` needs the teacher's `cache`;
    `memory` (a `PerturbationMemory`) carries the perturbations of `atta_at` and `rrm` from epoch to epoch; `pairs`
    (`RRMStudent.pairs`) make `rrm` match several layers instead of `teacher_layer`."""
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
    if method in ("kd", "rrm", "rrm_clean", "rrm_cached") and teacher is None:
        raise RRMError(f"method '{method}' needs a teacher")
    if method == "kd":
        return Distillation(teacher)
    options = dict(rrm_options or {})
    options["eps"] = eps if options.get("eps") is None else options["eps"]  # the matching budget: --eps by default
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
