"""RRM against adversarial training, side by side: same student, data, budget and seed.

    python recipes/benchmark.py --quick

For each method (natural, PGD-AT, fast-AT, N-FGSM-AT, ATTA-AT, free-AT, KD, RRM) trains the same student
(default: a small CNN; --student picks another), checks robust accuracy (PGD-10) after every epoch against the training
seconds spent so far, and writes to --output-dir: benchmark.json (stable keys:
methods.<name>.seconds_per_step, .time_to_target_seconds, .robust_accuracy, .clean_accuracy, ...),
benchmark.md (a table) and benchmark.png (robust accuracy versus wall-clock seconds).
Time-to-target: seconds until a method's per-epoch check first reaches --target (default: --target-fraction of
PGD-AT's final robust accuracy).

rrm_cached matches on the clean images with the teacher's outputs computed once before training (a
`TeacherCache`, built fresh here: its seconds count in its total and its curve, not in its seconds per step);
--cache-teacher (with --pad 0) does the same for rrm, whose teacher sees the clean images.
The cache needs unaugmented images (--pad 0); as augmentation costs time in the data loader, its step cost is
stated against natural training on the same unaugmented images (natural_pad0, run with it when --pad > 0 or --hflip).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from rrm_hub import RRMStudent, evaluate, flags, make_loader, pgd, train
from rrm_hub.benchmark import METHODS, make_objective, step_memory, time_to_target
from rrm_hub.cards import hardware, plot_curves, save_json
from rrm_hub.errors import RRMError, cli
from rrm_hub.features import default_layer, feature_width
from rrm_hub.memory import PerturbationMemory
from rrm_hub.teacher_cache import TeacherCache

QUICK = {"epochs": 8, "epoch_eval_examples": 200, "eval_examples": 500}
CNN_STUDENT = ("resnet18", ["layers=(1,1,1,1)", "channels=(24,48,96,128)", "stem_width=24", "output_stride=8"])
"""The default student: a small CNN (narrower than the bundled teacher), where PGD-AT learns within a short
budget; the small default ViT of recipes/rrm.py does not (PGD-AT and fast-AT stay at chance for it)."""
REFERENCE = "natural_pad0"
"""Natural training on unaugmented images: what rrm_cached's cost per step is measured against."""
UNAUGMENTED = ("rrm_cached", REFERENCE)


def unaugmented_reference(results: dict) -> str:
    """The run rrm_cached's step cost is stated against: natural_pad0, or natural when that ran unaugmented."""
    return REFERENCE if REFERENCE in results else "natural"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    parser.add_argument("--attack-steps", type=int, default=7, help="PGD steps of PGD-AT")
    parser.add_argument("--replays", type=int, default=4, help="minibatch replays of free-AT (epochs / replays)")
    parser.add_argument("--eps-warmup", type=float, default=0.3, help="epsilon ramp of PGD-AT and fast-AT")
    parser.add_argument("--target-fraction", type=float, default=0.9)
    parser.add_argument("--target", type=float, default=None, help="robust accuracy (PGD-10 per-epoch check) for "
                        "time-to-target (default: --target-fraction of PGD-AT's final robust accuracy)")
    flags.add_teacher_args(parser)
    flags.add_student_args(parser)
    flags.add_rrm_args(parser)  # --cache-teacher: rrm looks the teacher up too (a cache built fresh, timed)
    args = flags.parse(parser, argv, __file__, epochs=10, lr=3e-3, hub=False)
    if args.student is None:
        args.student, args.student_kwargs = CNN_STUDENT[0], args.student_kwargs or CNN_STUDENT[1]
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not args.epoch_eval_examples:
        args.epoch_eval_examples = 200  # the curves need a check after every epoch
    if args.cache_teacher and "rrm" in args.methods and (args.pad or args.hflip):
        raise RRMError("--cache-teacher needs the training images unaugmented: add --pad 0 (and no --hflip)")
    return args


def method_memory(method: str, args, data) -> PerturbationMemory | None:
    """The perturbation memory `method` carries from epoch to epoch, or None."""
    if method == "atta_at":
        return PerturbationMemory.for_training_images(data)
    return flags.perturbation_memory(args, data) if method == "rrm" else None


