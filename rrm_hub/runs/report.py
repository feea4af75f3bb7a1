"""The builders of a run's end: the evaluation scaled to the run (student and teacher alike, the teacher's measured
once), what every run records (metrics.json), its card, and the Hub-ready folder."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader

from ..config import cli
from ..config.sections import SMOKE_RUN_IMAGES, EvalConfig, TrainConfig
from ..data.images import ImageData
from ..data.loaders import make_loader
from ..errors import RRMError
from ..evaluation import cache as evaluation_cache
from ..evaluation.evaluate import robustness_report
from ..hub.cards import hardware, plot_sweeps, save_json
from ..hub.push import push_folder
from .builders import Runtime
from .fit import images_trained


def test_loader(images: ImageData, batch_size: int, limit: int | None) -> DataLoader:
    return make_loader(images, "test", batch_size, limit=limit)


def evaluation_loaders(images: ImageData, evaluation: EvalConfig,
                       batch_size: int) -> tuple[DataLoader, DataLoader | None]:
    """The test loaders of the final numbers and of the epsilon sweep (None: no sweep) for scaled settings
    (`evaluation_for_run`)."""
    sweep = test_loader(images, batch_size, evaluation.sweep_examples) if evaluation.sweeps else None
    return test_loader(images, batch_size, evaluation.eval_examples), sweep


def evaluation_for_run(evaluation: EvalConfig, images: ImageData, training: TrainConfig,
                       accelerator: Accelerator) -> EvalConfig:
    """The evaluation settings scaled to the run (`EvalConfig.for_run`); a line says what a smoke run leaves out."""
    trained = images_trained(images, training, accelerator.num_processes)
    scaled = evaluation.for_run(trained)
    skipped = [what for what, off in (("per-epoch check", scaled.epoch_eval_examples == 0),
                                      ("epsilon sweep", not scaled.sweeps),
                                      ("gradient-masking checks", scaled.no_checks)) if off]
    if trained < SMOKE_RUN_IMAGES and skipped:
        accelerator.print(f"smoke run ({trained} images trained): final numbers on {scaled.eval_examples} test "
                          f"images, no {', '.join(skipped)}")
    return scaled


def report_options(evaluation: EvalConfig, accelerator: Accelerator) -> dict:
    """Keyword arguments of `rrm_hub.evaluate.robustness_report` from the evaluation settings."""
    return {"eps": evaluation.eps, "norm": evaluation.norm, "suite": evaluation.suite, "steps": evaluation.eval_steps,
            "checks": not evaluation.no_checks, "accelerator": accelerator, "sweep_eps": evaluation.eps_sweep,
            "sweep_steps": evaluation.sweep_steps}

@dataclass
class Evaluation:
    """How a run evaluates its models, scaled to the run: the test images, the sweep's, and the report's settings."""

    test: DataLoader
    sweep: DataLoader | None
    options: dict


def evaluation_plan(config, images: ImageData, runtime: Runtime) -> Evaluation:
    """The evaluation a run's final numbers come from, at a cost scaled to the run (a line says what a smoke run
    leaves out)."""
    evaluation = evaluation_for_run(config.eval, images, config.training, runtime.accelerator)
    test, sweep = evaluation_loaders(images, evaluation, config.training.batch_size)
    return Evaluation(test, sweep, report_options(evaluation, runtime.accelerator))


def evaluate_model(model: nn.Module, plan: Evaluation) -> dict:
    """A model's robustness report: the suite at --eps, the gradient-masking checks, accuracy versus epsilon."""
    return robustness_report(model, plan.test, plan.sweep, **plan.options)


def evaluate_teacher(teacher: nn.Module, plan: Evaluation, seed: int, runtime: Runtime) -> dict:
    """The teacher's report, evaluated as the student's: reused where the same weights were measured on the same
    images with the same settings before (`rrm_hub.evaluation.cache`; `cached` says where from), else measured and
    kept."""
    settings = {**{k: v for k, v in plan.options.items() if k != "accelerator"}, "seed": seed}
    report = evaluation_cache.cached_report(teacher, plan.test, plan.sweep, settings,
                                            lambda: evaluate_model(teacher, plan), hardware(),
                                            save=runtime.accelerator.is_main_process)
    if report["cached"]:
        runtime.print(f"teacher's evaluation reused from {report['cached']['from']} (the same weights, images and "
                      f"attacks; measured on {report['cached']['measured_on']})")
    return report


def run_facts(run: dict, selected, images: ImageData, config, accelerator: Accelerator) -> dict:
    """Training time, steps, the epoch kept, hardware and throughput: the same keys for every recipe."""
    training = config.training
    images_seen = run["steps"] * training.batch_size * training.grad_accum * accelerator.num_processes
    return {"dataset": images.name, "train_seconds": round(run["train_seconds"], 1), "epochs": run["epochs"],
            "steps": run["steps"], "schedule_replanned": run.get("schedule_replanned") or None,
            "selected_epoch": selected, "hardware": hardware(),
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "images_per_second": round(images_seen / max(run["train_seconds"], 1e-9), 1)}


def skipped_images(images: ImageData, accelerator: Accelerator) -> dict:
    """metrics.json's record of the unreadable images the run skipped (and one line each split, printed)."""
    for log in images.unreadable.values():
        if line := log.line():
            accelerator.print(line)
    return {"skipped_images": images.skipped() or None}


def card_context(config, images: ImageData, script: str) -> dict:
    """What every card shows about the run: names, settings and the command that reproduces it."""
    name = config.hub.model_id.split("/")[-1] if config.hub.model_id else Path(config.training.output_dir).name
    return {"model_name": name, "repo_id": config.hub.model_id or f"<user>/{name}", "dataset": images.name,
            "dataset_id": images.hub_id, "train_split": config.data.train_split, "train_images": images.train_size,
            "repo_url": f"https://huggingface.co/{config.hub.model_id}" if config.hub.model_id else None,
            "config": config, "command": cli.command(script, config)}


@contextmanager
def writing_outputs(folder: Path, run: dict):
    """Writing a run's outputs: a full disk or an unwritable folder is one line that names the checkpoint kept."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        full = " (the disk is full)" if getattr(err, "errno", None) == errno.ENOSPC else ""
        kept = run.get("checkpoint")
        then = (f"; the checkpoint {kept} is kept: make room and run the same command with --resume to evaluate and "
                "save again" if kept else "; make room and run again")
        raise RRMError(f"could not write the outputs to '{folder}'{full}: {getattr(err, 'strerror', None) or err}"
                       f"{then}") from None


def save_outputs(folder: Path, config, metrics: dict, curves: dict, script: str) -> None:
    """metrics.json, robustness.png (accuracy versus epsilon) and run_config.yaml, beside the model."""
    folder.mkdir(parents=True, exist_ok=True)
    save_json(metrics, folder / "metrics.json")
    plot_sweeps(curves, folder / "robustness.png", config.eval.norm)
    cli.save(config, folder, script)


def share(config, folder: Path, accelerator: Accelerator) -> None:
    """Upload the output folder as it is, when --push-to-hub asks."""
    if config.hub.push and accelerator.is_main_process:
        url = push_folder(folder, config.hub.model_id, private=config.hub.private, revision=config.hub.revision)
        accelerator.print(f"pushed: {url}")
