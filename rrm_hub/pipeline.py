"""The methods top to bottom: `distill` (RRM: data -> teacher -> taps -> student -> train -> evaluate -> save) and
`adversarial_train`; `preflight` and `list_layers` look at a teacher/student pair before a long run."""

from __future__ import annotations

import dataclasses
import errno
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from torch import nn

from . import cli, components, evaluation_cache, provenance
from .align import Match, MatchedPair, teacher_pairs
from .cards import hardware, plot_sweeps, render_card, save_json
from .config import AdversarialTrainConfig, DistillConfig, check_l2_budgets, parse_kwargs
from .data import ImageData
from .errors import RRMError
from .evaluate import robustness_report, transfer_check
from .features import default_layer, feature_width
from .features import list_layers as layer_shapes
from .hub import check_can_push, push_folder
from .methods import make_objective
from .models import model_input
from .names import resolve_model_name
from .objectives import RRM
from .student import RRMStudent
from .train import train


@dataclass
class RunResult:
    """What a run measured (`metrics`: metrics.json of a training run, preflight.json of a preflight) and the model."""

    metrics: dict
    output_dir: Path
    model: nn.Module | None = None
    is_main_process: bool = True


@dataclass
class Setup:
    """A distillation run up to its objective: where it runs, the data, the teacher and the student built for it."""

    config: DistillConfig
    accelerator: Accelerator
    output_dir: Path
    images: ImageData
    teacher: nn.Module
    labels_match: bool
    teacher_layer: str
    feature_dim: int
    pairs: list[MatchedPair]
    student: RRMStudent

    @property
    def sample(self) -> torch.Tensor:
        return torch.zeros(2, self.images.channels, *self.images.image_size)


def with_output_dir(config, default: str):
    """`config` with its output folder resolved (`--output-dir`, or `default`)."""
    training = dataclasses.replace(config.training, output_dir=config.training.output_dir or default)
    return dataclasses.replace(config, training=training)


def setup(config: DistillConfig) -> Setup:
    """Data, teacher (its layers probed) and a student of the teacher's width, as `config` (checked here) says."""
    config = with_output_dir(config.validate(), "rrm-student")
    accelerator = components.make_accelerator(config.training)
    output_dir = components.output_folder(config.training.output_dir)
    if config.hub.push and not config.preflight and not config.list_layers:
        check_can_push(config.hub.model_id)  # before the work, not after it

    # data: [0, 1] pixels at the student's own size for natural images; normalization lives inside each model
    name, student_args = config.student.spec()
    name = resolve_model_name(name, "--student", accelerator.print)
    images = components.load_data(config.data, config.training.seed, config.eval.holdout,
                                  model_input(name, student_args))
    check_l2_budgets(config, images.channels, images.image_size)
    if config.rrm.cache_teacher and (images.augment == "timm" or images.streaming):
        raise RRMError("--cache-teacher needs the training images on disk and unaugmented, not streamed or "
                       "randomly cropped: drop --streaming, add --augment none, or drop --cache-teacher")
    sample = torch.zeros(2, images.channels, *images.image_size, device=accelerator.device)

    # teacher: any robust model, frozen; its representation is tapped with forward hooks
    teacher = config.teacher.load(accelerator.device)
    labels_match = teacher.num_classes == images.num_classes
    if not teacher.num_classes and config.rrm.kd_weight:  # an image encoder (CLIP): a representation, no logits
        raise RRMError(f"the teacher {teacher.source} has no classes, so no logits to distill: drop --kd-weight")
    if not labels_match and teacher.num_classes and not config.layers.ignore_teacher_labels:
        raise RRMError(f"the teacher predicts {teacher.num_classes} classes but the dataset has "
                       f"{images.num_classes}; pass --ignore-teacher-labels to use its representation only")
    matches = config.layers.matches(config.student.layer)  # None: one pair, --teacher-layer / --student-layer
    pairs = []
    if matches:
        matches = [m if m.teacher_layer else Match(default_layer(teacher.network), m.student_layer, m.weight)
                   for m in matches]
        pairs = teacher_pairs(teacher, teacher.network, matches, config.layers.mode, sample)
    # the projection the classifier reads has the width of the teacher layer matched to the penultimate one
    penultimate = [m.teacher_layer for m in matches or [] if m.student_layer is None]
    teacher_layer = ((penultimate[0] if penultimate else None) or config.layers.teacher_layer
                     or default_layer(teacher.network))
    feature_dim = feature_width(teacher, teacher.network, teacher_layer, sample)
    accelerator.print(f"teacher {teacher.source}: layer '{teacher_layer}', width {feature_dim}")

    # student: timm backbone + projection to the teacher's width + classifier on the projection
    student = RRMStudent.for_teacher(
        name, feature_dim=feature_dim, num_classes=images.num_classes, model_args=student_args,
        input_size=(images.channels, *images.image_size), student_layer=None if pairs else config.student.layer,
        pairs=pairs, label_names=images.class_names, teacher=teacher.source, teacher_layer=teacher_layer,
        pretrained_backbone=config.student.pretrained, crop_pct=images.crop_pct)
    for pair in student.pairs:
        grid = f"on a {pair.grid[0]}x{pair.grid[1]} grid" if pair.grid else "as vectors"
        accelerator.print(f"match {pair.name} (weight {pair.weight:g}, teacher {tuple(pair.teacher_shape)}, {grid})")
    return Setup(config, accelerator, output_dir, images, teacher, labels_match, teacher_layer, feature_dim,
                 student.pairs, student)


