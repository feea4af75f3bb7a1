"""Evaluate the adversarial robustness of any model rrm-hub can load, with gradient-masking checks.

    python recipes/evaluate.py --model <hub id or folder> --dataset <hub id> --suite standard
    python recipes/evaluate.py --model resnet50 --checkpoint hf://org/repo/weights.safetensors --dataset <hub id>
    python recipes/evaluate.py --model org/name --dataset <hub id> --suite standard --push-results [--dry-run]

With no flags: the bundled MNIST teacher on the embedded MNIST test digits, PGD-20 at L-inf eps 0.3.
`--suite standard` is AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square), run by the authors' own
`pyautoattack`: an example counts as robust only if every attack failed on it. Writes metrics.json, the
accuracy-versus-epsilon plot and run_config.yaml; `--push-results` writes the numbers into the model repo's card
(`model-index`), as a pull request unless `--no-pr`; `--dry-run` prints that card instead.
"""

from __future__ import annotations

from pathlib import Path

from rrm_hub import TrainConfig, cli, make_loader
from rrm_hub.config.runs import check_l2_budgets
from rrm_hub.config.tools import EvaluateConfig
from rrm_hub.errors import RRMError, one_line_errors
from rrm_hub.evaluation.checks import MaskingChecks
from rrm_hub.evaluation.evaluate import evaluate_suite
from rrm_hub.evaluation.suites import WORST_CASE
from rrm_hub.hub.cards import PLOT_FILE, hardware, plot_sweeps, save_json
from rrm_hub.hub.push import push_results, results_card
from rrm_hub.runs import builders


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(EvaluateConfig, argv, description=__doc__)
    accelerator = builders.make_accelerator(TrainConfig(seed=config.seed))  # seeds PGD's random starts
    eps = config.resolved_eps

    # 1. the model (any robust classifier taking [0, 1] pixels) and the test images
    model = config.model.load(accelerator.device)
    images = builders.load_data(config.data, config.seed)
    check_l2_budgets(config, images.channels, images.image_size)
    if model.num_classes != images.num_classes:
        raise RRMError(f"the model predicts {model.num_classes} classes but the dataset has {images.num_classes}; "
                       "give the dataset it was trained on")
    loader = make_loader(images, "test", config.batch_size, limit=config.n_examples,
                         num_workers=config.data.num_workers)

    # 2. the suite at each epsilon, worst case per example, and the gradient-masking checks
    result = evaluate_suite(model, loader, eps, config.norm, config.suite, sweep=config.eps_sweep or (),
                            steps=config.steps, restarts=config.restarts,
                            checks=None if config.no_checks else MaskingChecks(), accelerator=accelerator,
                            seed=config.seed)
    for log in images.unreadable.values():
        if line := log.line():
            print(line)
    metrics = {**result, "model": getattr(model, "source", config.model.name), "dataset": images.name,
               "skipped_images": images.skipped() or None,
               "hardware": hardware(), "num_processes": accelerator.num_processes,
               "command": cli.command("evaluate.py", config)}

    # 3. metrics.json, the accuracy-versus-epsilon plot and the settings, from the main process only
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_json(metrics, output_dir / "metrics.json")
        plot_sweeps({metrics["model"]: result["sweep"]}, output_dir / PLOT_FILE, config.norm,
                    ylabel=f"accuracy, worst case of suite '{config.suite}' (%)")
        cli.save(config, output_dir, "evaluate.py")
        print_summary(metrics, output_dir)
        if config.push_results:  # 4. the numbers into the model's own card
            share_results(config, metrics, images.name)
    return metrics


def share_results(config: EvaluateConfig, metrics: dict, dataset: str) -> None:
    card = results_card(config.model.name, metrics, dataset, config.model.revision)
    if config.dry_run:
        print(f"--- the card for {config.model.name or 'the bundled teacher'} (--dry-run: not pushed)\n{card.content}")
        return
    url = push_results(card, config.model.name, create_pr=not config.no_pr, revision=config.model.revision)
    print(f"pushed: {url}")


def print_summary(metrics: dict, output_dir: Path) -> None:
    print(f"\n{metrics['model']}: {metrics['num_examples']} test images, {metrics['norm']} eps {metrics['eps']:g}, "
          f"suite {metrics['suite']}")
    print(f"  {'clean':<12}{metrics['clean_accuracy']:>8.1%}")
    for name, accuracy in metrics["robust_accuracy"].items():
        print(f"  {name:<12}{accuracy:>8.1%}" + ("   <- robust accuracy" if name == WORST_CASE else ""))
    for name, check in metrics["checks"].items():
        print(f"  check {name:<16} {'passed' if check['passed'] else 'FAILED'}: {check['detail']}")
    print(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
