"""Attack suites in [0, 1] pixel space and their per-example aggregation.

`pgd` is our PGD-20; `standard` is AutoAttack's standard version (APGD-CE, APGD-T and the black-box Square
attack, from `torchattacks`). An example counts as robust only if every attack of a suite failed on it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .attacks import NORMS, pgd
from .errors import RRMError

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""Anything called like `Attack`: (model, x, y) -> adversarial x, all in [0, 1] pixels."""

Suite = Literal["pgd", "standard"]
SUITES: tuple[str, ...] = get_args(Suite)
WORST_CASE = "worst_case"


@dataclass(frozen=True)
class TorchAttack:
    """APGD-CE, APGD-T or Square from `torchattacks`, called like `Attack`: (model, x, y) -> x_adv.

    `budget` is the number of iterations (APGD; APGD-T per target class) or of queries (Square). The call
    leaves the model as it found it: module modes restored, `requires_grad` and `.grad` untouched, and the
    global random state restored (torchattacks reseeds it with `seed`).
    """

    kind: str  # "apgd-ce", "apgd-t" or "square"
    eps: float
    norm: str = "linf"
    budget: int = 100
    seed: int = 0

    KINDS = ("apgd-ce", "apgd-t", "square")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise RRMError(f"unknown torchattacks attack '{self.kind}'; use one of {', '.join(self.KINDS)}")
        if self.norm not in NORMS:
            raise RRMError(f"unknown norm '{self.norm}'; use one of {', '.join(NORMS)}")
        if self.eps < 0 or self.budget < 1:
            raise RRMError(f"{self.kind}: eps must be >= 0 and the budget >= 1")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def black_box(self) -> bool:
        return self.kind == "square"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.detach()
        modes = [module.training for module in model.modules()]
        devices = [x.device] if x.device.type != "cpu" else []
        try:
            with torch.random.fork_rng(devices=devices, device_type=x.device.type):
                attack = self._build(model, x)
                return attack(x.detach(), y).detach()
        finally:
            for module, training in zip(model.modules(), modes, strict=True):
                module.training = training

    def _build(self, model: nn.Module, x: torch.Tensor):
        import torchattacks

        norm = "Linf" if self.norm == "linf" else "L2"
        common = {"norm": norm, "eps": self.eps, "seed": self.seed}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints when a model has no parameters
            if self.kind == "apgd-ce":
                attack = torchattacks.APGD(model, steps=self.budget, n_restarts=1, loss="ce", **common)
            elif self.kind == "apgd-t":  # torchattacks tries n_classes - 1 target classes
                attack = torchattacks.APGDT(model, steps=self.budget, n_restarts=1,
                                            n_classes=_target_classes(model, x) + 1, **common)
            else:
                attack = torchattacks.Square(model, n_queries=self.budget, n_restarts=1, p_init=0.8, loss="margin",
                                             **common)
        attack.set_device(x.device)
        return attack


def _target_classes(model: nn.Module, x: torch.Tensor) -> int:
    """AutoAttack's number of target classes for APGD-T: the 9 most likely wrong ones (fewer if there are fewer)."""
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        with torch.inference_mode():
            num_classes = model(x[:1]).shape[1]
    if num_classes < 3:
        raise RRMError(f"APGD-T's DLR loss needs at least 3 classes; the model has {num_classes}: use --suite pgd")
    return min(9, num_classes - 1)


def attack_suite(suite: str, eps: float, norm: str = "linf", steps: int | None = None,
                 queries: int = 5000) -> dict[str, AttackFn]:
    """The attacks of `suite`: `pgd` is PGD-`steps` (default 20); `standard` is AutoAttack's standard version
    (APGD-CE and APGD-T with `steps` iterations, default 100, and Square with `queries` queries; FAB-T left out).
    """
    if suite == "pgd":
        attack = pgd(eps, norm, steps or 20)
        return {attack.name: attack}
    if suite == "standard":
        steps = steps or 100
        return {"apgd-ce": TorchAttack("apgd-ce", eps, norm, steps), "apgd-t": TorchAttack("apgd-t", eps, norm, steps),
                "square": TorchAttack("square", eps, norm, queries)}
    raise RRMError(f"unknown suite '{suite}'; use one of {', '.join(SUITES)}")


def accuracy(hits: torch.Tensor) -> float:
    """The fraction of True in a per-example bool tensor."""
    return hits.float().mean().item()


def worst_case(hits: dict[str, torch.Tensor], names: Iterable[str]) -> torch.Tensor:
    """Per example: right on the clean input and under every attack in `names`."""
    robust = hits["clean"].clone()
    for name in names:
        robust &= hits[name]
    return robust
