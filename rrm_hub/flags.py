"""Command-line flags shared by the recipes, and the helpers that turn them into objects."""

from __future__ import annotations

import argparse
import ast
import errno
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from .align import MODES
from .attacks import NOISES
from .data import ImageData, load_image_data, make_loader
from .errors import RRMError
from .objectives import RRM
from .train import TrainConfig


def parse_kwargs(pairs: list[str] | None) -> dict:
    """`["img_size=28", "patch_size=7"]` -> `{"img_size": 28, "patch_size": 7}` (values as Python literals)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RRMError(f"'{pair}' is not key=value; write pairs such as img_size=28 patch_size=7")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


DEFAULT_STUDENT = "vit_tiny_patch16_224"
DEFAULT_STUDENT_KWARGS = ["img_size=28", "patch_size=7", "depth=4", "embed_dim=96", "num_heads=3"]


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", default=None, help="Hub id (org/name), hf://org/repo/file, folder, weight file "
                       "or timm architecture (default: the bundled MNIST teacher)")
    group.add_argument("--teacher-revision", default=None, help="Hub revision of the teacher")
    group.add_argument("--teacher-checkpoint", default=None, help="weights (.safetensors/.ckpt/.pt path or "
                       "hf://org/repo/path/in/repo) for the architecture named by --teacher or --teacher-arch")
    group.add_argument("--teacher-arch", default=None, help="architecture of a weight-file teacher: NAME, timm:NAME "
                       "or torchvision:NAME (default: guessed from the file name)")
    group.add_argument("--teacher-kwargs", nargs="*", default=None, help="key=value to build --teacher-arch")
    group.add_argument("--teacher-num-classes", type=int, default=None,
                       help="classes of a weight-file teacher (default: rows of its classifier)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run the teacher repo's own model code (only for repos you trust)")


def load_teacher_from(args: argparse.Namespace, device) -> torch.nn.Module:
    """The teacher the teacher flags name, frozen, on `device`."""
    from .teachers import load_teacher

    teacher = load_teacher(args.teacher, revision=args.teacher_revision, checkpoint=args.teacher_checkpoint,
                           arch=args.teacher_arch, model_args=parse_kwargs(args.teacher_kwargs),
                           num_classes=args.teacher_num_classes, trust_remote_code=args.trust_remote_code)
    return teacher.to(device)


def add_student_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("student")
    group.add_argument("--student", default=None, help=f"timm architecture (default: {DEFAULT_STUDENT} with "
                       f"{' '.join(DEFAULT_STUDENT_KWARGS)})")
    group.add_argument("--student-kwargs", nargs="*", default=None, help="key=value for timm.create_model")
    group.add_argument("--student-layer", default=None, help="module of the student to match (default: its "
                       "projected penultimate representation)")


def student_spec(args: argparse.Namespace) -> tuple[str, dict]:
    """The student architecture and its timm kwargs; the default kwargs go with the default student only."""
    kwargs = args.student_kwargs
    if kwargs is None:
        kwargs = DEFAULT_STUDENT_KWARGS if args.student is None else []
    return args.student or DEFAULT_STUDENT, parse_kwargs(kwargs)


def add_match_args(group) -> None:
    """--match (repeatable) and --match-mode, in the recipe's representation group."""
    group.add_argument("--match", action="append", default=None, metavar="TEACHER_LAYER:STUDENT_LAYER[:WEIGHT]",
                       help="match this pair of layers (repeatable; replaces --teacher-layer/--student-layer); "
                       "student layer 'penultimate' (or empty) is the projected penultimate representation; "
                       "weight default 1")
    group.add_argument("--match-mode", choices=MODES, default="pooled",
                       help="pooled: one vector per image; spatial: maps and tokens on a common grid, cosine per "
                       "location (pairs of two vectors stay vectors)")


def match_pairs(args: argparse.Namespace) -> list | None:
    """The `rrm_hub.align.Match` pairs of --match; None when the run matches the one pair of --teacher-layer /
    --student-layer as before (with --match-mode spatial that pair becomes a match, teacher layer None)."""
    from .align import Match, parse_match

    if args.match and (args.teacher_layer or args.student_layer):
        raise RRMError("--match replaces --teacher-layer/--student-layer; give every pair with --match only")
    if args.match:
        return [parse_match(text) for text in args.match]
    if args.match_mode == "spatial":
        return [Match(args.teacher_layer, args.student_layer)]
    return None


