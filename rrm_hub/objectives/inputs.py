"""Input makers: the images an objective trains or matches on, made from the clean batch.

Each maker is called as `maker(model, x, y, origins, mismatch)` (`mismatch`: the student's feature mismatch with
the teacher's clean representation, for attacks that raise it) and scaled by `schedule(factor)` (an epsilon
warm-up). `perturbs` says whether its images differ from the clean ones, `reads_clean_target` whether it needs
`mismatch`; a maker with a `memory` (a `PerturbationMemory`) needs the batches' origins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, random_perturbation
from ..errors import RRMError
from ..memory import MemoryCheckpointing, PerturbationMemory
from .base import unwrap

FeatureMismatch = Callable[[torch.Tensor], torch.Tensor]


class InputMaker(MemoryCheckpointing):
    perturbs = True
    reads_clean_target = False

    def __init__(self, memory: PerturbationMemory | None = None):
        self.memory, self.factor = memory, 1.0

    def schedule(self, factor: float) -> None:
        """Scale the perturbation's size by `factor` (0 to 1) from now on."""
        self.factor = factor


class CleanInputs(InputMaker):
    """The training images themselves (the paper's matching)."""

    perturbs = False

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        return x


class NoisyInputs(InputMaker):
    """The images plus random `noise` of size `eps` (see `rrm_hub.attacks.random_perturbation`), clipped to [0, 1]."""

    def __init__(self, eps: float, norm: str, noise: str = "uniform"):
        super().__init__()
        self.eps, self.norm, self.noise = eps, norm, noise

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        return (x + random_perturbation(x, self.eps * self.factor, self.norm, self.noise)).clamp(0, 1)


class AttackedInputs(InputMaker):
    """The images moved by an attack against the model being trained, raising its cross-entropy on the labels
    (`loss="ce"`) or its feature mismatch (`"mismatch"`); with a `memory`, each image's attack starts where it ended
    the epoch before (ATTA), else at random. `attack_at(factor)` is the attack at `factor` times the full epsilon."""

    def __init__(self, attack_at: Callable[[float], Attack], loss: str = "ce",
                 memory: PerturbationMemory | None = None):
        super().__init__(memory)
        self.attack_at, self.loss, self.current = attack_at, loss, attack_at(1.0)
        self.reads_clean_target = loss == "mismatch"

    def schedule(self, factor: float) -> None:
        super().schedule(factor)
        self.current = self.attack_at(factor)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 origins: torch.Tensor | None = None, mismatch: FeatureMismatch | None = None) -> torch.Tensor:
        model = unwrap(model)
        if self.loss == "ce":
            if y is None:
                raise RRMError("attack_loss='ce' moves the images against the labels: pass y")
            loss_of = lambda x_adv: F.cross_entropy(model(x_adv), y)  # noqa: E731
        else:
            loss_of = lambda x_adv: mismatch(model(x_adv, return_features=True)[1])  # noqa: E731
        if self.memory is None:
            return self.current.maximize(loss_of, x)
        return self.memory.continue_attack(self.current, loss_of, x, origins)


class FreeInputs(InputMaker):
    """Each image plus its carried perturbation, with no attack pass: the training step's own backward pass moves the
    perturbation one step of `step` (a multiple of eps) along the training loss's gradient, for the next epoch."""

    def __init__(self, memory: PerturbationMemory, eps: float, norm: str, step: float):
        super().__init__(memory)
        self.eps, self.norm, self.step = eps, norm, step

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        eps = self.eps * self.factor
        return self.memory.free_view(eps, self.norm, self.step * eps, x, origins)