def rrm_objective(prepared: Setup):
    """The run's objective (`--method`; RRM by default): the teacher's targets (live or cached), the inputs, the
    loss."""
    config = prepared.config
    memory = components.perturbation_memory(config.method, prepared.images, config.rrm,  # --match-start previous
                                            prepared.accelerator.print)
    cache = (components.teacher_cache(prepared.teacher, prepared.teacher_layer, prepared.images,
                                      config.training.batch_size, config.teacher.revision, config.data.num_workers,
                                      prepared.accelerator) if config.rrm.cache_teacher else None)
    return make_objective(config.method, eps=config.eval.eps, norm=config.eval.norm, teacher=prepared.teacher,
                          teacher_layer=prepared.teacher_layer, pairs=prepared.pairs,
                          rrm_options=config.rrm.objective_options(), cache=cache, memory=memory,
                          robust_options=dataclasses.asdict(config.robust))


def objective_facts(objective) -> dict:
    """What metrics.json says about the objective: RRM's resolved options, or the method's attack."""
    if not isinstance(objective, RRM):
        current = getattr(objective, "current", None)
        attack = None if current is None else {"name": current.name, "eps": current.eps, "step_size": current.alpha,
                                                "match_start": "previous" if objective.memory else "random"}
        return {"rrm_options": None, "attack": attack}
    return {"rrm_options": {**objective.options.objective_options(), "ce_weight": objective.ce_weight,
                            "teacher_input": objective.teacher_input, "step_size": objective.step_size,
                            "norm": objective.norm, "match_start": "previous" if objective.memory else "random"}}


def distill(config: DistillConfig) -> RunResult:
    """Robust Representation Matching: train a student to match a robust teacher, evaluate both alike, save a
    Hub-ready folder (weights for RRMStudent and plain timm, card, metrics, plot, run_config.yaml)."""
    if config.preflight or config.list_layers:
        raise RRMError("--preflight and --list-layers stop before training: call rrm_hub.pipeline.preflight or "
                       "list_layers, or drop them")
    prepared = setup(config)
    config, accelerator, images = prepared.config, prepared.accelerator, prepared.images
    objective = rrm_objective(prepared)

    # train on clean data with the RRM loss, checking clean and PGD-10 accuracy each epoch
    loader = components.train_loader(images, config.data, config.training, objective=objective)
    check = components.epoch_check(images, config.eval, config.training, accelerator)
    run = train(prepared.student, objective, loader, accelerator, config.training, check)
    student, selected = components.finish_training(prepared.student, run, check, config.eval, accelerator)
    if hasattr(objective, "remove"):
        objective.remove()

    # evaluate student and teacher the same way, at a cost scaled to the run
    evaluation = components.evaluation_for_run(config.eval, images, config.training, accelerator)
    test_loader, sweep_loader = components.evaluation_loaders(images, evaluation, config.training.batch_size)
    options = components.report_options(evaluation, accelerator)
    result = robustness_report(student, test_loader, sweep_loader, **options)
    teacher_result = teacher_report(prepared, test_loader, sweep_loader, options) if prepared.labels_match else None

    metrics = {
        **result, "method": config.method, "match_on": config.rrm.match_on if config.method == "rrm" else None,
        "teacher": prepared.teacher.source,
        "teacher_layer": (", ".join(p.teacher_layer for p in prepared.pairs) if prepared.pairs
                          else prepared.teacher_layer),
        "student": config.student.spec()[0], "student_args": config.student.spec()[1],
        "student_layer": (", ".join(p.student_layer or "projected penultimate" for p in prepared.pairs)
                          if prepared.pairs else config.student.layer or "projected penultimate"),
        "feature_dim": prepared.feature_dim, "pairs": [p.to_dict() for p in prepared.pairs] or None,
        **objective_facts(objective),
        "teacher_cache": (None if getattr(getattr(objective, "targets", None), "cache", None) is None else
                          {"path": str(objective.targets.cache.path), "reused": objective.targets.cache.reused}),
        **run_facts(run, selected, images, config, accelerator),
        "teacher_clean_accuracy": teacher_result["clean_accuracy"] if teacher_result else None,
        "teacher_robust_accuracy": teacher_result["robust_accuracy"] if teacher_result else None,
        "teacher_sweep": teacher_result["sweep"] if teacher_result else None,
        "teacher_evaluation_cached": teacher_result["cached"] if teacher_result else None,
        "history": run["history"], **skipped_images(images, accelerator),
    }
    if accelerator.is_main_process:
        curves = {f"student ({metrics['student']})": result["sweep"]}
        if teacher_result:
            curves["teacher"] = teacher_result["sweep"]
        context = {"teacher": prepared.teacher.source, "student": metrics["student"],
                   "match_on": config.rrm.match_on}
        with writing_outputs(prepared.output_dir, run):
            prepared.output_dir.mkdir(parents=True, exist_ok=True)
            (prepared.output_dir / "README.md").unlink(missing_ok=True)  # the card is written anew
            student.save_pretrained(prepared.output_dir, model_card_kwargs={
                "metrics": metrics, "context": {**card_context(config, images, "rrm.py"), **context}})
            save_outputs(prepared.output_dir, config, metrics, curves, "rrm.py")
    share(config, prepared.output_dir, accelerator)
    return RunResult(metrics, prepared.output_dir, student, accelerator.is_main_process)


