"""Losses between two models' outputs: representation mismatch (one or several layer pairs) and distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import RRMError


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mismatch of two (B, D) representations: `1 - cos` averaged over the batch, or mean squared error.

    For two (B, C, h, w) maps the cosine is taken over C at each location and averaged over locations and batch.
    """
    if kind == "cosine":
        return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    if kind == "l2":
        return F.mse_loss(student.float(), teacher.float())
    raise RRMError(f"unknown feature loss '{kind}'; use cosine or l2")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(teacher || student) on temperature-softened logits, scaled by T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean") * t * t


def as_list(features) -> list[torch.Tensor]:
    return list(features) if isinstance(features, (tuple, list)) else [features]


class Mismatch:
    """The weighted sum of `feature_loss` over matched representations: one per layer pair (`weights`), or one."""

    def __init__(self, kind: str = "cosine", weights: Sequence[float] = (1.0,)):
        self.kind, self.weights = kind, list(weights)

    def __call__(self, features, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The total and each pair's own mismatch; `features` and `targets` are tensors or one per pair."""
        features, targets = as_list(features), as_list(targets)
        if len(features) != len(targets):
            raise RRMError(f"the student returns {len(features)} matched representations but the objective "
                           f"matches {len(targets)} layers; build both from the same pairs")
        for feature, target in zip(features, targets, strict=True):
            if feature.shape[1:] != target.shape[1:]:
                raise RRMError(f"student features have shape {tuple(feature.shape[1:])} but the teacher's have "
                               f"{tuple(target.shape[1:])}; build the student with RRMStudent.for_teacher")
        parts = [feature_loss(f, t, self.kind) for f, t in zip(features, targets, strict=True)]
        return sum(w * part for w, part in zip(self.weights, parts, strict=True)), parts


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions, summed over classes and averaged over the batch: RSLAD's
    and AdaAD's divergence (`distillation_loss` at temperature 1); the teacher's logits keep their graph."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), F.log_softmax(teacher_logits.float(), dim=1),
                    reduction="batchmean", log_target=True)
