"""Attack suites in [0, 1] pixel space and their per-example aggregation.

`pgd` is our PGD-20. `standard`, `plus` and `rand` are AutoAttack's versions (Croce and Hein, ICML 2020) run by the
authors' own code, `pyautoattack`, with its fixed settings: each attack runs on the images that the attacks before it
did not break, as AutoAttack's `run_standard_evaluation` does, and each attack's accuracy is the accuracy after it.
An example counts as robust only if every attack of a suite failed on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Literal, get_args

import torch
from accelerate import PartialState
from torch import nn

from ..attacks import NORMS, pgd
from ..errors import RRMError
from ..progress import progress

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""Anything called like `Attack`: (model, x, y) -> adversarial x, all in [0, 1] pixels. A suite's AutoAttack run
returns one adversarial batch per attack instead ({attack: x_adv after it})."""

Suite = Literal["pgd", "standard", "plus", "rand"]
SUITES: tuple[str, ...] = get_args(Suite)
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
WORST_CASE = "worst_case"
SUITE_HELP = ("final evaluation: pgd (PGD-20, fast), or AutoAttack's standard, plus or rand version run by the "
              "authors' pyautoattack with its fixed settings (standard: APGD-CE, APGD-T, FAB-T, Square; rand: for "
              "randomized models); robust means every attack failed")
PACKAGE = "pyautoattack"
PARTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def autoattack_version() -> str:
    """`pyautoattack <version>`, for cards and metrics."""
    return f"{PACKAGE} {package_version(PACKAGE)}"


def _autoattack(model: nn.Module, eps: float, norm: str, version: str, seed: int, device, attacks=None):
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise RRMError(f"AutoAttack needs the '{PACKAGE}' package ({err}); pip install {PACKAGE}") from None
    if norm not in NORMS:
        raise RRMError(f"unknown norm '{norm}'; use one of {', '.join(NORMS)}")
    return AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps, version=version, seed=seed,
                      device=device, attacks=attacks)


@contextlib.contextmanager
def untouched(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Run an attack that may reseed torch, switch module modes or leave gradients on the parameters (FAB calls
    backward), leaving all three as they were."""
    modes = [module.training for module in model.modules()]
    grads = [None if param.grad is None else param.grad.clone() for param in model.parameters()]
    devices = [x.device] if x.device.type != "cpu" else []
    model.eval()  # attacked as evaluated: no dropout, batch-norm statistics untouched
    try:
        with torch.random.fork_rng(devices=devices, device_type=x.device.type):
            yield
    finally:
        for module, training in zip(model.modules(), modes, strict=True):
            module.training = training
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad


class _Collect(logging.Handler):
    """Keeps the warnings AutoAttack's own checks log (randomness, zero gradients, outputs not logits, ...)."""

    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.into:
            self.into.append(message)


@contextlib.contextmanager
def autoattack_warnings(into: list[str]) -> Iterator[None]:
    logger = logging.getLogger("auto-attack")
    handler, propagate, level = _Collect(into), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False  # reported in metrics.json and on the card, not as stray log lines
    logger.setLevel(logging.WARNING)  # whatever the root logger's level
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


@dataclass
class AutoAttackRun:
    """One of AutoAttack's versions on a batch, as its authors' `run_standard_evaluation` runs it: each attack on the
    examples still robust after the ones before. Returns {attack: the adversarial batch after it}; the warnings of
    AutoAttack's own checks are kept in `warnings`."""

    version: str
    eps: float
    norm: str = "linf"
    seed: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"autoattack-{self.version}"

    def attacks(self) -> list[str]:
        """The attacks of this version, in AutoAttack's order."""
        return list(_autoattack(nn.Identity(), self.eps, self.norm, self.version, self.seed, "cpu").attacks_to_run)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = x.detach(), y.detach()
        with untouched(model, x), autoattack_warnings(self.warnings):
            runner = _autoattack(model, self.eps, self.norm, self.version, self.seed, x.device)
            with torch.no_grad():
                logits = model(x)
            robust = logits.argmax(dim=1) == y
            if self.version != "rand" and logits.shape[1] < 10:
                raise RRMError(f"AutoAttack's {self.version} version attacks 9 target classes; the model has "
                               f"{logits.shape[1]}: use --suite rand or --suite pgd")
            x_adv, stages = x.clone(), {}
            for attack in progress(list(runner.attacks_to_run), desc=self.name, leave=False,
                               disable=not PartialState().is_local_main_process):
                runner.attacks_to_run = [attack]  # the version's settings stay; one attack at a time
                index = robust.nonzero().flatten()
                if len(index):
                    moved, y_adv = runner.run_standard_evaluation(x[index], y[index], batch_size=len(index))
                    fooled = y_adv.to(y.device) != y[index]  # AutoAttack's own verdict, as its cascade keeps it
                    x_adv[index[fooled]], robust[index[fooled]] = moved[fooled], False
                stages[attack] = x_adv.clone()
        return stages


@dataclass(frozen=True)
class AutoAttackPart:
    """One attack of AutoAttack (`kind`: apgd-ce, apgd-dlr, apgd-t, fab, fab-t or square), called like `Attack`, with
    `budget` iterations (queries for square) instead of the versions' fixed settings; for probes and tests."""

    kind: str
    eps: float
    norm: str = "linf"
    budget: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.kind not in PARTS:
            raise RRMError(f"unknown AutoAttack attack '{self.kind}'; use one of {', '.join(PARTS)}")
        if self.eps < 0 or self.budget < 1:
            raise RRMError(f"{self.kind}: eps must be >= 0 and the budget >= 1")

    @property
    def name(self) -> str:
        return self.kind

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0 or not len(x):
            return x.detach()
        with untouched(model, x), autoattack_warnings([]):
            runner = _autoattack(model, self.eps, self.norm, "custom", self.seed, x.device, [self.kind])
            runner.apgd.n_restarts = runner.fab.n_restarts = 1  # `budget` iterations, one run
            runner.apgd.n_iter = runner.apgd_targeted.n_iter = runner.fab.n_iter = self.budget
            runner.square.n_queries = self.budget
            x_adv, _ = runner.run_standard_evaluation(x.detach(), y.detach(), batch_size=len(x))
        return x_adv.detach()


def check_steps(suite: str, steps: int | None, restarts: int = 1) -> None:
    """Only PGD takes a number of steps and restarts: AutoAttack's versions keep their own settings."""
    if suite in AUTOATTACK_VERSIONS and (steps is not None or restarts > 1):
        raise RRMError(f"AutoAttack's {suite} version has fixed settings; --steps / --eval-steps and --restarts are "
                       "for --suite pgd")


def attack_suite(suite: str, eps: float, norm: str = "linf", steps: int | None = None, seed: int = 0,
                 restarts: int = 1) -> dict:
    """The attacks of `suite`: `pgd` is PGD-`steps` (default 20), the worst of `restarts` random starts per image;
    AutoAttack's versions run with their own settings."""
    if suite == "pgd":
        attack = pgd(eps, norm, steps or 20, restarts)
        return {attack.name: attack}
    if suite in AUTOATTACK_VERSIONS:
        check_steps(suite, steps, restarts)
        run = AutoAttackRun(suite, eps, norm, seed)
        return {run.name: run}
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
