"""Robust Representation Matching: make a timm student robust by matching a robust teacher's representation.

    accelerate launch recipes/rrm.py --teacher <hub id or folder> --student vit_small_patch16_224 --dataset <hub id>
    python recipes/rrm.py --config recipes/configs/rrm-cnn.yaml --epochs 10

With no flags: the bundled robust MNIST teacher, the embedded 5,000 MNIST digits and a small ViT student,
L-inf eps 0.3, a few minutes on a laptop CPU. The output folder is a Hub-ready model repo, with the run's
settings in run_config.yaml (`--config OUTPUT/run_config.yaml` runs them again). `--method` picks another way to
learn from the teacher (ARD, RSLAD, AdaAD, KD: docs/toolbox.md).
"""

from __future__ import annotations

from pathlib import Path

from rrm_hub import DistillConfig, cli
from rrm_hub.errors import one_line_errors
from rrm_hub.runs import builders, fit, report
from rrm_hub.runs.distill import distill_metrics, list_layers, preflight, save_student
from rrm_hub.training import train

SCRIPT = Path(__file__).name


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(DistillConfig, argv, description=__doc__)
    if config.list_layers:
        return list_layers(config, SCRIPT).metrics
    if config.preflight:
        return preflight(config, SCRIPT).metrics
    config, runtime = builders.start(config, "rrm-student", SCRIPT)  # accelerator, output folder, Hub check

    # 1. data: [0, 1] pixels at the student's own size; normalization lives inside each model
    student_spec = builders.student_spec(config, runtime)
    images = builders.images_for(config, runtime, student_spec)

    # 2. teacher: any robust model, frozen, its representation tapped by forward hooks
    teacher = builders.teacher_for(config, images, runtime)

    # 3. student: a timm backbone, a linear projection to the teacher's width, a classifier on the projection
    student = builders.student_for(config, teacher, images, runtime, student_spec)

    # 4. objective: the method (--method, RRM by default) built from the teacher's targets, the images it matches
    #    on (--match-on: attacked by a step carried over epochs, by default) and the loss
    #    w_ce * CE(student(x'), y) + w_feat * (1 - cos(z_S(x'), z_T(x)))
    objective = builders.objective_for(config, teacher, images, runtime)

    # 5. the one training loop, checking clean and PGD-10 accuracy along the way
    loader = fit.train_loader(images, config.data, config.training, objective=objective)
    check = fit.epoch_check(images, config.eval, config.training, runtime.accelerator)
    run = train(student, objective, loader, runtime.accelerator, config.training, check)
    student, selected = fit.finish_training(student, run, check, config.eval, runtime.accelerator)
    if hasattr(objective, "remove"):  # the hooks on the teacher
        objective.remove()

    # 6. student and teacher evaluated alike (the teacher's numbers measured once, then reused)
    plan = report.evaluation_plan(config, images, runtime)
    result = report.evaluate_model(student, plan)
    teacher_result = (report.evaluate_teacher(teacher.model, plan, config.training.seed, runtime)
                      if teacher.labels_match else None)

    # 7. a Hub-ready folder: weights for RRMStudent and plain timm, card, metrics.json, plot, run_config.yaml
    metrics = distill_metrics(config, images, teacher, objective, run, selected, result, teacher_result, runtime)
    save_student(student, metrics, config, images, teacher, run, runtime)
    report.share(config, runtime.output_dir, runtime.accelerator)
    print_summary(metrics, runtime.output_dir, runtime.accelerator.is_main_process)
    return metrics


def print_summary(metrics: dict, output_dir, main_process: bool = True) -> None:
    """The clean and robust accuracy of student and teacher, one row each."""
    if not main_process:
        return
    rows = [("student", metrics["clean_accuracy"], metrics["robust_accuracy"])]
    if metrics["teacher_clean_accuracy"] is not None:
        rows.append(("teacher", metrics["teacher_clean_accuracy"], metrics["teacher_robust_accuracy"]))
    attacks = list(metrics["robust_accuracy"])
    print(f"\n{metrics['norm']} eps {metrics['eps']:g}, {metrics['num_examples']} test images")
    print(f"{'model':<10}{'clean':>8}" + "".join(f"{a:>12}" for a in attacks))
    for name, clean, robust in rows:
        print(f"{name:<10}{clean:>8.1%}" + "".join(f"{robust[a]:>12.1%}" for a in attacks))
    print(f"trained in {metrics['train_seconds']:.0f}s; saved to {output_dir}")


if __name__ == "__main__":
    main()
