"""Methods side by side under one budget: cost per step, memory, robustness over wall-clock time."""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch
from torch import nn

from .attacks import fgsm, nfgsm, pgd
from .errors import RRMError
from .memory import CARRIED_STEP, PerturbationMemory
from .objectives import RRM, AdversarialTraining, Distillation, FreeAdversarialTraining, Natural
from .teacher_cache import TeacherCache

METHODS = ("natural", "pgd_at", "fast_at", "nfgsm_at", "atta_at", "free_at", "kd", "rrm", "rrm_clean", "rrm_cached")
"""`atta_at`: fast-AT whose steps go on from each image's last perturbation (ATTA); `rrm`: RRM as the RRM flags
say (recipes/rrm.py's defaults, except the shared data flags: --pad 2 here unless given); `rrm_clean`: the paper's
matching on the clean images; `rrm_cached`: the same with the teacher's outputs looked up in a `TeacherCache`."""


def make_objective(method: str, *, eps: float, norm: str, teacher: nn.Module | None = None,
                   teacher_layer: str | None = None, attack_steps: int = 7, replays: int = 4,
                   eps_warmup: float = 0.3, rrm_options: dict | None = None, cache: TeacherCache | None = None,
                   memory: PerturbationMemory | None = None):
    """The objective of `method` for the threat model (eps, norm); `rrm_cached` needs the teacher's `cache`;
    `memory` (a `PerturbationMemory`) carries the perturbations of `atta_at` and `rrm` from epoch to epoch."""
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
    options = {"eps": eps, "norm": norm, **(rrm_options or {})}
    if method == "rrm":
        return RRM(teacher, teacher_layer, memory=memory, cache=cache, **options)
    if method == "rrm_clean":
        return RRM(teacher, teacher_layer, **{**options, "match_on": "clean"})
    if method == "rrm_cached":
        if cache is None:
            raise RRMError("method 'rrm_cached' needs a teacher cache (rrm_hub.teacher_cache.TeacherCache)")
        return RRM(teacher, teacher_layer, cache=cache, **{**options, "match_on": "clean"})
    raise RRMError(f"unknown method '{method}'; use some of {', '.join(METHODS)}")


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds until robust accuracy first reaches `target` on a curve of {"seconds", "robust"}."""
    for point in curve:
        if point["robust"] >= target:
            return point["seconds"]
    return None


def step_memory(model: nn.Module, objective, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor) -> dict:
    """Memory of one training step of `objective`: the bytes of the storages saved for backward during the step
    (activations, each storage counted once while it lives; a storage freed and then saved again at the same
    address, as an attack's next inner step does, counts again, whatever the allocator reuses), and on CUDA the
    peak allocated."""
    live: dict[int, int] = {}  # storage address -> saved tensors alive that use it
    total = 0

    def release(address: int) -> None:
        live[address] -= 1
        if not live[address]:
            del live[address]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in live:
            total += storage.nbytes()
            live[storage.data_ptr()] = 0
        live[storage.data_ptr()] += 1
        weakref.finalize(tensor, release, storage.data_ptr())
        return tensor

    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = objective(model, x, y, *rest)  # rest: the batch's origins, for an objective that keeps a memory
    loss.backward()
    model.zero_grad(set_to_none=True)
    result = {"saved_activation_bytes": total}
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result
