"""Clean and robust accuracy over a dataset, attacks in [0, 1] pixel space, and the epsilon sweep."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import Attack, pgd


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
    was_training = model.training
    model.eval()
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    main = accelerator is None or accelerator.is_local_main_process
    correct = {"clean": [], **{name: [] for name in attacks}}
    for x, y in tqdm(loader, desc=desc, disable=not main, leave=False):
        with torch.inference_mode():
            hits = {"clean": model(x).argmax(dim=1) == y}
        for name, attack in attacks.items():
            x_adv = attack(model, x, y)
            with torch.inference_mode():
                hits[name] = model(x_adv).argmax(dim=1) == y
        for name, hit in hits.items():
            correct[name].append(accelerator.gather_for_metrics(hit) if accelerator else hit)
    model.train(was_training)
    totals = {name: torch.cat(hits).float() for name, hits in correct.items()}
    return {
        "clean_accuracy": totals["clean"].mean().item(),
        "robust_accuracy": {name: totals[name].mean().item() for name in attacks},
        "num_examples": int(totals["clean"].numel()),
    }


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
    steps: int = 20,
    restarts: int = 1,
    accelerator: Accelerator | None = None,
) -> dict:
    """The numbers a card carries: clean and PGD accuracy at `eps`, and accuracy versus epsilon (PGD-10)."""
    attack = pgd(eps, norm, steps, restarts)
    report = evaluate(model, test_loader, {attack.name: attack}, accelerator, desc=f"{attack.name} eps={eps:g}")
    report.update({"eps": eps, "norm": norm, "attack_steps": steps, "attack_restarts": restarts})
    if sweep_loader is not None:
        report["sweep"] = eps_sweep(model, sweep_loader, default_sweep(eps), norm, 10, accelerator)
        report["sweep_examples"] = len(sweep_loader.dataset)
    return report
