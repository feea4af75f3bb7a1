"""Training objectives: each maps (model, pixels, labels) to (loss, logs). The loop in `train.py` is shared.

- `Natural`: cross-entropy on clean images.
- `AdversarialTraining`: cross-entropy on attacked images (PGD-AT with `pgd`, fast-AT with `fgsm`).
- `RRM`: Robust Representation Matching, `w_ce * CE + w_feat * (1 - cos(z_S, z_T))`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import Attack, random_perturbation
from .errors import RRMError
from .features import FeatureTap

Logs = dict[str, torch.Tensor]


class Natural:
    """Plain cross-entropy training."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        loss = F.cross_entropy(model(x), y)
        return loss, {"ce": loss.detach()}


class AdversarialTraining:
    """Cross-entropy on adversarial examples made by `attack` against the model being trained.

    `eps_warmup` ramps epsilon linearly from 0 over that fraction of training (PGD-AT at a large
    epsilon, e.g. 0.3 on MNIST, often never leaves chance level without it).
    """

    def __init__(self, attack: Attack, name: str | None = None, eps_warmup: float = 0.0):
        self.attack = self.current = attack
        self.eps_warmup = eps_warmup
        self.name = name or ("fast_at" if attack.steps == 1 else "pgd_at")

    def schedule(self, progress: float) -> None:
        """Called by the training loop with the fraction of training done."""
        scale = min(1.0, progress / self.eps_warmup) if self.eps_warmup > 0 else 1.0
        step_size = None if self.attack.step_size is None else self.attack.step_size * scale
        self.current = replace(self.attack, eps=self.attack.eps * scale, step_size=step_size)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        x_adv = self.current(model, x, y)
        loss = F.cross_entropy(model(x_adv), y)
        return loss, {"ce": loss.detach(), "eps": torch.tensor(self.current.eps)}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mismatch of two (B, D) representations: `1 - cos` averaged over the batch, or mean squared error."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    if kind == "l2":
        return F.mse_loss(student.float(), teacher.float())
    raise RRMError(f"unknown feature loss '{kind}'; use cosine or l2")


class RRM:
    """Robust Representation Matching (Vaishnavi et al., 2022) against a frozen teacher.

    The student must return `(logits, features)` for `model(x, return_features=True)` (see `RRMStudent`).
    `match_on="noise"` matches on `x` plus uniform noise inside the eps-ball, for teacher and student alike
    (`match_on="clean"` is the paper's method).
    """

    name = "rrm"

    def __init__(
        self,
        teacher: nn.Module,
        teacher_layer: str | None = None,
        ce_weight: float = 0.005,
        feature_weight: float = 1.0,
        kind: str = "cosine",
        match_on: str = "clean",
        noise_eps: float = 0.3,
        norm: str = "linf",
    ):
        if match_on not in ("clean", "noise"):
            raise RRMError(f"unknown --match-on '{match_on}'; use clean or noise")
        self.teacher = teacher
        self.tap = FeatureTap(teacher.network, teacher_layer)
        self.ce_weight, self.feature_weight, self.kind = ce_weight, feature_weight, kind
        self.match_on, self.noise_eps, self.norm = match_on, noise_eps, norm

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's representation of `x`, computed without building a graph."""
        with torch.inference_mode():
            self.teacher(x)
            features = self.tap.pop()
        return features.clone()  # a normal tensor, usable in the student's graph

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        if self.match_on == "noise":
            x = (x + random_perturbation(x, self.noise_eps, self.norm)).clamp(0, 1)
        target = self.teacher_features(x)
        logits, features = model(x, return_features=True)
        if features.shape[1] != target.shape[1]:
            raise RRMError(f"student features have width {features.shape[1]} but the teacher's have "
                           f"{target.shape[1]}; build the student with RRMStudent.for_teacher")
        ce = F.cross_entropy(logits, y)
        mismatch = feature_loss(features, target, self.kind)
        loss = self.ce_weight * ce + self.feature_weight * mismatch
        return loss, {"ce": ce.detach(), "feat": mismatch.detach()}
