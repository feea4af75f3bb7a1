"""Adversarial training without a teacher: PGD-AT, fast-AT (FGSM with a random start), N-FGSM-AT, ATTA-AT (the
one-step attack carried over epochs) and free-AT (minibatch replays). The teacherless twins of the distillation
methods."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, ascent_direction, fgsm, nfgsm, pgd, project
from ..errors import RRMError
from .base import Logs, ObjectiveBase, warmup_scale
from .inputs import AttackedInputs
from .memory import CARRIED_STEP, PerturbationMemory
from .method import Cost, Method, Parts


class AdversarialTraining(ObjectiveBase):
    """Cross-entropy on adversarial examples made by `attack` against the model being trained.

    `eps_warmup` ramps epsilon linearly from 0 over that fraction of training (PGD-AT at a large epsilon, e.g. 0.3
    on MNIST, often never leaves chance level without it). With a `memory` (`PerturbationMemory`) each image's
    attack starts where it ended the epoch before (ATTA); the batches then carry their origins.
    """

    def __init__(self, attack: Attack, name: str | None = None, eps_warmup: float = 0.0,
                 memory: PerturbationMemory | None = None):
        self.inputs = AttackedInputs(attack.scaled, "ce", memory)
        self.attack, self.eps_warmup, self.memory = attack, eps_warmup, memory
        self.uses_origins = memory is not None
        self.name = name or {"fgsm": "fast_at", "nfgsm": "nfgsm_at"}.get(attack.name, "pgd_at")

    @property
    def current(self) -> Attack:
        """The attack at the current epsilon."""
        return self.inputs.current

    def schedule(self, progress: float) -> None:
        """Called by the training loop with the fraction of training done."""
        self.inputs.schedule(warmup_scale(progress, self.eps_warmup))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        if self.current.eps == 0 and self.memory is None:  # the warm-up's first step: nothing to attack
            x_adv = x.detach()
        else:
            x_adv = self.inputs(model, x, y, origins)
        loss = F.cross_entropy(model(x_adv), y)
        return loss, {"ce": loss.detach(), "eps": torch.tensor(self.current.eps)}


class FreeAdversarialTraining(ObjectiveBase):
    """Free adversarial training (Shafahi et al., 2019): each minibatch is replayed `replays` times, and the
    backward pass that updates the weights also gives the gradient that moves a perturbation kept across
    replays and minibatches (an ascent step of `eps`). Train `replays` times fewer epochs for the same cost.
    """

    name = "free_at"

    def __init__(self, eps: float, norm: str = "linf", replays: int = 4):
        if replays < 1:
            raise RRMError("free adversarial training needs --replays >= 1")
        self.eps, self.norm, self.replays = eps, norm, replays
        self.delta: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta, self.grad = torch.zeros_like(x), None
        if self.grad is not None:  # the ascent step from the previous replay's backward pass
            self.delta = project(self.delta + self.eps * ascent_direction(self.grad, self.norm), self.eps, self.norm)
            self.grad = None
        delta = ((x + self.delta).clamp(0, 1) - x).detach().requires_grad_(True)
        delta.register_hook(self._keep_grad)
        self.delta = delta.detach()
        loss = F.cross_entropy(model(x + delta), y)
        return loss, {"ce": loss.detach()}


def atta(parts: Parts) -> AdversarialTraining:
    """Fast-AT whose steps of 0.5 eps go on from the last epoch's perturbation (ATTA)."""
    if parts.memory is None:
        raise RRMError("method 'atta_at' needs a perturbation memory (rrm_hub.methods.memory.PerturbationMemory)")
    attack = replace(fgsm(parts.eps, parts.norm), step_size=CARRIED_STEP * parts.eps)
    return AdversarialTraining(attack, "atta_at", parts.eps_warmup, parts.memory)


def _two(cost: Cost) -> float:
    return 2.0


OFFERED = ("adversarial", "benchmark")
METHODS = [
    Method("pgd_at", "PGD with --attack-steps", OFFERED,
           lambda parts: AdversarialTraining(pgd(parts.eps, parts.norm, parts.attack_steps),
                                             eps_warmup=parts.eps_warmup),
           lambda cost: cost.attack_steps + 1.0),
    Method("fast_at", "FGSM with a random start", OFFERED,
           lambda parts: AdversarialTraining(fgsm(parts.eps, parts.norm), eps_warmup=parts.eps_warmup), _two),
    Method("nfgsm_at", "N-FGSM (random start of 2 eps, a step of eps, not projected)", OFFERED,
           lambda parts: AdversarialTraining(nfgsm(parts.eps, parts.norm), eps_warmup=parts.eps_warmup), _two),
    Method("atta_at", "one step of 0.5 eps an epoch from where the image's attack ended the epoch before (ATTA)",
           OFFERED, atta, _two, carries=lambda options, match_start: True),
    Method("free_at", "free-AT: each minibatch replayed, the perturbation moved by the training backward",
           ("benchmark",), lambda parts: FreeAdversarialTraining(parts.eps, parts.norm, parts.replays),
           lambda cost: 1.0),
]
