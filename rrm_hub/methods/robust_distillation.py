"""Robust distillation of the teacher's logits on attacked images: ARD, RSLAD and AdaAD, each an input maker (the
attack), the teacher's targets and a divergence.

Costs are stated per training step in passes over the batch: F / B a forward / backward of the student, Ft / Bt of
the teacher, k the attack's steps (one FGSM step by default; `--match-steps`). A natural step is F + B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack
from ..errors import RRMError
from ..teachers.cache import TeacherCache
from .base import Logs, ObjectiveBase, warmup_scale
from .inputs import AttackedInputs, MixedInputs, UnlabeledInputs
from .losses import distillation_loss, kl_divergence
from .memory import CARRIED_STEP, PerturbationMemory
from .method import Cost, Method, Parts
from .options import NOT_WITH_NFGSM, RRMOptions, matching_attack
from .targets import TeacherTargets

UNLABELED = "--unlabeled-split (or --unlabeled-dataset)"
UNCACHED = ("{kind} distills on images other than the training images, whose teacher outputs no cache of the "
            "training images holds: drop --cache-teacher")


class RobustDistillation(ObjectiveBase):
    """What the three share: the teacher's targets (live, or a `TeacherCache` of its clean outputs at
    `teacher_layer`), the attack (`attack_at(factor)`: the attack at `factor` times its full epsilon, ramped up over
    `eps_warmup` of training), a `memory` (`PerturbationMemory`) that carries each image's attack over epochs,
    `unlabeled` (`UnlabeledInputs`): a share of each batch's images replaced by images without labels, and `mix`
    (`MixedInputs`): distill on mixes of two images instead of the images themselves (a carried attack then goes on
    from the perturbation of the mix its image led the epoch before)."""

    attack_loss = "ce"

    def __init__(self, teacher: nn.Module, attack_at: Callable[[float], Attack], *, teacher_layer: str | None = None,
                 cache: TeacherCache | None = None, memory: PerturbationMemory | None = None,
                 eps_warmup: float = 0.0, mix: MixedInputs | None = None, unlabeled: UnlabeledInputs | None = None):
        if cache is not None and (mix is not None or unlabeled is not None):
            raise RRMError(UNCACHED.format(kind=UNLABELED if mix is None else f"--distill-on {mix.kind}"))
        if unlabeled is not None and memory is not None:
            raise RRMError(f"{UNLABELED} draws images seen about once, with no attack to carry: use --match-start "
                           "random")
        self.targets = TeacherTargets(teacher, teacher_layer, cache=cache)
        self.mix, self.unlabeled = mix, unlabeled
        joint = self.attack_loss == "joint"
        self.inputs = AttackedInputs(attack_at, self.attack_loss, memory, teacher if joint else None)
        self.memory, self.eps_warmup, self.uses_origins = memory, eps_warmup, memory is not None

    @property
    def teacher(self) -> nn.Module:
        return self.targets.teacher

    @property
    def current(self) -> Attack:
        """The attack at the current epsilon."""
        return self.inputs.current

    def views(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The images distilled on: `x`, a share of it replaced by unlabeled images (`unlabeled`), mixed (`mix`)."""
        if self.unlabeled is not None:
            x = self.unlabeled(model, x)
        return x if self.mix is None else self.mix(model, x)

    def labels(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`y`, with the teacher's classes (`target`: its logits of the views) for the unlabeled images drawn."""
        drawn = 0 if self.unlabeled is None else self.unlabeled.drawn
        return torch.cat([target[:drawn].argmax(1), y[drawn:]]) if drawn else y

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of `x`, without a graph (looked up in the cache if there is one)."""
        return self.targets(x)[0]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The carried attack's memory, or where unlabeled images are drawn (never both) how many were."""
        return super().checkpoint_state() if self.unlabeled is None else self.unlabeled.checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(state)
        if self.unlabeled is not None:
            self.unlabeled.load_checkpoint_state(state)

    def schedule(self, progress: float) -> None:
        """Called by the training loop: ramps the attack's epsilon up over `eps_warmup` of training."""
        self.inputs.schedule(warmup_scale(progress, self.eps_warmup))

    def remove(self) -> None:
        """Remove the hooks from the teacher."""
        self.targets.remove()


class ARD(RobustDistillation):
    """Adversarially Robust Distillation (Goldblum et al., AAAI 2020):
    `weight * T^2 * KL(t(x)/T || s(x_adv)/T) + (1 - weight) * CE(s(x), y)`, x_adv raising the student's
    cross-entropy; the teacher sees the clean images only (a cache serves it). The authors' defaults: weight 1,
    T 30 (their KL also averages over classes, a constant factor 1/C that this batch-mean KL leaves out).

    Cost per step: k (F + B) for the attack, F + B on x_adv, one more F on x when weight < 1, Ft (none cached).
    """

    name = "ard"

    def __init__(self, teacher: nn.Module, attack_at: Callable[[float], Attack], *, weight: float = 1.0,
                 temperature: float = 30.0, **parts):
        if not 0 <= weight <= 1:
            raise RRMError(f"ARD's weight is a fraction: 0 <= --ard-weight <= 1, got {weight}")
        super().__init__(teacher, attack_at, **parts)
        self.weight, self.temperature = weight, temperature

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        x = self.views(model, x)
        target = self.teacher_logits(x)
        y = self.labels(y, target)  # the attack raises the CE of the teacher's classes where no label is
        x_adv = self.inputs(model, x, y, origins)
        if self.weight < 1:
            logits = model(torch.cat([x_adv, x]))
            adv_logits, ce = logits[: len(x)], F.cross_entropy(logits[len(x):], y)
        else:
            adv_logits, ce = model(x_adv), None
        kd = distillation_loss(adv_logits, target, self.temperature)
        loss = self.weight * kd if ce is None else self.weight * kd + (1 - self.weight) * ce
        logs = {"kd": kd.detach(), "eps": torch.tensor(self.current.eps)}
        if ce is not None:
            logs["ce"] = ce.detach()
        return loss, logs


class RSLAD(RobustDistillation):
    """Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021): `5/6 KL(t(x) || s(x_adv)) +
    1/6 KL(t(x) || s(x))`, x_adv raising `KL(t(x) || s(x_adv))`: the teacher's clean soft labels are the target of
    attack and loss alike (the authors' code: `KLDivLoss(log_softmax(student), softmax(teacher))`), so the teacher
    sees the clean images only (a cache serves it).

    Cost per step: k (F + B) for the attack, 2 F + B (x_adv and x in one batch), Ft (none cached).
    """

    name = "rslad"
    attack_loss = "kl"
    ADVERSARIAL_WEIGHT = 5 / 6

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        x = self.views(model, x)
        target = self.teacher_logits(x)
        x_adv = self.inputs(model, x, y, origins, lambda logits: kl_divergence(logits, target))
        logits = model(torch.cat([x_adv, x]))
        adversarial, clean = kl_divergence(logits[: len(x)], target), kl_divergence(logits[len(x):], target)
        loss = self.ADVERSARIAL_WEIGHT * adversarial + (1 - self.ADVERSARIAL_WEIGHT) * clean
        return loss, {"kl_adv": adversarial.detach(), "kl_clean": clean.detach(),
                      "eps": torch.tensor(self.current.eps)}


class AdaAD(RobustDistillation):
    """Adaptive Adversarial Distillation (Huang et al., CVPR 2023): `KL(t(x') || s(x'))`, x' raising that same
    divergence with both models on x' and the gradient through the teacher included (the authors' default of the
    clean term's weight: 0). The teacher sees the moved images, so no cache serves it.

    Cost per step: k (F + B + Ft + Bt) for the attack, F + B on x', Ft on x'.
    """

    name = "adaad"
    attack_loss = "joint"

    def __init__(self, teacher: nn.Module, attack_at: Callable[[float], Attack], **parts):
        if parts.get("cache") is not None:
            raise RRMError("AdaAD shows the teacher the attacked images, which --cache-teacher does not hold; drop "
                           "--cache-teacher")
        super().__init__(teacher, attack_at, **parts)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        x_adv = self.inputs(model, self.views(model, x), y, origins)
        loss = kl_divergence(model(x_adv), self.teacher_logits(x_adv))
        return loss, {"kl_adv": loss.detach(), "eps": torch.tensor(self.current.eps)}


def _builder(cls: type[RobustDistillation]):
    """How a run builds `cls`: its attack from the matching options (--match-eps, its steps and step, 0.5 eps when
    carried by a memory, its warm-up); ARD with its weight and temperature."""

    def build(parts: Parts) -> RobustDistillation:
        options, eps = parts.options, parts.matching_eps
        step_size = options.step_size or (CARRIED_STEP if parts.memory is not None else None)
        attack_at = lambda factor: matching_attack(options, eps * factor, parts.norm, step_size)  # noqa: E731
        extra = ({"weight": parts.robust.ard_weight, "temperature": parts.robust.ard_temperature} if cls is ARD
                 else {})
        on = parts.robust.distill_on
        mix = None if on == "training" else MixedInputs(on, options.mix_alpha)
        unlabeled = (None if parts.unlabeled is None
                     else UnlabeledInputs(parts.unlabeled, parts.robust.unlabeled_share))
        return cls(parts.teacher, attack_at, teacher_layer=parts.teacher_layer, cache=parts.cache,
                   memory=parts.memory, eps_warmup=options.eps_warmup, mix=mix, unlabeled=unlabeled, **extra)

    return build


def _rules(name: str):
    def check(options: RRMOptions, *, cached: bool, pairs: int, carried: bool) -> None:
        if pairs:
            raise RRMError(f"--match pairs layers for RRM; --method {name} distills logits: drop --match")
        if options.attack == "free":
            raise RRMError(f"--method {name} runs its attack: use --match-attack fgsm or n-fgsm")
        if carried and options.attack == "n-fgsm":
            raise RRMError(NOT_WITH_NFGSM)

    return check


def _carried(options: RRMOptions, match_start: str) -> bool:
    return match_start == "previous"


def _ard_cost(cost: Cost) -> float:
    return cost.options.steps + (1.0 if cost.ard_weight == 1 else 2.0) + cost.teacher


def _adaad_cost(cost: Cost) -> float:
    k, ratio = cost.options.steps, cost.teacher_ratio
    return k * (1.0 + ratio) + 1.0 + ratio / 3


OFFERED = ("distill", "benchmark")
METHODS = [
    Method("ard", "the teacher's soft labels at temperature 30 on images moved against the student's CE", OFFERED,
           _builder(ARD), _ard_cost, teacher=True, cache="can", carries=_carried, check=_rules("ard")),
    Method("rslad", "the teacher's clean soft labels as the target of the attack and of the loss", OFFERED,
           _builder(RSLAD), lambda cost: cost.options.steps + 2.0 + cost.teacher, teacher=True, cache="can",
           carries=_carried, check=_rules("rslad")),
    Method("adaad", "the divergence of student and teacher on images moved to raise it", OFFERED, _builder(AdaAD),
           _adaad_cost, teacher=True, carries=_carried, check=_rules("adaad")),
]
NAMES = tuple(method.name for method in METHODS)
"""The methods `--distill-on` and `--unlabeled-split` apply to."""
