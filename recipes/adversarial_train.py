"""Adversarial training (PGD-AT, fast-AT or N-FGSM) of any timm model on any image dataset.

    python recipes/adversarial_train.py --model resnet18 --method pgd_at --eps 0.3

Writes a Hub-format folder: config.json + model.safetensors (timm layout), README.md (a card with the
measured robustness and this command), metrics.json and robustness.png. This recipe produced the
bundled default teacher (see its card in rrm_hub/assets/).
"""

from __future__ import annotations

import argparse

from rrm_hub import create_pixel_model, flags, make_loader, train
from rrm_hub.benchmark import make_objective
from rrm_hub.cards import hardware, plot_sweeps, render_card, save_json
from rrm_hub.errors import cli
from rrm_hub.evaluate import robustness_report
from rrm_hub.memory import PerturbationMemory
from rrm_hub.models import save_timm_folder
from rrm_hub.selection import late_fall


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm architecture")
    parser.add_argument("--model-kwargs", nargs="*", default=[], help="key=value for timm.create_model")
    parser.add_argument("--method", choices=["pgd_at", "fast_at", "nfgsm_at", "atta_at"], default="pgd_at",
                        help="pgd_at: PGD with --attack-steps; fast_at: FGSM with a random start; nfgsm_at: "
                        "N-FGSM (random start of 2 eps, a step of eps, not projected); atta_at: one step of 0.5 eps "
                        "an epoch from where the image's attack ended the epoch before (ATTA)")
    parser.add_argument("--attack-steps", type=int, default=7, help="PGD steps while training (pgd_at)")
    parser.add_argument("--eps-warmup", type=float, default=0.3,
                        help="ramp epsilon up from 0 over this fraction of training (0: off)")
    return flags.parse(parser, argv, __file__, epochs=10, lr=2e-3)


@cli
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = flags.make_accelerator(args)
    output_dir = flags.output_folder(args, f"robust-{args.model}")

    # 1. data and model: the model takes [0, 1] pixels, normalization inside
    data = flags.load_data(args)
    model_args = flags.parse_kwargs(args.model_kwargs)
    model = create_pixel_model(args.model, data.num_classes, (data.channels, *data.image_size), model_args,
                               data.class_names)

    # 2. the objective: cross-entropy on adversarial examples from the one attack implementation
    memory = PerturbationMemory.for_training_images(data) if args.method == "atta_at" else None
    objective = make_objective(args.method, eps=args.eps, norm=args.norm, attack_steps=args.attack_steps,
                               eps_warmup=args.eps_warmup, memory=memory)

    # 3. train
    check = flags.epoch_check(data, args, accelerator)  # --keep-best: it also keeps the most robust epoch
    run = train(model, objective, flags.train_loader(data, args, objective=objective), accelerator,
                flags.train_config(args), check)
    model = accelerator.unwrap_model(model)
    selected = check.restore(model) if args.keep_best else None
    if not args.keep_best and (fall := late_fall(run["history"])):
        accelerator.print(fall)

    # 4. evaluate, then save a Hub-format folder
    report = robustness_report(
        model, make_loader(data, "test", args.batch_size, limit=args.eval_examples),
        make_loader(data, "test", args.batch_size, limit=args.sweep_examples),
        **flags.report(args, accelerator))
    metrics = {**report, "method": args.method, "model": args.model, "model_args": model_args,
               "dataset": data.name, "train_seconds": round(run["train_seconds"], 1), "epochs": run["epochs"],
               "steps": run["steps"], "selected_epoch": selected, "hardware": hardware(),
               "num_processes": accelerator.num_processes,
               "history": run["history"]}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_timm_folder(model.model, str(output_dir), model_args, data.class_names)
        save_json(metrics, output_dir / "metrics.json")
        plot_sweeps({args.model: report["sweep"]}, output_dir / "robustness.png", args.norm)
        render_card("teacher", metrics, flags.card_context(args, output_dir, data)).save(output_dir / "README.md")
    robust = ", ".join(f"{k} {v:.1%}" for k, v in report["robust_accuracy"].items())
    accelerator.print(f"{args.model} ({args.method}): clean {report['clean_accuracy']:.1%}, {robust} "
                      f"at {args.norm} eps {args.eps:g}; trained {run['train_seconds']:.0f}s -> {output_dir}")
    if args.push_to_hub and accelerator.is_main_process:
        accelerator.print(f"pushed: {flags.push(args, output_dir)}")
    return metrics


if __name__ == "__main__":
    main()
