"""The objects a run is made of, each built from its config section: accelerator, output folder, data and loaders,
per-epoch check, perturbation memory, teacher cache, and what ends training (the epoch kept)."""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader

from .config import DataConfig, EvalConfig, RRMConfig, TrainConfig
from .data import ImageData, ModelInput, load_image_data, make_loader
from .errors import RRMError
from .sections import MAX_EPOCH_CHECKS, SMOKE_RUN_IMAGES
from .streaming import stream_length


def make_accelerator(training: TrainConfig) -> Accelerator:
    """An `Accelerator` for the training settings; seeds every process identically.

    Refuses a launch that started several processes which would each train alone (accelerate's
    `--multi_gpu` on a machine without GPUs does that): duplicated work and two writers of one folder.
    """
    if training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RRMError("--mixed-precision fp16 needs a GPU (on a CPU it would silently run in float32); use "
                       "--mixed-precision bf16 or no")
    accelerator = Accelerator(mixed_precision=training.mixed_precision,
                              gradient_accumulation_steps=training.grad_accum,
                              dynamo_backend="inductor" if training.compile else "no",
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RRMError(f"{os.environ['WORLD_SIZE']} processes were started but each would train alone; on CPUs "
                       "launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...")
    set_seed(training.seed)
    return accelerator


def output_folder(path: str | Path) -> Path:
    """`path`, checked to be writable before any work starts."""
    path = Path(path)
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


def load_data(data: DataConfig, seed: int, holdout: int = 0, model_input: ModelInput | None = None) -> ImageData:
    """The dataset the data settings name, seen as `model_input` says (the model's own size and crop, for natural
    images), with `holdout` seeded training images moved out of its training split."""
    images = load_image_data(data.dataset, config=data.dataset_config, image_column=data.image_column,
                             label_column=data.label_column, train_split=data.train_split,
                             test_split=data.test_split, image_size=data.image_size, seed=seed,
                             augment=data.augment, model_input=model_input, streaming=data.streaming,
                             max_bad_images=data.max_bad_images)
    return images.hold_out(holdout, seed) if holdout else images


def train_loader(images: ImageData, data: DataConfig, training: TrainConfig, augment: bool = True,
                 objective=None) -> DataLoader:
    """The shuffled training loader; `augment=False` drops the training augmentation. Its batches carry the images'
    origins where `objective` uses them (a perturbation memory)."""
    stream = stream_length(images, training.capped_images(world_size())) if images.streaming else None
    return make_loader(images, "train", training.batch_size, augment=augment, seed=training.seed, pad=data.pad,
                       hflip=data.hflip, num_workers=data.num_workers, auto_augment=data.auto_augment,
                       origins=bool(getattr(objective, "uses_origins", False)), shuffle_buffer=data.shuffle_buffer,
                       stream_images=stream)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def test_loader(images: ImageData, batch_size: int, limit: int | None) -> DataLoader:
    return make_loader(images, "test", batch_size, limit=limit)


def evaluation_loaders(images: ImageData, evaluation: EvalConfig,
                       batch_size: int) -> tuple[DataLoader, DataLoader | None]:
    """The test loaders of the final numbers and of the epsilon sweep (None: no sweep) for scaled settings
    (`evaluation_for_run`)."""
    sweep = test_loader(images, batch_size, evaluation.sweep_examples) if evaluation.sweeps else None
    return test_loader(images, batch_size, evaluation.eval_examples), sweep


def images_trained(images: ImageData, training: TrainConfig, processes: int = 1) -> int:
    """How many training images a run's steps go through: its epochs, or fewer under --max-steps."""
    capped = training.capped_images(processes)
    planned = training.epochs * (images.train_size or stream_length(images, capped))
    return min(planned, capped) if capped else planned


def evaluation_for_run(evaluation: EvalConfig, images: ImageData, training: TrainConfig,
                       accelerator: Accelerator) -> EvalConfig:
    """The evaluation settings scaled to the run (`EvalConfig.for_run`); a line says what a smoke run leaves out."""
    trained = images_trained(images, training, accelerator.num_processes)
    scaled = evaluation.for_run(trained)
    skipped = [what for what, off in (("per-epoch check", scaled.epoch_eval_examples == 0),
                                      ("epsilon sweep", not scaled.sweeps),
                                      ("gradient-masking checks", scaled.no_checks)) if off]
    if trained < SMOKE_RUN_IMAGES and skipped:
        accelerator.print(f"smoke run ({trained} images trained): final numbers on {scaled.eval_examples} test "
                          f"images, no {', '.join(skipped)}")
    return scaled


class Periodic:
    """A per-epoch check run every `period` epochs and at epoch `last` (others record nothing); the check's own
    methods (`BestEpoch.restore`) pass through."""

    def __init__(self, check, period: int, last: int):
        self.check, self.period, self.last = check, period, last

    def __call__(self, epoch: int, model: nn.Module) -> dict:
        due = (epoch + 1) % self.period == 0 or epoch + 1 >= self.last
        return self.check(epoch, model) if due else {}

    def __getattr__(self, name: str):
        return getattr(self.check, name)


def epoch_check(images: ImageData, evaluation: EvalConfig, training: TrainConfig, accelerator: Accelerator,
                save_best: bool = True):
    """The per-epoch check the settings ask for (clean and PGD-10 on a few test images, or on the held-out training
    images; at most `MAX_EPOCH_CHECKS` times a run, always after the last epoch), or None; with --keep-best a
    `BestEpoch` that also keeps the most robust epoch's weights (on disk beside the checkpoints, so that --resume
    keeps the choice, unless `save_best` is False). Defaults left open are scaled to the run first."""
    from .attacks import pgd
    from .checkpoints import resolve as resolve_checkpoint
    from .evaluate import epoch_check as make_check
    from .selection import BestEpoch

    trained = images_trained(images, training, accelerator.num_processes)
    evaluation = evaluation.for_run(trained)
    if not evaluation.epoch_eval_examples:
        return None
    held_out = images.holdout is not None
    loader = make_loader(images, "holdout" if held_out else "test", training.batch_size,
                         limit=None if held_out else evaluation.epoch_eval_examples)
    attack = pgd(evaluation.eps, evaluation.norm, 10)
    check = make_check(loader, attack, accelerator)
    epochs = math.ceil(trained / (images.train_size or trained))
    if evaluation.keep_best:
        root = Path(training.output_dir) / "checkpoints" if save_best and training.output_dir else None
        previous = resolve_checkpoint(training.resume, root).parent if training.resume and root else None
        check = BestEpoch(check, attack.name, root, previous, main_process=accelerator.is_main_process)
    return Periodic(check, math.ceil(epochs / MAX_EPOCH_CHECKS), epochs)


def finish_training(model: nn.Module, run: dict, check, evaluation: EvalConfig, accelerator: Accelerator):
    """The trained model, unwrapped and in eval mode, with the kept epoch's weights under --keep-best (returned
    with it: which epoch, or None); otherwise a note when the per-epoch check fell late in training."""
    from .selection import late_fall

    model = accelerator.unwrap_model(model).eval()
    if evaluation.keep_best:
        return model, check.restore(model)
    if fall := late_fall(run["history"]):
        accelerator.print(fall)
    return model, None


def report_options(evaluation: EvalConfig, accelerator: Accelerator) -> dict:
    """Keyword arguments of `rrm_hub.evaluate.robustness_report` from the evaluation settings."""
    return {"eps": evaluation.eps, "norm": evaluation.norm, "suite": evaluation.suite, "steps": evaluation.eval_steps,
            "checks": not evaluation.no_checks, "accelerator": accelerator, "sweep_eps": evaluation.eps_sweep,
            "sweep_steps": evaluation.sweep_steps}


def perturbation_memory(method: str, images: ImageData, rrm: RRMConfig | None = None, log=print):
    """The `PerturbationMemory` that `method` carries over epochs for the training images (ATTA-AT's; RRM's and the
    robust distillation methods' with `--match-start previous`), or None. Where a distillation method's cannot be
    kept (too large, a stream, random-resized crops), its attacks start at random instead, and `log` says why in one
    line; ATTA-AT, chosen for its memory, refuses."""
    from .memory import PerturbationMemory

    carried = method == "atta_at" or (rrm is not None and rrm.carries(method))
    if not carried:
        return None
    reason = PerturbationMemory.unavailable(images)
    if method != "atta_at" and reason and rrm.attack != "free":
        log(f"--match-start random instead of previous: {reason}")
        return None
    return PerturbationMemory.for_training_images(images)


def teacher_cache(teacher: nn.Module, layer: str, images: ImageData, batch_size: int, revision: str | None,
                  num_workers: int, accelerator: Accelerator):
    """The `TeacherCache` of the teacher's outputs on the clean training images, on the training device. The main
    process reads or builds and saves it first; the other processes then read its file."""
    from .teacher_cache import load_or_build

    with accelerator.main_process_first():
        cache = load_or_build(teacher, layer, images, batch_size, revision=revision, num_workers=num_workers,
                              log=accelerator.print)
    return cache.to(accelerator.device)
