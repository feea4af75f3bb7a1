"""Clean and robust accuracy over a dataset, attack suites, gradient-masking checks and the epsilon sweep.

Attacks work in [0, 1] pixel space. Suites: `pgd` (our PGD-20) and `standard` (AutoAttack's standard version:
APGD-CE, APGD-T and the black-box Square attack, from `torchattacks`). Every attack runs on every example, so
each has its own accuracy; an example counts as robust only if every attack of the suite failed on it.
The checks follow Carlini et al., "On Evaluating Adversarial Robustness" (2019).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import NORMS, Attack, pgd
from .errors import RRMError

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""Anything called like `Attack`: (model, x, y) -> adversarial x, all in [0, 1] pixels."""

SUITES = ("pgd", "standard")
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


def attack_hits(
    model: nn.Module,
    loader: DataLoader,
    attacks: dict[str, AttackFn],
    accelerator: Accelerator | None = None,
    desc: str = "eval",
) -> dict[str, torch.Tensor]:
    """Per example, in loader order: is `model` right on the clean input ("clean") and under each attack?

    Bool tensors over the whole dataset: under several processes each process attacks its shard and the
    results are gathered so that each example is counted exactly once.
    """
    was_training = model.training
    model.eval()
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    main = accelerator is None or accelerator.is_local_main_process
    names = ["clean", *attacks]
    rows = []
    bar = tqdm(total=len(loader) * len(attacks), desc=desc, disable=not main or not attacks, leave=False)
    for x, y in loader:
        with torch.inference_mode():
            hits = [model(x).argmax(dim=1) == y]
        for name, attack in attacks.items():
            bar.set_postfix_str(name)
            x_adv = attack(model, x, y)
            with torch.inference_mode():
                hits.append(model(x_adv).argmax(dim=1) == y)
            bar.update()
        batch = torch.stack(hits, dim=1).to(torch.uint8)
        rows.append(accelerator.gather_for_metrics(batch) if accelerator else batch)
    bar.close()
    model.train(was_training)
    table = torch.cat(rows).bool().cpu()
    return {name: table[:, i] for i, name in enumerate(names)}


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    attacks: dict[str, Attack] | None = None,
    accelerator: Accelerator | None = None,
    desc: str = "eval",
) -> dict:
    """`clean_accuracy` and `robust_accuracy` (attack name -> accuracy) of `model` over `loader`.

    Under several processes each process attacks its shard and each example is counted exactly once.
    """
    attacks = attacks or {}
    hits = attack_hits(model, loader, attacks, accelerator, desc)
    return {
        "clean_accuracy": _accuracy(hits["clean"]),
        "robust_accuracy": {name: _accuracy(hits[name]) for name in attacks},
        "num_examples": int(hits["clean"].numel()),
    }


def _accuracy(hits: torch.Tensor) -> float:
    return hits.float().mean().item()


def worst_case(hits: dict[str, torch.Tensor], names: Iterable[str]) -> torch.Tensor:
    """Per example: right on the clean input and under every attack in `names`."""
    robust = hits["clean"].clone()
    for name in names:
        robust &= hits[name]
    return robust


@dataclass(frozen=True)
class MaskingChecks:
    """Gradient-masking sanity checks (Carlini et al. 2019) and their thresholds; accuracies are fractions.

    large_eps: PGD-20 at a budget that reaches any image (L-inf 1.0; L2 sqrt(pixels)) must get accuracy down
        to at most `large_eps_accuracy`.
    more_steps: PGD-`many_steps` must not be more than `steps_tolerance` less successful than PGD-`few_steps`.
    black_box: Square must not fool more than `black_box_tolerance` of all examples that every white-box
        attack failed on (with `probe_queries` queries when the suite has no black-box attack of its own).
    monotone_in_eps: accuracy must not rise with epsilon by more than `monotone_tolerance` along the sweep
        (the suite's worst case when it has two or more epsilons, else PGD-`few_steps` at eps/2, eps, 2 eps).
    """

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
            probes["check:square"] = TorchAttack("square", eps, norm, self.probe_queries)
        if not sweep:
            probes["check:half-eps"] = pgd(eps / 2, norm, self.few_steps)
            probes["check:double-eps"] = pgd(2 * eps, norm, self.few_steps)
        return probes


def check_large_eps(hits: dict[str, torch.Tensor], config: MaskingChecks, eps: float, norm: str) -> dict:
    accuracy = _accuracy(hits["check:large-eps"])
    return {"passed": accuracy <= config.large_eps_accuracy,
            "detail": f"PGD-20 at {norm} eps {eps:g} (any image reachable): {accuracy:.1%} accuracy, expected "
                      f"<= {config.large_eps_accuracy:.0%}; more means the attack cannot follow the gradients"}


def check_more_steps(hits: dict[str, torch.Tensor], config: MaskingChecks) -> dict:
    few, many = _accuracy(hits["check:few-steps"]), _accuracy(hits["check:many-steps"])
    return {"passed": many <= few + config.steps_tolerance,
            "detail": f"PGD-{config.few_steps}: {few:.1%}, PGD-{config.many_steps}: {many:.1%} accuracy; more steps "
                      f"must not help the model (tolerance {config.steps_tolerance:.0%})"}


def check_black_box(hits: dict[str, torch.Tensor], white: Sequence[str], black: Sequence[str],
                    config: MaskingChecks) -> dict:
    white_failed = worst_case(hits, white)
    black_fooled = ~worst_case(hits, black)
    rate = _accuracy(white_failed & black_fooled)
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