def run_method(method: str, args, data, teacher, teacher_layer, feature_dim, accelerator,
               cache: TeacherCache | None = None, cache_seconds: float = 0.0) -> dict:
    """Train a fresh student with `method` and measure it (`cache_seconds`: the cache's build, counted in
    total seconds and the curve)."""
    torch.manual_seed(args.seed)
    name, student_args = flags.student_spec(args)
    student = RRMStudent.for_teacher(name, feature_dim=feature_dim, num_classes=data.num_classes,
                                     model_args=student_args, input_size=(data.channels, *data.image_size))
    objective = make_objective("natural" if method == REFERENCE else method, eps=args.eps, norm=args.norm,
                               teacher=teacher, teacher_layer=teacher_layer,
                               attack_steps=args.attack_steps, replays=args.replays, eps_warmup=args.eps_warmup,
                               rrm_options=flags.rrm_options(args), cache=cache,
                               memory=method_memory(method, args, data))
    config = flags.train_config(args)
    config.output_dir = None  # timed runs: no checkpoints
    if method == "free_at":  # the same number of passes over the data as the others
        config.epochs = max(1, math.ceil(args.epochs / args.replays))
    augment = method not in UNAUGMENTED
    check = flags.epoch_check(data, args, accelerator, save_best=False)  # --keep-best: in memory only
    run = train(student, objective, flags.train_loader(data, args, augment, objective), accelerator, config, check)
    student = accelerator.unwrap_model(student)
    selected = check.restore(student) if args.keep_best else None
    batch = next(iter(flags.train_loader(data, args, augment, objective)))  # after training
    step_bytes = step_memory(student, objective, *(t.to(accelerator.device) for t in batch))
    final = evaluate(student, make_loader(data, "test", args.batch_size, limit=args.eval_examples),
                     {"pgd20": pgd(args.eps, args.norm, 20)}, accelerator, desc=f"{method} pgd20")
    curve = [{"seconds": round(h["seconds"] + cache_seconds, 2), "robust": h["pgd10"], "clean": h["clean"]}
             for h in run["history"]]
    extra = {"cache_build_seconds": round(cache_seconds, 2)} if cache is not None else {}
    return {"epochs": run["epochs"], "steps": run["steps"], "selected_epoch": selected,
            "pad": args.pad if augment else 0,
            "total_seconds": round(run["train_seconds"] + cache_seconds, 2), **extra,
            "seconds_per_epoch": round(run["train_seconds"] / run["epochs"], 3),
            "seconds_per_step": round(run["train_seconds"] / run["steps"], 5),
            "clean_accuracy": final["clean_accuracy"], "robust_accuracy": final["robust_accuracy"]["pgd20"],
            "curve": curve, **step_bytes}


@cli
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = flags.make_accelerator(args)
    output_dir = Path(args.output_dir or "benchmark")
    data = flags.load_data(args)

    teacher = flags.load_teacher_from(args, accelerator.device)
    teacher_layer = default_layer(teacher.network)
    sample = torch.zeros(2, data.channels, *data.image_size, device=accelerator.device)
    feature_dim = feature_width(teacher, teacher.network, teacher_layer, sample)

    args.num_classes = data.num_classes
    methods = list(args.methods)
    if "rrm_cached" in methods and (args.pad or args.hflip) and REFERENCE not in methods:  # just before it
        methods.insert(methods.index("rrm_cached"), REFERENCE)
    results = {}
    for method in methods:
        accelerator.print(f"--- {method}")
        cache, cache_seconds = None, 0.0
        if method == "rrm_cached" or (method == "rrm" and args.cache_teacher):
            started = time.perf_counter()
            loader = make_loader(data, "train", args.batch_size, num_workers=args.num_workers)
            cache = TeacherCache.build(teacher, teacher_layer, loader).to(accelerator.device)
            cache_seconds = time.perf_counter() - started
        results[method] = run_method(method, args, data, teacher, teacher_layer, feature_dim, accelerator, cache,
                                     cache_seconds)

    summarize(results, args)
    report = {"command": args.command, "hardware": hardware(), "eps": args.eps, "norm": args.norm,
              "student": flags.student_spec(args), "dataset": data.name, "target": args.target,
              "ratios": ratios(results), "methods": results}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_json(report, output_dir / "benchmark.json")
        (output_dir / "benchmark.md").write_text(markdown_table(results, args))
        plot_curves({m: r["curve"] for m, r in results.items()}, output_dir / "benchmark.png", x="seconds",
                    y="robust", xlabel="training seconds", target=args.target,
                    ylabel=f"PGD-10 accuracy (%), {args.norm} eps {args.eps:g}")
    accelerator.print(markdown_table(results, args))
    for key, value in report["ratios"].items():
        accelerator.print(f"{key}: {value}")
    return report


