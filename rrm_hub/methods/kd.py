"""Logit distillation (KD) from the teacher on the clean images: the RRM paper's comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Logs, ObjectiveBase
from .losses import distillation_loss
from .method import FORWARD, Method


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


METHODS = [Method("kd", "logit distillation from the teacher on the clean images", ("distill", "benchmark"),
                  lambda parts: Distillation(parts.teacher), lambda cost: 1.0 + cost.teacher_ratio * FORWARD,
                  teacher=True, facts=lambda objective: {"rrm_options": None, "attack": None})]