def add_rrm_args(parser: argparse.ArgumentParser, cache: bool = True) -> None:
    group = parser.add_argument_group("RRM loss")
    group.add_argument("--ce-weight", type=float, default=None, help="weight of cross-entropy on the images matched "
                       "on (default: 1 for --match-on adversarial, 0.005 as in the reference code otherwise)")
    group.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature mismatch")
    group.add_argument("--feature-loss", choices=["cosine", "l2"], default="cosine")
    group.add_argument("--match-on", choices=RRM.MATCH_ON, default="adversarial",
                       help="adversarial (default): student inputs moved by --match-steps signed-gradient steps "
                       "(--match-attack, --match-attack-loss), one more student forward/backward per step; "
                       "clean: the paper's method; noise: inputs plus random noise (--noise) in the eps-ball")
    group.add_argument("--match-eps", type=float, default=None,
                       help="size of the noise / step for --match-on noise|adversarial (default: --eps)")
    group.add_argument("--noise", choices=NOISES, default="uniform",
                       help="noise of --match-on noise: uniform in the eps-ball, sign (its corners), gaussian "
                       "(standard deviation --match-eps)")
    group.add_argument("--teacher-input", choices=["auto", *RRM.TEACHER_INPUTS], default="auto",
                       help="what the teacher sees: the same perturbed image as the student (matched), or the "
                       "clean image (its clean representation is the target, as in adversarial distillation); "
                       "auto: clean for --match-on adversarial, matched otherwise (the better of each in our study, "
                       "measured with --match-attack-loss mismatch)")
    group.add_argument("--match-steps", type=int, default=1, help="signed-gradient steps of --match-on adversarial "
                       "(1: FGSM with random start; each step costs one student forward/backward)")
    group.add_argument("--match-attack", choices=RRM.ATTACKS, default="fgsm",
                       help="the step of --match-on adversarial: fgsm (FGSM with a random start of eps, projected; "
                       "PGD with --match-steps > 1), n-fgsm (random start of 2 eps, a step of eps, not projected) or "
                       "free (no attack pass: the gradient of the training loss itself, from the step's own backward "
                       "pass, moves each image's perturbation for the next epoch, whatever --match-attack-loss says; "
                       "needs --match-start previous; costs what --match-on clean does)")
    group.add_argument("--match-attack-loss", choices=RRM.ATTACK_LOSSES, default="ce",
                       help="what the step of --match-on adversarial raises: the student's cross-entropy on the "
                       "labels (default, as ARD crafts its examples) or the feature mismatch with the teacher; the "
                       "same cost")
    group.add_argument("--match-start", choices=["random", "previous"], default="previous",
                       help="where each image's matching attack starts: where its attack ended the epoch before "
                       "(previous, default: the steps add up over epochs, as in ATTA; keeps one perturbation per "
                       "training image in CPU memory) or at random (FGSM-RS); the same compute")
    group.add_argument("--match-step-size", type=float, default=None,
                       help="step of the matching attack, as a multiple of --match-eps (default: 0.5 with "
                       "--match-start previous, else the attack's own: 1.25 for fgsm, 1 for n-fgsm, 2.5/steps for "
                       "several steps)")
    group.add_argument("--clean-weight", type=float, default=0.0,
                       help="also match on the clean images with this weight (the student runs on both)")
    group.add_argument("--match-eps-warmup", type=float, default=0.5,
                       help="ramp --match-eps up from 0 over this fraction of training")
    group.add_argument("--kd-weight", type=float, default=0.0, help="weight of logit distillation from the teacher")
    group.add_argument("--kd-temperature", type=float, default=4.0)
    if cache:
        group.add_argument("--cache-teacher", action="store_true",
                           help="compute the teacher's outputs on the clean training images once, keep them on disk "
                           "(reused while dataset, teacher and layer are the same) and look them up instead of "
                           "running the teacher; needs --pad 0 and --match-on clean (or --teacher-input clean)")


