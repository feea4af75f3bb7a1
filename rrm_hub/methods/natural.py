"""Natural training: cross-entropy on the clean images (the unit every step cost is counted in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Logs, ObjectiveBase
from .method import Method


class Natural(ObjectiveBase):
    """Plain cross-entropy training."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        loss = F.cross_entropy(model(x), y)
        return loss, {"ce": loss.detach()}


METHODS = [Method("natural", "cross-entropy on the clean images", ("benchmark",), lambda parts: Natural(),
                  lambda cost: 1.0, facts=lambda objective: {"rrm_options": None, "attack": None})]
