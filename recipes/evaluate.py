"""Evaluate the adversarial robustness of any model rrm-hub can load, with gradient-masking checks.

    python recipes/evaluate.py --model <hub id or folder> --dataset <hub id> --suite standard
    python recipes/evaluate.py --model resnet50 --checkpoint hf://org/repo/weights.safetensors --dataset <hub id>

With no flags: the bundled MNIST teacher on the embedded MNIST test digits, PGD-20 at L-inf eps 0.3.
`--suite standard` is AutoAttack's standard version (APGD-CE, APGD-T, Square): an example counts as robust
only if every attack failed on it. Writes metrics.json and the accuracy-versus-epsilon plot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import Accelerator

from rrm_hub import flags, load_teacher, make_loader
from rrm_hub.cards import PLOT_FILE, hardware, plot_sweeps, save_json
from rrm_hub.checks import MaskingChecks
from rrm_hub.errors import RRMError, cli
from rrm_hub.evaluate import evaluate_suite
from rrm_hub.suites import SUITES, WORST_CASE

DEFAULT_EPS = {"linf": 0.3, "l2": 2.0}  # the usual MNIST threat models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("model and threat model")
    group.add_argument("--model", default=None, help="Hub id, rrm-hub student folder or timm-format folder "
                       "(default: the bundled teacher)")
    group.add_argument("--revision", default=None, help="Hub revision of the model")
    group.add_argument("--checkpoint", default=None, help="weights (.safetensors/.ckpt/.pt path or "
                       "hf://org/repo/file) for the architecture named by --model or --arch")
    group.add_argument("--arch", default=None, help="architecture of a weight file: NAME, timm:NAME or "
                       "torchvision:NAME (default: guessed from the file name)")
    group.add_argument("--model-kwargs", nargs="*", default=None, help="key=value to build --arch")
    group.add_argument("--num-classes", type=int, default=None, help="classes of a weight file (default: rows "
                       "of its classifier)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run the model repo's own code (only for repos you trust)")
    group.add_argument("--norm", choices=["linf", "l2"], default="linf")
    group.add_argument("--eps", type=float, default=None, help="attack budget in [0, 1] pixels (default: 0.3 "
                       "for linf, 2.0 for l2; the largest --eps-sweep value if that is given)")
    group.add_argument("--eps-sweep", type=float, nargs="+", default=None, help="also run the suite at these "
                       "epsilons, for the accuracy-versus-epsilon curve")
    group = parser.add_argument_group("attacks")
    group.add_argument("--suite", choices=SUITES, default="pgd", help="pgd: PGD-20 (fast); standard: "
                       "AutoAttack's APGD-CE, APGD-T and Square")
    group.add_argument("--steps", type=int, default=None, help="iterations of each gradient attack "
                       "(default: 20 for pgd, 100 for APGD)")
    group.add_argument("--square-queries", type=int, default=5000, help="queries of the Square attack")
    group.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    group.add_argument("--n-examples", type=int, default=None, help="first N test images (default: all)")
    group.add_argument("--batch-size", type=int, default=256, help="per process")
    group.add_argument("--seed", type=int, default=0, help="seed of the random starts and of any split")
    group.add_argument("--output-dir", default="evaluation")
    flags.add_data_args(parser)
    args = parser.parse_args(argv)
    if args.eps is None:
        args.eps = max(args.eps_sweep) if args.eps_sweep else DEFAULT_EPS[args.norm]
    if args.eps <= 0 or any(e < 0 for e in args.eps_sweep or []):
        raise RRMError("--eps must be > 0 and --eps-sweep values >= 0")
    if args.batch_size < 1 or (args.n_examples is not None and args.n_examples < 1) or \
            (args.steps is not None and args.steps < 1) or args.square_queries < 1:
        raise RRMError("--batch-size, --n-examples, --steps and --square-queries must be >= 1")
    args.command = flags.command_line(__file__, argv)
    return args


@cli
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = flags.make_accelerator(args)  # seeds PGD's random starts; torchattacks seeds its own

    # 1. the model (any robust classifier taking [0, 1] pixels) and the test images
    model = load_teacher(args.model, revision=args.revision, checkpoint=args.checkpoint, arch=args.arch,
                         model_args=flags.parse_kwargs(args.model_kwargs), num_classes=args.num_classes,
                         trust_remote_code=args.trust_remote_code).to(accelerator.device)
    data = flags.load_data(args)
    if model.num_classes != data.num_classes:
        raise RRMError(f"the model predicts {model.num_classes} classes but the dataset has {data.num_classes}; "
                       "give the dataset it was trained on")
    loader = make_loader(data, "test", args.batch_size, limit=args.n_examples, num_workers=args.num_workers)

    # 2. the suite at each epsilon, worst case per example, and the gradient-masking checks
    result = evaluate_suite(model, loader, args.eps, args.norm, args.suite, sweep=args.eps_sweep or (),
                            steps=args.steps, queries=args.square_queries,
                            checks=None if args.no_checks else MaskingChecks(), accelerator=accelerator)
    metrics = {**result, "model": getattr(model, "source", args.model), "dataset": data.name,
               "hardware": hardware(), "num_processes": accelerator.num_processes, "command": args.command}

    # 3. metrics.json and the accuracy-versus-epsilon plot, from the main process only
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_json(metrics, output_dir / "metrics.json")
        plot_sweeps({metrics["model"]: result["sweep"]}, output_dir / PLOT_FILE, args.norm,
                    ylabel=f"accuracy, worst case of suite '{args.suite}' (%)")
    print_summary(accelerator, metrics, output_dir)
    return metrics


def print_summary(accelerator: Accelerator, metrics: dict, output_dir: Path) -> None:
    accelerator.print(f"\n{metrics['model']}: {metrics['num_examples']} test images, {metrics['norm']} "
                      f"eps {metrics['eps']:g}, suite {metrics['suite']}")
    accelerator.print(f"  {'clean':<12}{metrics['clean_accuracy']:>8.1%}")
    for name, accuracy in metrics["robust_accuracy"].items():
        accelerator.print(f"  {name:<12}{accuracy:>8.1%}" + ("   <- robust accuracy" if name == WORST_CASE else ""))
    for name, check in metrics["checks"].items():
        accelerator.print(f"  check {name:<16} {'passed' if check['passed'] else 'FAILED'}: {check['detail']}")
    accelerator.print(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
