"""Objectives without representation matching: natural training, adversarial training (PGD-AT, fast-AT, N-FGSM,
ATTA, free-AT) and logit distillation (KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, ascent_direction, project
from ..errors import RRMError
from ..memory import PerturbationMemory
from .base import Logs, ObjectiveBase, warmup_scale
from .inputs import AttackedInputs
from .losses import distillation_loss


class Natural(ObjectiveBase):
    """Plain cross-entropy training."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        loss = F.cross_entropy(model(x), y)
        return loss, {"ce": loss.detach()}


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


class Distillation(ObjectiveBase):
    """Logit distillation (Hinton et al., 2015) from the teacher: the RRM paper's comparison."""

    name = "kd"

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9):
        self.teacher, self.temperature, self.kd_weight = teacher, temperature, kd_weight

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        with torch.inference_mode():
            teacher_logits = self.teacher(x)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        kd = distillation_loss(logits, teacher_logits.clone(), self.temperature)
        return (1 - self.kd_weight) * ce + self.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}
