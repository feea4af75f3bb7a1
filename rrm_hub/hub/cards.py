"""Model cards from the templates in `model_cards/`, accuracy-versus-epsilon plots, JSON results."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

PACKAGE = Path(__file__).resolve().parent.parent
TEMPLATES = PACKAGE.parent / "model_cards"
PLOT_FILE = "robustness.png"


def template_path(kind: str) -> Path:
    """The card template `kind` ("student" or "teacher"), shipped with the package or beside it."""
    for folder in (PACKAGE / "model_cards", TEMPLATES):  # installed with the package, or beside it
        if (folder / f"{kind}.md").exists():
            return folder / f"{kind}.md"
    raise FileNotFoundError(f"card template '{kind}.md' not found in {TEMPLATES}")


def hardware() -> str:
    """A short description of the machine, e.g. '1x NVIDIA H100' or '2-core CPU (x86_64)'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch threads"


def is_hub_id(spec: str | None) -> bool:
    return bool(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec.removeprefix("hf-hub:")) is not None and \
        not Path(spec).exists()


def suite_label(metrics: dict) -> str:
    """How a card names the attacks that measured `metrics`: 'PGD-20', or 'AutoAttack standard (pyautoattack 0.2.0)'."""
    if metrics.get("suite", "pgd") == "pgd":
        return f"PGD-{metrics.get('attack_steps') or 20}"
    return f"AutoAttack {metrics['suite']} ({metrics.get('attack_package', 'pyautoattack')})"


def eval_results(metrics: dict, dataset: str) -> list[EvalResult]:
    """`model-index` entries: clean accuracy and each robust accuracy (the worst case named by its suite), with the
    threat model spelled out, as measured and rounded to 4 digits."""
    common = {"task_type": "image-classification", "dataset_type": dataset, "dataset_name": dataset,
              "metric_type": "accuracy", "dataset_split": f"test ({metrics.get('num_examples')} images)"}
    threat = f"{metrics['norm']}, eps={metrics['eps']:g}"
    results = [EvalResult(**common, metric_name="clean accuracy", metric_value=round(metrics["clean_accuracy"], 4))]
    for attack, value in metrics["robust_accuracy"].items():
        name = (f"robust accuracy, {suite_label(metrics)} ({threat})" if attack == "worst_case"
                else f"{attack} accuracy ({threat})")
        results.append(EvalResult(**common, metric_name=name, metric_value=round(value, 4),
                                  metric_config=f"{metrics['norm']}-eps{metrics['eps']:g}"))
    return results


def render_card(kind: str, metrics: dict, context: dict) -> ModelCard:
    """A `ModelCard` from template `kind`, metadata and model-index from `metrics`, body from `context`."""
    dataset = context.get("dataset", "")
    card_data = ModelCardData(
        library_name="timm",
        license=context.get("license", "apache-2.0"),
        tags=["image-classification", "timm", "adversarial-robustness", "rrm-hub"] + context.get("tags", []),
        pipeline_tag="image-classification",
        datasets=[context["dataset_id"]] if context.get("dataset_id") else ([dataset] if is_hub_id(dataset) else None),
        base_model=context.get("teacher") if is_hub_id(context.get("teacher")) else None,
        model_name=context.get("model_name", "model"),
        eval_results=eval_results(metrics, context.get("dataset_id") or dataset or "local"),  # the Hub's name
    )
    return ModelCard.from_template(card_data, template_path=str(template_path(kind)), metrics=metrics, **context)


def plot_curves(curves: dict[str, list[dict]], path: str | Path, *, x: str, y: str, xlabel: str, ylabel: str,
                target: float | None = None) -> None:
    """One line per label through the points' `x` and `y` values (accuracies drawn in %), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, curve in curves.items():
        ax.plot([p[x] for p in curve], [100 * p[y] for p in curve], marker="o", markersize=3, label=label)
    if target is not None:
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweeps(curves: dict[str, list[dict]], path: str | Path, norm: str,
                ylabel: str = "accuracy under PGD-10 (%)") -> None:
    """Accuracy versus epsilon, one line per model."""
    plot_curves(curves, path, x="eps", y="accuracy", ylabel=ylabel,
                xlabel=f"epsilon ({'L-inf' if norm == 'linf' else 'L2'}, [0, 1] pixels)")


def save_json(data: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