def teacher_cache(args: argparse.Namespace, data: ImageData, teacher: torch.nn.Module, layer: str,
                  accelerator: Accelerator):
    """The `TeacherCache` that `--cache-teacher` asks for, on the training device, or None.

    The main process reads or builds and saves it first; the other processes then read its file.
    """
    from .teacher_cache import CLEAN_ONLY, load_or_build

    if not getattr(args, "cache_teacher", False):
        return None
    if args.pad or args.hflip:
        raise RRMError("--cache-teacher needs the training images unaugmented: add --pad 0 (and no --hflip), "
                       "or drop --cache-teacher")
    if args.match_on != "clean" and teacher_input(args) == "matched":
        raise RRMError(CLEAN_ONLY.format(match_on=args.match_on))
    with accelerator.main_process_first():
        cache = load_or_build(teacher, layer, data, args.batch_size, revision=args.teacher_revision,
                              num_workers=args.num_workers, log=accelerator.print)
    return cache.to(accelerator.device)


def perturbation_memory(args: argparse.Namespace, data: ImageData):
    """The `PerturbationMemory` of `--match-start previous` for the training images, or None."""
    from .memory import PerturbationMemory, refuse_carry

    if args.match_on != "adversarial":
        return None
    carried = args.match_start == "previous"
    if args.match_steps == 1:  # several steps: RRM says n-fgsm and free take one
        refuse_carry(args.match_attack, carried)  # before the teacher cache is built
    return PerturbationMemory.for_training_images(data) if carried else None


def teacher_input(args: argparse.Namespace) -> str:
    """--teacher-input, with auto resolved: the clean image for adversarial matching, the matched one otherwise."""
    if args.teacher_input != "auto":
        return args.teacher_input
    return "clean" if args.match_on == "adversarial" else "matched"