def teacher_report(prepared: Setup, test_loader, sweep_loader, options: dict) -> dict:
    """The teacher's robustness report, evaluated as the student's was: reused where the same teacher was measured on
    the same images with the same settings before (`rrm_hub.evaluation_cache`; with `cached` saying where from),
    else measured and kept."""
    settings = {**{k: v for k, v in options.items() if k != "accelerator"}, "seed": prepared.config.training.seed}
    report = evaluation_cache.cached_report(
        prepared.teacher, test_loader, sweep_loader, settings,
        lambda: robustness_report(prepared.teacher, test_loader, sweep_loader, **options), hardware(),
        save=prepared.accelerator.is_main_process)
    if report["cached"]:
        prepared.accelerator.print(f"teacher's evaluation reused from {report['cached']['from']} (the same weights, "
                                   f"images and attacks; measured on {report['cached']['measured_on']})")
    return report


def adversarial_train(config: AdversarialTrainConfig) -> RunResult:
    """Adversarial training of a timm model (PGD-AT, fast-AT, N-FGSM or ATTA); saves a timm-format Hub folder."""
    from .models import create_pixel_model, save_timm_folder

    config = with_output_dir(config.validate(), f"robust-{config.model.name}")
    accelerator = components.make_accelerator(config.training)
    output_dir = components.output_folder(config.training.output_dir)
    if config.hub.push:
        check_can_push(config.hub.model_id)  # before the work, not after it

    # data and model: the model takes [0, 1] pixels, normalization inside
    model_args = parse_kwargs(config.model.kwargs)
    name = resolve_model_name(config.model.name, "--model", accelerator.print)
    images = components.load_data(config.data, config.training.seed, config.eval.holdout,
                                   model_input(name, model_args))
    check_l2_budgets(config, images.channels, images.image_size)
    model = create_pixel_model(name, images.num_classes, (images.channels, *images.image_size), model_args,
                               images.class_names)
    hashes = disjoint_training_images(images, config.disjoint_from, accelerator.print) if config.disjoint_from else None

    # the objective: cross-entropy on adversarial examples from the one attack implementation
    objective = make_objective(config.method, eps=config.eval.eps, norm=config.eval.norm,
                               attack_steps=config.attack_steps, eps_warmup=config.eps_warmup,
                               memory=components.perturbation_memory(config.method, images))

    # train, then evaluate
    check = components.epoch_check(images, config.eval, config.training, accelerator)
    loader = components.train_loader(images, config.data, config.training, objective=objective)
    run = train(model, objective, loader, accelerator, config.training, check)
    model, selected = components.finish_training(model, run, check, config.eval, accelerator)
    evaluation = components.evaluation_for_run(config.eval, images, config.training, accelerator)
    report = robustness_report(model, *components.evaluation_loaders(images, evaluation, config.training.batch_size),
                               **components.report_options(evaluation, accelerator))

    metrics = {**report, "method": config.method, "model": config.model.name, "model_args": model_args,
               **run_facts(run, selected, images, config, accelerator), "history": run["history"],
               **skipped_images(images, accelerator)}
    if accelerator.is_main_process:
        with writing_outputs(output_dir, run):
            output_dir.mkdir(parents=True, exist_ok=True)
            save_timm_folder(model.model, str(output_dir), model_args, images.class_names)
            if hashes is not None:
                provenance.save_hashes(hashes, output_dir, {"dataset": images.name, "split": config.data.train_split,
                                                            "disjoint_from": config.disjoint_from})
            render_card("teacher", metrics, card_context(config, images, "adversarial_train.py")).save(
                output_dir / "README.md")
            save_outputs(output_dir, config, metrics, {config.model.name: report["sweep"]}, "adversarial_train.py")
    robust = ", ".join(f"{k} {v:.1%}" for k, v in report["robust_accuracy"].items())
    accelerator.print(f"{config.model.name} ({config.method}): clean {report['clean_accuracy']:.1%}, {robust} at "
                      f"{config.eval.norm} eps {config.eval.eps:g}; trained {run['train_seconds']:.0f}s -> "
                      f"{output_dir}")
    share(config, output_dir, accelerator)
    return RunResult(metrics, output_dir, model, accelerator.is_main_process)


