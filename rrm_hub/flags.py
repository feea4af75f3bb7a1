"""Command-line flags shared by the recipes, and the helpers that turn them into objects."""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from .data import ImageData, load_image_data, make_loader
from .errors import RRMError
from .train import TrainConfig


def parse_kwargs(pairs: list[str] | None) -> dict:
    """`["img_size=28", "patch_size=7"]` -> `{"img_size": 28, "patch_size": 7}` (values as Python literals)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RRMError(f"'{pair}' is not key=value; write e.g. --student-kwargs img_size=28 patch_size=7")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None, help="Hub dataset id, save_to_disk folder or imagefolder "
                       "(default: the embedded 5,000 MNIST digits)")
    group.add_argument("--dataset-config", default=None, help="dataset configuration name, if it has several")
    group.add_argument("--image-column", default=None, help="image column (default: found from the features)")
    group.add_argument("--label-column", default=None, help="label column (default: found from the features)")
    group.add_argument("--train-split", default="train")
    group.add_argument("--test-split", default=None, help="default: test or validation, else 20%% of train")
    group.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: as is)")
    group.add_argument("--pad", type=int, default=2, help="random-shift augmentation in pixels (0: none)")
    group.add_argument("--hflip", action="store_true", help="random horizontal flips (not for digits)")
    group.add_argument("--num-workers", type=int, default=0)


def add_train_args(parser: argparse.ArgumentParser, epochs: int, lr: float, batch_size: int = 128) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    group.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    group.add_argument("--lr", type=float, default=lr)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    group.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of all steps")
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    group.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--output-dir", default=None)


def add_eval_args(parser: argparse.ArgumentParser, eps: float = 0.3) -> None:
    group = parser.add_argument_group("threat model and evaluation")
    group.add_argument("--eps", type=float, default=eps, help="attack budget in [0, 1] pixel space")
    group.add_argument("--norm", choices=["linf", "l2"], default="linf")
    group.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the final evaluation")
    group.add_argument("--eval-restarts", type=int, default=1)
    group.add_argument("--eval-examples", type=int, default=None, help="test images for the final numbers "
                       "(default: all)")
    group.add_argument("--sweep-examples", type=int, default=500, help="test images for the epsilon sweep")
    group.add_argument("--epoch-eval-examples", type=int, default=256,
                       help="test images for the per-epoch check (0: no per-epoch check)")


def load_data(args: argparse.Namespace) -> ImageData:
    """The dataset named by the data flags."""
    return load_image_data(args.dataset, config=args.dataset_config, image_column=args.image_column,
                           label_column=args.label_column, train_split=args.train_split,
                           test_split=args.test_split, image_size=args.image_size, seed=args.seed)


def train_loader(data: ImageData, args: argparse.Namespace) -> DataLoader:
    """The shuffled, augmented training loader for the data and training flags."""
    return make_loader(data, "train", args.batch_size, augment=True, seed=args.seed, pad=args.pad,
                       hflip=args.hflip, num_workers=args.num_workers)


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharing on the Hub")
    group.add_argument("--push-to-hub", action="store_true", help="upload the output folder when done")
    group.add_argument("--hub-model-id", default=None, help="user/name of the model repo")
    group.add_argument("--hub-private", action="store_true", help="create the repo as private")
    group.add_argument("--hub-revision", default=None, help="branch to push to (created if needed)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, script: str, *, epochs: int,
          lr: float) -> argparse.Namespace:
    """Add the shared flag groups to a recipe's `parser`, parse `argv`, check them, record the command."""
    add_data_args(parser)
    add_train_args(parser, epochs=epochs, lr=lr)
    add_eval_args(parser)
    add_hub_args(parser)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise RRMError("--push-to-hub needs --hub-model-id user/name")
    args.command = command_line(script, argv)
    return args


def push(args: argparse.Namespace, output_dir) -> str:
    """Upload `output_dir` as the hub flags say; returns the commit URL."""
    from .hub import push_folder

    return push_folder(output_dir, args.hub_model_id, private=args.hub_private, revision=args.hub_revision)


def card_context(args: argparse.Namespace, output_dir, data: ImageData) -> dict:
    """What every card shows about the run: names, flags and the exact command."""
    return {"model_name": output_dir.name, "repo_id": args.hub_model_id or f"<user>/{output_dir.name}",
            "dataset": data.name, "args": vars(args), "command": args.command}


def epoch_check(data: ImageData, args: argparse.Namespace, accelerator: Accelerator):
    """The per-epoch check the flags ask for (clean and PGD-10 on a few test images), or None."""
    from .attacks import pgd
    from .evaluate import epoch_check as make_check

    if not args.epoch_eval_examples:
        return None
    loader = make_loader(data, "test", args.batch_size, limit=args.epoch_eval_examples)
    return make_check(loader, pgd(args.eps, args.norm, 10), accelerator)


def train_config(args: argparse.Namespace) -> TrainConfig:
    if args.eps < 0:
        raise RRMError(f"--eps must be >= 0, got {args.eps}")
    if args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1) or args.batch_size < 1:
        raise RRMError("--epochs, --max-steps and --batch-size must be >= 1")
    return TrainConfig(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay,
                       optimizer=args.optimizer, warmup_fraction=args.warmup)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An `Accelerator` for the flags; seeds every process identically."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)
    return accelerator


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run: `python recipes/<script> <flags>`, for model cards."""
    flags = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", f"recipes/{Path(script).name}", *flags])
