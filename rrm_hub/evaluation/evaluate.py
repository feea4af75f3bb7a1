"""Clean and robust accuracy over a dataset: attack suites, worst case per example, gradient-masking checks,
and the accuracy-versus-epsilon sweep. Attacks work in [0, 1] pixel space (see `suites.py`, `checks.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..attacks import Attack, pgd
from ..errors import RRMError
from ..progress import progress
from .checks import MaskingChecks, run_checks, warn_failed_checks
from .suites import (
    AUTOATTACK_VERSIONS,
    WORST_CASE,
    AttackFn,
    accuracy,
    attack_suite,
    autoattack_version,
    worst_case,
)

DEFAULT_CHECKS = MaskingChecks()


def attack_hits(
    model: nn.Module,
    loader: DataLoader,
    attacks: dict[str, AttackFn],
    accelerator: Accelerator | None = None,
    desc: str = "eval",
) -> dict[str, torch.Tensor]:
    """Per example, in loader order: is `model` right on the clean input ("clean") and under each attack? An attack
    that returns one adversarial batch per stage ({stage: x_adv}, an AutoAttack run) gives "<name>/<stage>" entries.

    Bool tensors over the whole dataset: under several processes each process attacks its shard and the
    results are gathered so that each example is counted exactly once.
    """
    was_training = model.training
    model.eval()
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    main = accelerator is None or accelerator.is_local_main_process
    names, rows = None, []
    bar = progress(total=len(loader) * len(attacks), desc=desc, disable=not main or not attacks, leave=False)
    for x, y in loader:
        with torch.inference_mode():
            hits = {"clean": model(x).argmax(dim=1) == y}
        for name, attack in attacks.items():
            bar.set_postfix_str(name)
            x_adv = attack(model, x, y)
            views = {f"{name}/{stage}": view for stage, view in x_adv.items()} if isinstance(x_adv, dict) else \
                {name: x_adv}
            with torch.inference_mode():
                hits.update({key: model(view).argmax(dim=1) == y for key, view in views.items()})
            bar.update()
        names = names or list(hits)
        batch = torch.stack([hits[key] for key in names], dim=1).to(torch.uint8)
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
        "clean_accuracy": accuracy(hits["clean"]),
        "robust_accuracy": {name: accuracy(hits[name]) for name in attacks},
        "num_examples": int(hits["clean"].numel()),
    }


def evaluate_suite(
    model: nn.Module,
    loader: DataLoader,
    eps: float,
    norm: str = "linf",
    suite: str = "pgd",
    *,
    sweep: Iterable[float] = (),
    steps: int | None = None,
    restarts: int = 1,
    checks: MaskingChecks | None = DEFAULT_CHECKS,
    accelerator: Accelerator | None = None,
    seed: int = 0,
    measured_curve: list[dict] | None = None,
) -> dict:
    """`suite` at `eps` (and at each `sweep` epsilon), worst case per example, and the gradient-masking checks.

    Returns clean_accuracy, robust_accuracy (each attack's accuracy at `eps`, for AutoAttack's versions the accuracy
    after it, and "worst_case"), sweep (worst-case accuracy by epsilon, with eps 0 = clean), checks ({name:
    {"passed", "detail"}}), num_examples, eps, norm, suite; for AutoAttack's versions also attack_package and
    autoattack_checks (the warnings of AutoAttack's own checks, none when it found nothing). A failed check also
    raises a loud `GradientMaskingWarning` on the main process. The checks' probes run on the first
    `checks.examples` images (`checks_examples`); `measured_curve`, an accuracy-versus-epsilon curve measured
    elsewhere (the report's sweep), stands for the monotonicity probes.
    """
    if eps <= 0:
        raise RRMError(f"eps must be > 0 for a robustness evaluation, got {eps}")
    epsilons = sorted({float(eps), *(float(e) for e in sweep if e > 0)})
    suites = {e: attack_suite(suite, e, norm, steps, seed, restarts) for e in epsilons}
    attacks = {f"{name}@{e:g}": attack for e, members in suites.items() for name, attack in members.items()}
    autoattack = suite in AUTOATTACK_VERSIONS
    hits = attack_hits(model, loader, attacks, accelerator, desc=f"{suite} {norm} eps={eps:g}")

    def members(e: float) -> dict[str, str]:  # attack name -> its key in `hits`, at epsilon e
        prefixes = [f"{name}@{e:g}" for name in suites[e]]
        return {key.partition("/")[2] or key.partition("@")[0]: key for key in hits
                if key.partition("/")[0] in prefixes}

    at_eps = members(eps)
    curve = [{"eps": 0.0, "accuracy": accuracy(hits["clean"])}]
    curve += [{"eps": e, "accuracy": accuracy(worst_case(hits, members(e).values()))} for e in epsilons]
    result = {
        "clean_accuracy": accuracy(hits["clean"]),
        "robust_accuracy": {**{name: accuracy(hits[key]) for name, key in at_eps.items()},
                            WORST_CASE: accuracy(worst_case(hits, at_eps.values()))},
        "sweep": curve, "num_examples": int(hits["clean"].numel()), "eps": float(eps), "norm": norm, "suite": suite,
        "attack_steps": steps or 20 if suite == "pgd" else None, "checks": {},  # AutoAttack: its version's own
    }
    if autoattack:
        found = sorted({w for run in attacks.values() for w in run.warnings})
        names = list(at_eps)
        if "square" in names and names.index("square") > 0:  # AutoAttack's check_square_sr, on the whole set
            before = accuracy(hits[at_eps[names[names.index("square") - 1]]])
            if result["robust_accuracy"]["square"] < before - 0.002:
                found.append(f"Square Attack has decreased the robust accuracy of {before - result['robust_accuracy']['square']:.2%}. This might indicate that the robustness evaluation using AutoAttack is unreliable.")  # noqa: E501
        result["attack_package"], result["autoattack_checks"] = autoattack_version(), found
        for warning in found if accelerator is None or accelerator.is_main_process else []:
            print(f"WARNING: AutoAttack's check: {warning}", flush=True)
    if checks is not None:
        result["checks"], result["checks_examples"] = masking_checks(
            model, loader, hits, at_eps, curve if len(curve) > 2 else measured_curve, checks, eps, norm, autoattack
            and suite != "rand", accelerator)
        warn_failed_checks(result["checks"], accelerator)
    return result


def masking_checks(model: nn.Module, loader: DataLoader, hits: dict, at_eps: dict[str, str], curve: list | None,
                   checks: MaskingChecks, eps: float, norm: str, black_box: bool,
                   accelerator: Accelerator | None) -> tuple[dict, int]:
    """The gradient-masking checks: their probes on the first `checks.examples` images, judged with the suite's own
    results on the same images (and `curve`, when the accuracy by epsilon was measured, for monotonicity)."""
    pixels = loader.dataset[0][0].numel()
    probes = checks.probes(eps, norm, pixels, black_box=black_box, sweep=curve is not None)
    count = min(checks.examples or len(loader.dataset), len(loader.dataset))
    subset = loader if count == len(loader.dataset) else DataLoader(
        Subset(loader.dataset, range(count)), batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    probed = attack_hits(model, subset, probes, accelerator, desc="masking checks")
    count = len(probed["clean"])
    judged = {**{key: value[:count] for key, value in hits.items()}, **probed}
    black = [at_eps["square"]] if "square" in at_eps else []
    # the white-box attacks that ran before Square (all of them in the standard version; the accuracy after an
    # attack holds every earlier one)
    names = list(at_eps)
    white = [at_eps[n] for n in names[:names.index("square")]] if black else list(at_eps.values())
    return run_checks(judged, white, black, curve or [{"eps": 0.0, "accuracy": accuracy(judged["clean"])}], checks,
                      eps, norm, pixels), count


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
    sweep_eps: Iterable[float] | None = None,
    sweep_steps: int = 10,
) -> dict:
    """The numbers a card carries: `suite` at `eps` with the worst case per example, the gradient-masking
    checks, and accuracy versus epsilon (PGD-`sweep_steps` on `sweep_loader`, at `sweep_eps` or around `eps`)."""
    sweep = None
    if sweep_loader is not None:  # first: its curve is also what the monotonicity check reads
        epsilons = default_sweep(eps) if sweep_eps is None else [0.0, *sweep_eps]
        sweep = eps_sweep(model, sweep_loader, epsilons, norm, sweep_steps, accelerator)
    report = evaluate_suite(model, test_loader, eps, norm, suite, steps=steps,
                            checks=MaskingChecks() if checks else None, accelerator=accelerator, measured_curve=sweep)
    if sweep is not None:
        report["sweep"] = sweep
        report["sweep_examples"], report["sweep_steps"] = len(sweep_loader.dataset), sweep_steps
    return report


def transfer_check(student: nn.Module, teacher: nn.Module, loader: DataLoader, eps: float, norm: str = "linf",
                   accelerator: Accelerator | None = None, moving: float = 0.25) -> dict:
    """Is robustness moving into the student? PGD-10 accuracy of student and teacher at eps/2 and eps.

    `moving`: the student's robust accuracy at eps/2, as a fraction of the teacher's, above which the pair
    is judged to transfer.
    """
    attacks = {f"{e:g}": pgd(e, norm, 10) for e in (eps / 2, eps)}
    ours = evaluate(student, loader, attacks, accelerator, desc="preflight student")
    theirs = evaluate(teacher, loader, attacks, accelerator, desc="preflight teacher")
    rows = [{"eps": float(name), "student": ours["robust_accuracy"][name], "teacher": theirs["robust_accuracy"][name],
             "ratio": ours["robust_accuracy"][name] / max(theirs["robust_accuracy"][name], 1e-9)} for name in attacks]
    return {"rows": rows, "student_clean": ours["clean_accuracy"], "teacher_clean": theirs["clean_accuracy"],
            "moving": rows[0]["ratio"] >= moving, "threshold": moving, "num_examples": ours["num_examples"]}
