"""Robust Representation Matching (and the other distillation methods) for library users: `distill` calls the same
builders in the same order as recipes/rrm.py; `preflight` and `list_layers` look at a teacher/student pair before a
long run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .. import methods
from ..config.runs import DistillConfig
from ..data.images import ImageData
from ..errors import RRMError
from ..evaluation.evaluate import transfer_check
from ..hub.cards import save_json
from ..models.features import list_layers as layer_shapes
from ..training.loop import train
from . import builders, fit, report
from .builders import Runtime, Teacher


@dataclass
class RunResult:
    """What a run measured (`metrics`: metrics.json of a training run, preflight.json of a preflight) and the model."""

    metrics: dict
    output_dir: Path
    model: nn.Module | None = None
    is_main_process: bool = True


def distill(config: DistillConfig, script: str = "rrm.py") -> RunResult:
    """Robust Representation Matching: train a student to match a robust teacher, evaluate both alike, save a
    Hub-ready folder (weights for RRMStudent and plain timm, card, metrics, plot, run_config.yaml). `script`: the
    recipe whose command the card gives."""
    if config.preflight or config.list_layers:
        raise RRMError("--preflight and --list-layers stop before training: call rrm_hub.runs.distill.preflight or "
                       "list_layers, or drop them")
    config, runtime = builders.start(config, "rrm-student", script)
    student_spec = builders.student_spec(config, runtime)
    images = builders.images_for(config, runtime, student_spec)
    teacher = builders.teacher_for(config, images, runtime)
    student = builders.student_for(config, teacher, images, runtime, student_spec)
    objective = builders.objective_for(config, teacher, images, runtime)

    loader = fit.train_loader(images, config.data, config.training, objective=objective)
    check = fit.epoch_check(images, config.eval, config.training, runtime.accelerator)
    run = train(student, objective, loader, runtime.accelerator, config.training, check)
    student, selected = fit.finish_training(student, run, check, config.eval, runtime.accelerator)
    if hasattr(objective, "remove"):  # the hooks on the teacher
        objective.remove()

    plan = report.evaluation_plan(config, images, runtime)
    result = report.evaluate_model(student, plan)
    teacher_result = (report.evaluate_teacher(teacher.model, plan, config.training.seed, runtime)
                      if teacher.labels_match else None)
    metrics = distill_metrics(config, images, teacher, objective, run, selected, result, teacher_result, runtime)
    save_student(student, metrics, config, images, teacher, run, runtime)
    report.share(config, runtime.output_dir, runtime.accelerator)
    return RunResult(metrics, runtime.output_dir, student, runtime.accelerator.is_main_process)


def distill_metrics(config: DistillConfig, images: ImageData, teacher: Teacher, objective, run: dict, selected,
                    result: dict, teacher_result: dict | None, runtime: Runtime) -> dict:
    """metrics.json of a distillation run: the student's report, what was matched, the method's facts, the run's
    facts and the teacher's report (None where its classes are not the dataset's)."""
    pairs, (student_name, student_args) = teacher.pairs, config.student.spec()
    cache = getattr(getattr(objective, "targets", None), "cache", None)
    told = teacher_result or {}
    return {
        **result, "method": config.method, "match_on": config.rrm.match_on if config.method == "rrm" else None,
        "teacher": teacher.source,
        "teacher_layer": ", ".join(p.teacher_layer for p in pairs) if pairs else teacher.layer,
        "student": student_name, "student_args": student_args,
        "student_layer": (", ".join(p.student_layer or "projected penultimate" for p in pairs)
                          if pairs else config.student.layer or "projected penultimate"),
        "feature_dim": teacher.width, "pairs": [p.to_dict() for p in pairs] or None,
        **methods.get(config.method).facts(objective),
        "teacher_cache": None if cache is None else {"path": str(cache.path), "reused": cache.reused},
        "unlabeled_images": None if images.unlabeled is None else {
            "dataset": config.robust.unlabeled_dataset, "split": config.robust.unlabeled_split,
            "count": len(images.unlabeled),
            "share": config.robust.unlabeled_share},
        **report.run_facts(run, selected, images, config, runtime.accelerator),
        "teacher_clean_accuracy": told.get("clean_accuracy"), "teacher_robust_accuracy": told.get("robust_accuracy"),
        "teacher_sweep": told.get("sweep"), "teacher_evaluation_cached": told.get("cached"),
        "history": run["history"], **report.skipped_images(images, runtime.accelerator),
    }


def save_student(student, metrics: dict, config: DistillConfig, images: ImageData, teacher: Teacher, run: dict,
                 runtime: Runtime) -> None:
    """The Hub-ready folder: the student (RRMStudent and plain timm weights), its card, metrics.json, the
    accuracy-versus-epsilon plot (student and teacher) and run_config.yaml; from the main process only."""
    if not runtime.accelerator.is_main_process:
        return
    curves = {f"student ({metrics['student']})": metrics["sweep"]}
    if metrics["teacher_sweep"]:
        curves["teacher"] = metrics["teacher_sweep"]
    context = {**report.card_context(config, images, runtime.script), "teacher": teacher.source,
               "student": metrics["student"], "match_on": config.rrm.match_on,
               "method_summary": methods.get(config.method).summary}
    with report.writing_outputs(runtime.output_dir, run):
        runtime.output_dir.mkdir(parents=True, exist_ok=True)
        (runtime.output_dir / "README.md").unlink(missing_ok=True)  # the card is written anew
        student.save_pretrained(runtime.output_dir, model_card_kwargs={"metrics": metrics, "context": context})
        report.save_outputs(runtime.output_dir, config, metrics, curves, runtime.script)


def preflight(config: DistillConfig, script: str = "rrm.py") -> RunResult:
    """A short run that tells in minutes whether this teacher/student pair transfers robustness."""
    config, runtime = builders.start(config, "rrm-student", script, push=False)
    student_spec = builders.student_spec(config, runtime)
    images = builders.images_for(config, runtime, student_spec)
    teacher = builders.teacher_for(config, images, runtime)
    student = builders.student_for(config, teacher, images, runtime, student_spec)
    objective = builders.objective_for(config, teacher, images, runtime)
    training = dataclasses.replace(config.training, max_steps=config.preflight_steps, output_dir=None)  # no saves
    loader = fit.train_loader(images, config.data, training, objective=objective)
    run = train(student, objective, loader, runtime.accelerator, training)
    limit = min(config.eval.eval_examples or 200, 200)
    result = transfer_check(runtime.accelerator.unwrap_model(student), teacher.model,
                            report.test_loader(images, training.batch_size, limit), config.eval.eps,
                            config.eval.norm, runtime.accelerator)
    result["train_seconds"] = round(run["train_seconds"], 1)
    for row in result["rows"]:
        runtime.print(f"eps {row['eps']:g}: student {row['student']:.1%}, teacher {row['teacher']:.1%} "
                      f"(student/teacher {row['ratio']:.2f})")
    verdict = "moving into the student" if result["moving"] else "NOT moving into the student"
    runtime.print(f"preflight after {run['steps']} steps ({result['train_seconds']}s): robustness is {verdict}")
    if runtime.accelerator.is_main_process:
        runtime.output_dir.mkdir(parents=True, exist_ok=True)
        save_json(result, runtime.output_dir / "preflight.json")
    return RunResult(result, runtime.output_dir, student)


def list_layers(config: DistillConfig, script: str = "rrm.py") -> RunResult:
    """Print the layers of teacher and student (as --teacher-layer / --student-layer / --match take them) with their
    output shapes."""
    config, runtime = builders.start(config, "rrm-student", script, push=False)
    student_spec = builders.student_spec(config, runtime)
    images = builders.images_for(config, runtime, student_spec)
    teacher = builders.teacher_for(config, images, runtime)
    student = builders.student_for(config, teacher, images, runtime, student_spec)
    sample = builders.sample_batch(images)
    device = runtime.accelerator.device
    for title, model, network, where in ((f"teacher {teacher.source}", teacher.model, teacher.model.network, device),
                                         (f"student {student.config['architecture']}", student, student.backbone,
                                          "cpu")):  # the teacher runs where training would; the student is not moved
        runtime.print(f"{title}: layers (as --teacher-layer / --student-layer / --match) and output shapes")
        for name, kind, shape in layer_shapes(model.eval(), sample.to(where), network):
            runtime.print(f"  {name:<40} {kind:<24} {tuple(shape)}")
    return RunResult({}, runtime.output_dir, student)