def summarize(results: dict, args) -> None:
    """Time-to-target for every method, and each method's cost per step relative to natural training."""
    reference = results.get("pgd_at", {}).get("robust_accuracy")
    chance = 1 / args.num_classes
    # a PGD-AT student no better than twice chance (a constant guess is "robust") gives no meaningful target
    if args.target is None:
        args.target = round(args.target_fraction * reference, 4) if reference and reference > 2 * chance else None
    natural = results.get("natural", {}).get("seconds_per_step")
    unaugmented = results.get(unaugmented_reference(results), {}).get("seconds_per_step")
    for method, result in results.items():
        result["time_to_target_seconds"] = None if args.target is None else time_to_target(result["curve"],
                                                                                           args.target)
        base = unaugmented if method in UNAUGMENTED else natural
        result["step_cost_vs_natural"] = None if not base else round(result["seconds_per_step"] / base, 3)


def ratios(results: dict) -> dict:
    """The ratios the project's targets are stated in (None where a method was not run or never got there)."""
    def ratio(a, b, key):
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    reference = unaugmented_reference(results)
    return {
        "rrm_step_over_natural_step": ratio("rrm", "natural", "seconds_per_step"),
        "rrm_clean_step_over_natural_step": ratio("rrm_clean", "natural", "seconds_per_step"),
        "rrm_cached_step_over_natural_step": ratio("rrm_cached", reference, "seconds_per_step"),
        "rrm_activation_memory_over_natural": ratio("rrm", "natural", "saved_activation_bytes"),
        "rrm_clean_activation_memory_over_natural": ratio("rrm_clean", "natural", "saved_activation_bytes"),
        "rrm_time_to_target_over_pgd_at": ratio("rrm", "pgd_at", "time_to_target_seconds"),
        "rrm_time_to_target_over_free_at": ratio("rrm", "free_at", "time_to_target_seconds"),
    }


def markdown_table(results: dict, args) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "never" if v is None else f"{v:.1f}"

    lines = [f"| method | epochs | s/epoch | step cost vs natural | total s | clean | PGD-20 ({args.norm} "
             f"{args.eps:g}) | time to target ({pct(args.target)}) |", "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        step_cost = "-" if r["step_cost_vs_natural"] is None else f"{r['step_cost_vs_natural']:.2f}"  # no natural run
        cells = [method, r["epochs"], f"{r['seconds_per_epoch']:.2f}", step_cost,
                 f"{r['total_seconds']:.1f}", pct(r["clean_accuracy"]), pct(r["robust_accuracy"]),
                 num(r["time_to_target_seconds"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if "cache_build_seconds" in results.get("rrm", {}):
        lines.append(f"\nrrm: the teacher's outputs cached (built in {results['rrm']['cache_build_seconds']:.1f}s, "
                     "counted in its total and its time to target).")
    if "rrm_cached" in results:
        reference = unaugmented_reference(results)
        lines.append(f"\nrrm_cached: clean matching with the teacher's outputs cached (built in "
                     f"{results['rrm_cached']['cache_build_seconds']:.1f}s, counted in its total); it trains without "
                     f"augmentation, so its step cost is against {reference} (natural training on the same "
                     "unaugmented images).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