def rrm_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `rrm_hub.RRM` from the RRM loss flags."""
    return {"ce_weight": args.ce_weight, "feature_weight": args.feature_weight, "kind": args.feature_loss,
            "match_on": args.match_on, "eps": args.eps if args.match_eps is None else args.match_eps,
            "norm": args.norm, "kd_weight": args.kd_weight, "temperature": args.kd_temperature,
            "eps_warmup": args.match_eps_warmup, "noise": args.noise, "teacher_input": teacher_input(args),
            "clean_weight": args.clean_weight, "steps": args.match_steps,
            "attack": args.match_attack, "attack_loss": args.match_attack_loss, "step_size": args.match_step_size}


def add_data_args(parser: argparse.ArgumentParser, pad: int = 2) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None, help="Hub dataset id, save_to_disk folder or imagefolder "
                       "(default: the embedded 5,000 MNIST digits)")
    group.add_argument("--dataset-config", default=None, help="dataset configuration name, if it has several")
    group.add_argument("--image-column", default=None, help="image column (default: found from the features)")
    group.add_argument("--label-column", default=None, help="label column (default: found from the features)")
    group.add_argument("--train-split", default="train")
    group.add_argument("--test-split", default=None, help="default: test or validation, else 20%% of train")
    group.add_argument("--image-size", type=int, default=None, help="resize images to this size (default: as is)")
    group.add_argument("--pad", type=int, default=pad, help=f"random-shift augmentation in pixels (0: none; default "
                       f"{pad})")
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
    group.add_argument("--save-every", type=int, default=0, help="also checkpoint every N optimizer steps into "
                       "OUTPUT_DIR/checkpoints/ (0: at each epoch end only)")
    group.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints to keep (the latest ones)")
    group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue the run from the latest checkpoint in --output-dir, or from CHECKPOINT")
    group.add_argument("--compile", action="store_true", help="torch.compile the student (inductor)")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format (CNN students)")


def add_eval_args(parser: argparse.ArgumentParser, eps: float = 0.3) -> None:
    group = parser.add_argument_group("threat model and evaluation")
    group.add_argument("--eps", type=float, default=eps, help="attack budget in [0, 1] pixel space")
    group.add_argument("--norm", choices=["linf", "l2"], default="linf")
    group.add_argument("--suite", choices=["pgd", "standard"], default="pgd", help="final evaluation: pgd (PGD-20, "
                       "fast) or standard (AutoAttack's APGD-CE, APGD-T and Square; worst case per example)")
    group.add_argument("--eval-steps", type=int, default=None, help="steps of the suite's gradient attacks "
                       "(default: 20 for pgd, 100 for standard)")
    group.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    group.add_argument("--eval-examples", type=int, default=500, help="test images for the final numbers and "
                       "the gradient-masking checks (0: all)")
    group.add_argument("--sweep-examples", type=int, default=500, help="test images for the epsilon sweep")
    group.add_argument("--eps-sweep", type=float, nargs="+", default=None, help="epsilons of the sweep, as in "
                       "recipes/evaluate.py (default: 0.25, 0.5, 0.75, 1 and 1.5 x --eps)")
    group.add_argument("--sweep-steps", type=int, default=10, help="PGD steps of the epsilon sweep")
    group.add_argument("--epoch-eval-examples", type=int, default=256,
                       help="test images for the per-epoch check (0: no per-epoch check; with --holdout the check "
                       "runs on all held-out images)")
    group.add_argument("--holdout", type=int, default=0, help="hold this many training images out of training "
                       "(seeded); the per-epoch check then runs on all of them instead of on test images")
    group.add_argument("--keep-best", action="store_true", help="end with the weights of the epoch whose per-epoch "
                       "check had the highest robust accuracy (against robust overfitting; needs --holdout)")


def load_data(args: argparse.Namespace) -> ImageData:
    """The dataset named by the data flags (with `--holdout` images moved out of its training split)."""
    data = load_image_data(args.dataset, config=args.dataset_config, image_column=args.image_column,
                           label_column=args.label_column, train_split=args.train_split,
                           test_split=args.test_split, image_size=args.image_size, seed=args.seed)
    return data.hold_out(args.holdout, args.seed) if getattr(args, "holdout", 0) else data


def train_loader(data: ImageData, args: argparse.Namespace, augment: bool = True, objective=None) -> DataLoader:
    """The shuffled training loader for the data and training flags; `augment=False` drops --pad and --hflip.
    Its batches carry the images' origins where `objective` keeps a perturbation memory."""
    return make_loader(data, "train", args.batch_size, augment=augment, seed=args.seed, pad=args.pad,
                       hflip=args.hflip, num_workers=args.num_workers,
                       origins=getattr(objective, "memory", None) is not None)


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sharing on the Hub")
    group.add_argument("--push-to-hub", action="store_true", help="upload the output folder when done")
    group.add_argument("--hub-model-id", default=None, help="user/name of the model repo")
    group.add_argument("--hub-private", action="store_true", help="create the repo as private")
    group.add_argument("--hub-revision", default=None, help="branch to push to (created if needed)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, script: str, *, epochs: int,
          lr: float, pad: int = 2, hub: bool = True) -> argparse.Namespace:
    """Add the shared flag groups to a recipe's `parser`, parse `argv`, check them, record the command."""
    add_data_args(parser, pad)
    add_train_args(parser, epochs=epochs, lr=lr)
    add_eval_args(parser)
    if hub:
        add_hub_args(parser)
    args = parser.parse_args(argv)
    if getattr(args, "push_to_hub", False) and not args.hub_model_id:
        raise RRMError("--push-to-hub needs --hub-model-id user/name")
    check_counts(args)
    if args.keep_best and not (args.holdout and args.epoch_eval_examples):
        raise RRMError("--keep-best chooses an epoch by its robust accuracy on held-out training images: add "
                       "--holdout N (e.g. 500), and keep --epoch-eval-examples above 0")
    if args.holdout and not args.epoch_eval_examples:
        raise RRMError("--holdout keeps images out of training for the per-epoch check, which "
                       "--epoch-eval-examples 0 turns off: drop one of them")
    args.command = command_line(script, argv)
    return args