def preflight(config: DistillConfig) -> RunResult:
    """A short run that tells in minutes whether this teacher/student pair transfers robustness."""
    prepared = setup(config)
    config, accelerator = prepared.config, prepared.accelerator
    objective = rrm_objective(prepared)
    training = dataclasses.replace(config.training, max_steps=config.preflight_steps, output_dir=None)  # no saves
    loader = components.train_loader(prepared.images, config.data, training, objective=objective)
    run = train(prepared.student, objective, loader, accelerator, training)
    limit = min(config.eval.eval_examples or 200, 200)
    result = transfer_check(accelerator.unwrap_model(prepared.student), prepared.teacher,
                            components.test_loader(prepared.images, training.batch_size, limit), config.eval.eps,
                            config.eval.norm, accelerator)
    result["train_seconds"] = round(run["train_seconds"], 1)
    for row in result["rows"]:
        accelerator.print(f"eps {row['eps']:g}: student {row['student']:.1%}, teacher {row['teacher']:.1%} "
                          f"(student/teacher {row['ratio']:.2f})")
    verdict = "moving into the student" if result["moving"] else "NOT moving into the student"
    accelerator.print(f"preflight after {run['steps']} steps ({result['train_seconds']}s): robustness is "
                      f"{verdict}")
    if accelerator.is_main_process:
        prepared.output_dir.mkdir(parents=True, exist_ok=True)
        save_json(result, prepared.output_dir / "preflight.json")
    return RunResult(result, prepared.output_dir, prepared.student)


def list_layers(config: DistillConfig) -> RunResult:
    """Print the layers of teacher and student (as --teacher-layer / --student-layer / --match take them) with their
    output shapes."""
    prepared = setup(config)
    teacher, student, accelerator = prepared.teacher, prepared.student, prepared.accelerator
    for title, model, network, device in ((f"teacher {teacher.source}", teacher, teacher.network, accelerator.device),
                                          (f"student {student.config['architecture']}", student, student.backbone,
                                           "cpu")):  # the teacher runs where training would; the student is not moved
        accelerator.print(f"{title}: layers (as --teacher-layer / --student-layer / --match) and output shapes")
        for name, kind, shape in layer_shapes(model.eval(), prepared.sample.to(device), network):
            accelerator.print(f"  {name:<40} {kind:<24} {tuple(shape)}")
    return RunResult({}, prepared.output_dir, student)


def disjoint_training_images(images: ImageData, other: str, log=print):
    """The pixel hashes of every training image (held-out ones included), checked to be in no split of `other`."""
    import numpy as np

    parts = [images.train] + ([images.holdout] if images.holdout is not None else [])
    hashes = np.concatenate([provenance.hashes(rows, images.image_column) for rows in parts])
    others = provenance.dataset_hashes(other)
    provenance.check_disjoint(hashes, others, other)
    log(f"none of the {len(hashes)} training images is in {other} "
        f"({', '.join(f'{k}: {len(v)}' for k, v in others.items())} images, by pixel hash)")
    return hashes


# ---- what every run records
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
