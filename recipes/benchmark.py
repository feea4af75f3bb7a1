"""RRM against adversarial training, side by side: same student, data, budget and seed.

    python recipes/benchmark.py --quick

For each method (natural, PGD-AT, fast-AT, N-FGSM-AT, ATTA-AT, free-AT, KD, RRM) trains the same student
(default: a small CNN; --student picks another), checks robust accuracy (PGD-10) after every epoch against the training
seconds spent so far, and writes to --output-dir: benchmark.json (stable keys:
methods.<name>.seconds_per_step, .time_to_target_seconds, .robust_accuracy, .clean_accuracy, ...;
teacher_forward_over_student_forward: a teacher forward's seconds over the student's, on a training batch),
benchmark.md (a table) and benchmark.png (robust accuracy versus wall-clock seconds).
Time-to-target: seconds until a method's per-epoch check first reaches --target (default: --target-fraction of
PGD-AT's final robust accuracy). Each finished method's result is kept in OUTPUT_DIR/methods/: a stopped benchmark,
run again with the same settings, skips the methods it finished (their timings are from the earlier process).

rrm_cached matches on the clean images with the teacher's outputs computed once before training (a
`TeacherCache`, built fresh here: its seconds count in its total and its curve, not in its seconds per step);
--cache-teacher (with --pad 0) does the same for rrm, whose teacher sees the clean images.
The cache needs unaugmented images (--pad 0); as augmentation costs time in the data loader, its step cost is
stated against natural training on the same unaugmented images (natural_pad0, run with it when --pad > 0 or --hflip).
"""

from __future__ import annotations

from rrm_hub import cli
from rrm_hub.errors import one_line_errors
from rrm_hub.hub.cards import plot_curves, save_json
from rrm_hub.runs import builders
from rrm_hub.runs.benchmark import (
    BenchmarkConfig,
    markdown_table,
    output_folder,
    report,
    run_benchmark,
    summarize,
)


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(BenchmarkConfig, argv, description=__doc__).resolved()
    accelerator = builders.make_accelerator(config.training)
    output_dir = output_folder(config)

    results, images, teacher_ratio = run_benchmark(config, accelerator)  # each method trains a fresh student
    target = summarize(results, config.target, config.target_fraction, images.num_classes)
    summary = report(results, config, target, cli.command("benchmark.py", config), images.name, teacher_ratio)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_json(summary, output_dir / "benchmark.json")
        (output_dir / "benchmark.md").write_text(markdown_table(results, config, target, teacher_ratio))
        plot_curves({m: r["curve"] for m, r in results.items()}, output_dir / "benchmark.png", x="seconds",
                    y="robust", xlabel="training seconds", target=target,
                    ylabel=f"PGD-10 accuracy (%), {config.eval.norm} eps {config.eval.eps:g}")
        cli.save(config, output_dir, "benchmark.py")
    accelerator.print(markdown_table(results, config, target, teacher_ratio))
    for key, value in summary["ratios"].items():
        accelerator.print(f"{key}: {value}")
    return summary


if __name__ == "__main__":
    main()