def check_counts(args: argparse.Namespace) -> None:
    """Refuse counts and sizes that cannot be meant (negative examples, zero steps, a negative epsilon)."""
    for name in ("eval_examples", "sweep_examples", "epoch_eval_examples", "match_eps", "holdout"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise RRMError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if getattr(args, "eps_sweep", None) and min(args.eps_sweep) < 0:
        raise RRMError(f"--eps-sweep values must be >= 0, got {min(args.eps_sweep)}")
    for name in ("eval_steps", "preflight_steps", "sweep_steps", "match_steps", "grad_accum", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise RRMError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def push(args: argparse.Namespace, output_dir) -> str:
    """Upload `output_dir` as the hub flags say; returns the commit URL."""
    from .hub import push_folder

    return push_folder(output_dir, args.hub_model_id, private=args.hub_private, revision=args.hub_revision)


def card_context(args: argparse.Namespace, output_dir, data: ImageData) -> dict:
    """What every card shows about the run: names, flags and the exact command."""
    return {"model_name": output_dir.name, "repo_id": args.hub_model_id or f"<user>/{output_dir.name}",
            "dataset": data.name, "args": vars(args), "command": args.command}


def epoch_check(data: ImageData, args: argparse.Namespace, accelerator: Accelerator, save_best: bool = True):
    """The per-epoch check the flags ask for (clean and PGD-10 on a few test images, or on the held-out training
    images), or None; with --keep-best a `BestEpoch` that also keeps the most robust epoch's weights (on disk
    beside the checkpoints, so that --resume keeps the choice, unless `save_best` is False)."""
    from .attacks import pgd
    from .checkpoints import resolve as resolve_checkpoint
    from .evaluate import epoch_check as make_check
    from .selection import BestEpoch

    if not args.epoch_eval_examples:
        return None
    held_out = data.holdout is not None
    loader = make_loader(data, "holdout" if held_out else "test", args.batch_size,
                         limit=None if held_out else args.epoch_eval_examples)
    attack = pgd(args.eps, args.norm, 10)
    check = make_check(loader, attack, accelerator)
    if not args.keep_best:
        return check
    root = Path(args.output_dir) / "checkpoints" if save_best else None  # beside the run's checkpoints
    previous = resolve_checkpoint(args.resume, root).parent if args.resume and root else None
    return BestEpoch(check, attack.name, root, previous, main_process=accelerator.is_main_process)


def report(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Keyword arguments of `rrm_hub.evaluate.robustness_report` from the evaluation flags."""
    return {"eps": args.eps, "norm": args.norm, "suite": args.suite, "steps": args.eval_steps,
            "checks": not args.no_checks, "accelerator": accelerator, "sweep_eps": args.eps_sweep,
            "sweep_steps": args.sweep_steps}


def train_config(args: argparse.Namespace) -> TrainConfig:
    if args.eps < 0:
        raise RRMError(f"--eps must be >= 0, got {args.eps}")
    if args.epochs < 1 or (args.max_steps is not None and args.max_steps < 1) or args.batch_size < 1:
        raise RRMError("--epochs, --max-steps and --batch-size must be >= 1")
    if args.save_every < 0 or args.keep_checkpoints < 1:
        raise RRMError("--save-every must be >= 0 and --keep-checkpoints >= 1")
    return TrainConfig(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay,
                       optimizer=args.optimizer, warmup_fraction=args.warmup, output_dir=args.output_dir,
                       save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
                       channels_last=args.channels_last)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An `Accelerator` for the flags; seeds every process identically.

    Refuses a launch that started several processes which would each train alone (accelerate's
    `--multi_gpu` on a machine without GPUs does that): duplicated work and two writers of one folder.
    """
    accelerator = Accelerator(mixed_precision=getattr(args, "mixed_precision", "no"),
                              gradient_accumulation_steps=getattr(args, "grad_accum", 1),
                              dynamo_backend="inductor" if getattr(args, "compile", False) else "no",
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RRMError(f"{os.environ['WORLD_SIZE']} processes were started but each would train alone; on CPUs "
                       "launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...")
    set_seed(args.seed)
    return accelerator


def output_folder(args: argparse.Namespace, default: str) -> Path:
    """The output folder (`--output-dir` or `default`), checked to be writable before any work starts."""
    path = Path(args.output_dir or default)
    args.output_dir = str(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RRMError(f"cannot write to the output folder '{path}' ({err.strerror or err} at '{existing}'); "
                       "choose another --output-dir") from None
    return path


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run: `python recipes/<script> <flags>`, for model cards."""
    flags = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", f"recipes/{Path(script).name}", *flags])
