"""PGD and FGSM in [0, 1] pixel space, L-inf or L2: one implementation for training and evaluation.

The attack never changes the model's mode or its parameters' gradients; callers choose train / eval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RRMError

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = get_args(Norm)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """`delta` moved back into the eps-ball of `norm`."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta)).clamp(max=1.0)


Noise = Literal["uniform", "sign", "gaussian"]
NOISES: tuple[str, ...] = get_args(Noise)


def random_perturbation(x: torch.Tensor, eps: float, norm: str, noise: str = "uniform") -> torch.Tensor:
    """A random perturbation of size `eps`.

    `noise`: "uniform" inside the eps-ball (L-inf: each pixel in [-eps, eps]; L2: a uniform radius),
    "sign" on the ball's corners (L-inf: each pixel +-eps; L2: on the sphere), "gaussian" with standard
    deviation `eps` per pixel (not projected).
    """
    if noise not in NOISES:
        raise RRMError(f"unknown noise '{noise}'; use one of {', '.join(NOISES)}")
    if noise == "gaussian":
        return torch.randn_like(x) * eps
    if norm == "linf":
        if noise == "sign":
            return torch.randint_like(x, 0, 2).mul_(2).sub_(1).mul_(eps)
        return torch.empty_like(x).uniform_(-eps, eps)
    if noise == "sign":
        direction = torch.randn_like(x)
        return direction / _flat_norm(direction) * eps
    direction = torch.randn_like(x)
    radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    return direction / _flat_norm(direction) * radius * eps


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent step of unit size for `norm`: the sign (L-inf) or the normalized gradient (L2)."""
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad)


@dataclass(frozen=True)
class Attack:
    """A (random-start) projected gradient attack; `steps=1` with `step_size=1.25 * eps` is FGSM-RS.

    `start_eps` sizes the random start (default `eps`); `bounded=False` keeps the steps' sum unprojected
    (only clipped to valid pixels), as N-FGSM does for training; evaluation attacks stay bounded.
    """

    eps: float
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None  # default 2.5 * eps / steps (Madry et al.)
    random_start: bool = True
    restarts: int = 1
    start_eps: float | None = None
    bounded: bool = True

    def __post_init__(self):
        if self.norm not in NORMS:
            raise RRMError(f"unknown norm '{self.norm}'; use one of {', '.join(NORMS)}")
        if self.eps < 0:
            raise RRMError(f"eps must be >= 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1:
            raise RRMError("attack steps and restarts must be >= 1")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def scaled(self, factor: float) -> Attack:
        """The same attack with epsilon, step size and random start all scaled by `factor` (an epsilon warm-up)."""
        step_size = None if self.step_size is None else self.step_size * factor
        start_eps = None if self.start_eps is None else self.start_eps * factor
        return replace(self, eps=self.eps * factor, step_size=step_size, start_eps=start_eps)

    @property
    def name(self) -> str:
        if self.steps == 1:
            return "fgsm" if self.bounded else "nfgsm"
        return f"pgd{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for `model` at `x` (labels `y`): per example, the restart that fools it."""
        if self.eps == 0:
            return x.detach()
        x = x.detach()
        best, fooled = None, None
        for _ in range(self.restarts):
            x_adv = self.maximize(lambda x_adv: F.cross_entropy(model(x_adv), y), x)
            if self.restarts == 1:
                return x_adv
            with torch.no_grad():
                now_fooled = model(x_adv).argmax(dim=1) != y
            if best is None:
                best, fooled = x_adv, now_fooled
            else:
                take = now_fooled & ~fooled
                best[take] = x_adv[take]
                fooled |= now_fooled
            if fooled.all():
                break
        return best

    def maximize(self, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 start: torch.Tensor | None = None) -> torch.Tensor:
        """One run (no restarts) of projected gradient ascent on any `loss_of(x_adv)` inside the eps-ball (or, with
        `bounded=False`, from the random start without projection); `start` (a perturbation, projected into the
        ball) replaces the random start."""
        x = x.detach()
        if start is not None:
            delta = project(start.detach(), self.eps, self.norm)
        elif self.random_start:
            delta = random_perturbation(x, self.eps if self.start_eps is None else self.start_eps, self.norm)
        else:
            delta = torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(loss_of(x + delta), delta)
            delta = delta.detach() + self.alpha * ascent_direction(grad, self.norm)
            if self.bounded:
                delta = project(delta, self.eps, self.norm)
            delta = ((x + delta).clamp(0, 1) - x).detach()
        return x + delta


def fgsm(eps: float, norm: str = "linf") -> Attack:
    """FGSM with a random start (Wong et al., "Fast is better than free"): one step of 1.25 * eps."""
    return Attack(eps=eps, norm=norm, steps=1, step_size=1.25 * eps, random_start=True)


def nfgsm(eps: float, norm: str = "linf", noise_scale: float = 2.0) -> Attack:
    """N-FGSM (de Jorge et al., "Make some noise", 2022): a random start of `noise_scale * eps`, one step of `eps`,
    no projection back into the eps-ball. Same cost as FGSM; avoids its catastrophic overfitting at large eps."""
    return Attack(eps=eps, norm=norm, steps=1, step_size=eps, random_start=True, start_eps=noise_scale * eps,
                  bounded=False)


def pgd(eps: float, norm: str = "linf", steps: int = 20, restarts: int = 1) -> Attack:
    """PGD with random start, `steps` steps of 2.5 * eps / steps, the best of `restarts`."""
    return Attack(eps=eps, norm=norm, steps=steps, restarts=restarts)
