"""Gradient-masking sanity checks (Carlini et al., "On Evaluating Adversarial Robustness", 2019)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from accelerate import Accelerator

from ..attacks import pgd
from .suites import AttackFn, AutoAttackPart, accuracy, worst_case


@dataclass(frozen=True)
class MaskingChecks:
    """Gradient-masking sanity checks (Carlini et al. 2019) and their thresholds; accuracies are fractions. The
    probes run on the first `examples` test images (None: all), compared with the suite on the same images.

    large_eps: PGD-20 at a budget that reaches any image (L-inf 1.0; L2 sqrt(pixels)) must get accuracy down
        to at most `large_eps_accuracy`.
    more_steps: PGD-`many_steps` must not be more than `steps_tolerance` less successful than PGD-`few_steps`.
    black_box: Square must not fool more than `black_box_tolerance` of all examples that every white-box
        attack failed on (with `probe_queries` queries when the suite has no black-box attack of its own).
    monotone_in_eps: accuracy must not rise with epsilon by more than `monotone_tolerance` along the sweep
        (the suite's worst case when it has two or more epsilons, else PGD-`few_steps` at eps/2, eps, 2 eps).
    """

    examples: int | None = 200
    large_eps_accuracy: float = 0.10
    few_steps: int = 10
    many_steps: int = 50
    steps_tolerance: float = 0.02
    black_box_tolerance: float = 0.05
    monotone_tolerance: float = 0.02
    probe_queries: int = 300

    def large_eps(self, norm: str, pixels: int) -> float:
        return 1.0 if norm == "linf" else math.sqrt(pixels)

    def probes(self, eps: float, norm: str, pixels: int, black_box: bool, sweep: bool) -> dict[str, AttackFn]:
        """The extra attacks the checks need, besides the suite's own."""
        probes: dict[str, AttackFn] = {
            "check:large-eps": pgd(self.large_eps(norm, pixels), norm, 20),
            "check:few-steps": pgd(eps, norm, self.few_steps),
            "check:many-steps": pgd(eps, norm, self.many_steps),
        }
        if not black_box:
            probes["check:square"] = AutoAttackPart("square", eps, norm, self.probe_queries)
        if not sweep:
            probes["check:half-eps"] = pgd(eps / 2, norm, self.few_steps)
            probes["check:double-eps"] = pgd(2 * eps, norm, self.few_steps)
        return probes


def check_large_eps(hits: dict[str, torch.Tensor], config: MaskingChecks, eps: float, norm: str) -> dict:
    reached = accuracy(hits["check:large-eps"])
    return {"passed": reached <= config.large_eps_accuracy,
            "detail": f"PGD-20 at {norm} eps {eps:g} (any image reachable): {reached:.1%} accuracy, expected "
                      f"<= {config.large_eps_accuracy:.0%}; more means the attack cannot follow the gradients"}


def check_more_steps(hits: dict[str, torch.Tensor], config: MaskingChecks) -> dict:
    few, many = accuracy(hits["check:few-steps"]), accuracy(hits["check:many-steps"])
    return {"passed": many <= few + config.steps_tolerance,
            "detail": f"PGD-{config.few_steps}: {few:.1%}, PGD-{config.many_steps}: {many:.1%} accuracy; more steps "
                      f"must not help the model (tolerance {config.steps_tolerance:.0%})"}


def check_black_box(hits: dict[str, torch.Tensor], white: Sequence[str], black: Sequence[str],
                    config: MaskingChecks) -> dict:
    white_failed = worst_case(hits, white)
    black_fooled = ~worst_case(hits, black)
    rate = accuracy(white_failed & black_fooled)
    return {"passed": rate <= config.black_box_tolerance,
            "detail": f"{', '.join(black)} fooled {rate:.1%} of all examples on which every white-box attack "
                      f"({', '.join(white)}) failed, expected <= {config.black_box_tolerance:.0%}; a black-box "
                      "attack beating white-box ones means their gradients are useless"}


def check_monotone(curve: list[dict], config: MaskingChecks, what: str) -> dict:
    points = sorted(curve, key=lambda p: p["eps"])
    rises = [(a["eps"], b["eps"]) for a, b in pairwise(points)
             if b["accuracy"] > a["accuracy"] + config.monotone_tolerance]
    values = ", ".join(f"{p['eps']:g}: {p['accuracy']:.1%}" for p in points)
    found = "; rises " + ", ".join(f"{a:g} -> {b:g}" for a, b in rises) if rises else ""
    return {"passed": not rises,
            "detail": f"{what} by eps ({values}) must not rise by more than {config.monotone_tolerance:.0%}{found}"}


def run_checks(hits: dict[str, torch.Tensor], white: Sequence[str], black: Sequence[str], curve: list[dict],
               config: MaskingChecks, eps: float, norm: str, pixels: int) -> dict[str, dict]:
    """The four checks, from the per-example results of the suite's white- and black-box attacks at `eps`, of
    the probes (`MaskingChecks.probes`) and from the suite's worst-case `curve` by epsilon."""
    white = [*white, "check:few-steps", "check:many-steps"]
    black = list(black) or ["check:square"]
    if len(curve) > 2:
        monotone = check_monotone(curve, config, "worst-case accuracy of the suite")
    else:
        probe_curve = [curve[0], *({"eps": e * eps, "accuracy": accuracy(hits[name])} for e, name in
                                   ((0.5, "check:half-eps"), (1.0, "check:few-steps"), (2.0, "check:double-eps")))]
        monotone = check_monotone(probe_curve, config, f"PGD-{config.few_steps} accuracy")
    return {
        "large_eps": check_large_eps(hits, config, config.large_eps(norm, pixels), norm),
        "more_steps": check_more_steps(hits, config),
        "black_box": check_black_box(hits, white, black, config),
        "monotone_in_eps": monotone,
    }


class GradientMaskingWarning(UserWarning):
    """A gradient-masking check failed: the robust accuracy is likely overestimated."""


def warn_failed_checks(checks: dict[str, dict], accelerator: Accelerator | None = None) -> None:
    """Warn loudly (a `GradientMaskingWarning` and a line starting with WARNING) for each failed check."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    for name, check in checks.items():
        if not check["passed"]:
            message = (f"gradient-masking check '{name}' FAILED: {check['detail']}. The robust accuracy is likely "
                       "overestimated; do not report it as is.")
            print(f"WARNING: {message}", flush=True)
            warnings.warn(message, GradientMaskingWarning, stacklevel=3)
