"""Adversarial training of any timm model (PGD-AT, fast-AT, N-FGSM or ATTA), as recipes/adversarial_train.py runs it:
a robust teacher, or a teacherless control; the same builders as a distillation run."""

from __future__ import annotations

import numpy as np

from .. import methods
from ..config.runs import AdversarialTrainConfig
from ..data import provenance
from ..data.images import ImageData
from ..hub.cards import render_card
from ..models.names import resolve_model_name
from ..models.pixel import create_pixel_model, save_timm_folder
from ..settings import parse_kwargs
from ..training.loop import train
from . import builders, fit, report
from .distill import RunResult


def adversarial_train(config: AdversarialTrainConfig, script: str = "adversarial_train.py") -> RunResult:
    """Adversarial training of a timm model; saves a timm-format Hub folder (config.json + model.safetensors, card,
    metrics, plot, run_config.yaml, and with --disjoint-from the training images' pixel hashes)."""
    config, runtime = builders.start(config, f"robust-{config.model.name}", script)
    # data and model: the model takes [0, 1] pixels, normalization inside
    model_args = parse_kwargs(config.model.kwargs)
    name = resolve_model_name(config.model.name, "--model", runtime.print)
    images = builders.images_for(config, runtime, (name, model_args))
    model = create_pixel_model(name, images.num_classes, (images.channels, *images.image_size), model_args,
                               images.class_names)
    hashes = disjoint_training_images(images, config.disjoint_from, runtime.print) if config.disjoint_from else None

    # the objective: cross-entropy on adversarial examples from the one attack implementation
    memory = builders.perturbation_memory(config.method, images, log=runtime.print)
    objective = methods.build(config.method, methods.Parts(eps=config.eval.eps, norm=config.eval.norm,
                                                           attack_steps=config.attack_steps,
                                                           eps_warmup=config.eps_warmup, memory=memory))

    # train, then evaluate
    check = fit.epoch_check(images, config.eval, config.training, runtime.accelerator)
    loader = fit.train_loader(images, config.data, config.training, objective=objective)
    run = train(model, objective, loader, runtime.accelerator, config.training, check)
    model, selected = fit.finish_training(model, run, check, config.eval, runtime.accelerator)
    result = report.evaluate_model(model, report.evaluation_plan(config, images, runtime))

    metrics = {**result, "method": config.method, "model": config.model.name, "model_args": model_args,
               **report.run_facts(run, selected, images, config, runtime.accelerator), "history": run["history"],
               **report.skipped_images(images, runtime.accelerator)}
    if runtime.accelerator.is_main_process:
        save_model(model, metrics, config, images, hashes, run, runtime)
    robust = ", ".join(f"{k} {v:.1%}" for k, v in result["robust_accuracy"].items())
    runtime.print(f"{config.model.name} ({config.method}): clean {result['clean_accuracy']:.1%}, {robust} at "
                  f"{config.eval.norm} eps {config.eval.eps:g}; trained {run['train_seconds']:.0f}s -> "
                  f"{runtime.output_dir}")
    report.share(config, runtime.output_dir, runtime.accelerator)
    return RunResult(metrics, runtime.output_dir, model, runtime.accelerator.is_main_process)


def save_model(model, metrics: dict, config: AdversarialTrainConfig, images: ImageData, hashes, run: dict,
               runtime: builders.Runtime) -> None:
    """The timm-format Hub folder, its card, metrics.json, the plot, run_config.yaml and the pixel hashes."""
    folder = runtime.output_dir
    with report.writing_outputs(folder, run):
        folder.mkdir(parents=True, exist_ok=True)
        save_timm_folder(model.model, str(folder), parse_kwargs(config.model.kwargs), images.class_names)
        if hashes is not None:
            provenance.save_hashes(hashes, folder, {"dataset": images.name, "split": config.data.train_split,
                                                    "disjoint_from": config.disjoint_from})
        render_card("teacher", metrics, report.card_context(config, images, runtime.script)).save(folder / "README.md")
        report.save_outputs(folder, config, metrics, {config.model.name: metrics["sweep"]}, runtime.script)


def disjoint_training_images(images: ImageData, other: str, log=print) -> np.ndarray:
    """The pixel hashes of every training image (held-out ones included), checked to be in no split of `other`."""
    parts = [images.train] + ([images.holdout] if images.holdout is not None else [])
    hashes = np.concatenate([provenance.hashes(rows, images.image_column) for rows in parts])
    others = provenance.dataset_hashes(other)
    provenance.check_disjoint(hashes, others, other)
    log(f"none of the {len(hashes)} training images is in {other} "
        f"({', '.join(f'{k}: {len(v)}' for k, v in others.items())} images, by pixel hash)")
    return hashes