def evaluate_suite(
    model: nn.Module,
    loader: DataLoader,
    eps: float,
    norm: str = "linf",
    suite: str = "pgd",
    *,
    sweep: Iterable[float] = (),
    steps: int | None = None,
    queries: int = 5000,
    checks: MaskingChecks | None = MaskingChecks(),
    accelerator: Accelerator | None = None,
) -> dict:
    """`suite` at `eps` (and at each `sweep` epsilon), worst case per example, and the gradient-masking checks.

    Returns clean_accuracy, robust_accuracy (each attack's accuracy at `eps` and "worst_case"), sweep (worst-case
    accuracy by epsilon, with eps 0 = clean), checks ({name: {"passed", "detail"}}), num_examples, eps, norm,
    suite. A failed check also raises a loud `GradientMaskingWarning` on the main process.
    """
    if eps <= 0:
        raise RRMError(f"eps must be > 0 for a robustness evaluation, got {eps}")
    epsilons = sorted({float(eps), *(float(e) for e in sweep if e > 0)})
    suites = {e: attack_suite(suite, e, norm, steps, queries) for e in epsilons}
    attacks = {f"{name}@{e:g}": attack for e, members in suites.items() for name, attack in members.items()}
    at_eps = {name: f"{name}@{eps:g}" for name in suites[eps]}
    black = [at_eps[name] for name, attack in suites[eps].items() if getattr(attack, "black_box", False)]
    probes = {}
    if checks is not None:
        pixels = loader.dataset[0][0].numel()
        probes = checks.probes(eps, norm, pixels, black_box=bool(black), sweep=len(epsilons) > 1)
    hits = attack_hits(model, loader, {**attacks, **probes}, accelerator, desc=f"{suite} {norm} eps={eps:g}")
    curve = [{"eps": 0.0, "accuracy": _accuracy(hits["clean"])}]
    curve += [{"eps": e, "accuracy": _accuracy(worst_case(hits, [f"{n}@{e:g}" for n in suites[e]]))} for e in epsilons]
    result = {
        "clean_accuracy": _accuracy(hits["clean"]),
        "robust_accuracy": {**{name: _accuracy(hits[key]) for name, key in at_eps.items()},
                            WORST_CASE: _accuracy(worst_case(hits, at_eps.values()))},
        "sweep": curve, "num_examples": int(hits["clean"].numel()), "eps": float(eps), "norm": norm, "suite": suite,
        "checks": {},
    }
    if checks is not None:
        white = [key for key in at_eps.values() if key not in black]
        result["checks"] = run_checks(hits, white, black, curve, checks, eps, norm, pixels)
        warn_failed_checks(result["checks"], accelerator)
    return result


def run_checks(hits: dict[str, torch.Tensor], white: Sequence[str], black: Sequence[str], curve: list[dict],
               config: MaskingChecks, eps: float, norm: str, pixels: int) -> dict[str, dict]:
    """The four checks, from the per-example results of the suite's white- and black-box attacks at `eps`, of
    the probes (`MaskingChecks.probes`) and from the suite's worst-case `curve` by epsilon."""
    white = [*white, "check:few-steps", "check:many-steps"]
    black = list(black) or ["check:square"]
    if len(curve) > 2:
        monotone = check_monotone(curve, config, "worst-case accuracy of the suite")
    else:
        probe_curve = [curve[0], *({"eps": e * eps, "accuracy": _accuracy(hits[name])} for e, name in
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


def epoch_check(loader: DataLoader, attack: Attack, accelerator: Accelerator | None = None):
    """A per-epoch callback for `train`: clean and robust accuracy on a small test set."""

    def check(epoch: int, model: nn.Module) -> dict:
        result = evaluate(model, loader, {attack.name: attack}, accelerator, desc="epoch check")
        return {"clean": round(result["clean_accuracy"], 4),
                attack.name: round(result["robust_accuracy"][attack.name], 4)}

    return check


def default_sweep(eps: float) -> list[float]:
    """Epsilons for an accuracy-versus-epsilon curve around the threat model's `eps`."""
    return [round(eps * f, 6) for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)]


def eps_sweep(
    model: nn.Module,
    loader: DataLoader,
    eps_values: Iterable[float],
    norm: str = "linf",
    steps: int = 10,
    accelerator: Accelerator | None = None,
) -> list[dict]:
    """Robust accuracy under PGD-`steps` at each epsilon: a list of {"eps", "accuracy"}."""
    eps_values = sorted(set(eps_values))
    attacks = {f"{eps:g}": pgd(eps, norm, steps) for eps in eps_values if eps > 0}
    result = evaluate(model, loader, attacks, accelerator, desc="eps sweep")
    curve = [{"eps": 0.0, "accuracy": result["clean_accuracy"]}] if 0 in eps_values else []
    curve += [{"eps": float(name), "accuracy": acc} for name, acc in result["robust_accuracy"].items()]
    return curve


def robustness_report(
    model: nn.Module,
    test_loader: DataLoader,
    sweep_loader: DataLoader | None,
    *,
    eps: float,
    norm: str = "linf",
    suite: str = "pgd",
    steps: int | None = None,
    checks: bool = True,
    accelerator: Accelerator | None = None,
) -> dict:
    """The numbers a card carries: `suite` at `eps` with the worst case per example, the gradient-masking
    checks, and accuracy versus epsilon (PGD-10 on `sweep_loader`)."""
    report = evaluate_suite(model, test_loader, eps, norm, suite, steps=steps,
                            checks=MaskingChecks() if checks else None, accelerator=accelerator)
    report["attack_steps"] = steps or (20 if suite == "pgd" else 100)
    if sweep_loader is not None:
        report["sweep"] = eps_sweep(model, sweep_loader, default_sweep(eps), norm, 10, accelerator)
        report["sweep_examples"] = len(sweep_loader.dataset)
    return report
