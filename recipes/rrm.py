"""Robust Representation Matching: make a timm student robust by matching a robust teacher's representation.

    accelerate launch recipes/rrm.py --teacher <hub id or folder> --student vit_small_patch16_224 --dataset <hub id>
    python recipes/rrm.py --config recipes/configs/rrm-cnn.yaml --epochs 10

With no flags: the bundled robust MNIST teacher, the embedded 5,000 MNIST digits and a small ViT student,
L-inf eps 0.3, a few minutes on a laptop CPU. The output folder is a Hub-ready model repo, with the run's
settings in run_config.yaml (`--config OUTPUT/run_config.yaml` runs them again).
"""

from __future__ import annotations

from rrm_hub import DistillConfig, cli, distill
from rrm_hub.errors import one_line_errors
from rrm_hub.pipeline import list_layers, preflight


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(DistillConfig, argv, description=__doc__)
    if config.list_layers:
        return list_layers(config).metrics
    if config.preflight:
        return preflight(config).metrics

    # data -> teacher (its representation tapped) -> student of the teacher's width -> RRM training
    # -> student and teacher evaluated alike -> Hub-ready folder (see rrm_hub.pipeline.distill)
    result = distill(config)
    print_summary(result.metrics, result.output_dir, main_process=result.is_main_process)
    return result.metrics


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
