"""The builders of training: the training loader, the per-epoch check (with --keep-best, the epoch kept) and what
ends training; between them the one loop, `rrm_hub.training.train`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..attacks import pgd
from ..config.sections import MAX_EPOCH_CHECKS, DataConfig, EvalConfig, TrainConfig
from ..data.images import ImageData
from ..data.loaders import ShuffledPasses, make_loader
from ..data.streaming import stream_length
from ..evaluation.evaluate import epoch_check as make_check
from ..training.checkpoints import resolve as resolve_checkpoint
from ..training.selection import BestEpoch, late_fall


def train_loader(images: ImageData, data: DataConfig, training: TrainConfig, augment: bool = True,
                 objective=None) -> DataLoader:
    """The shuffled training loader; `augment=False` drops the training augmentation. Its batches carry the images'
    origins where `objective` uses them (a perturbation memory)."""
    stream = stream_length(images, training.capped_images(world_size())) if images.streaming else None
    return make_loader(images, "train", training.batch_size, augment=augment, seed=training.seed, pad=data.pad,
                       hflip=data.hflip, num_workers=data.num_workers, auto_augment=data.auto_augment,
                       origins=bool(getattr(objective, "uses_origins", False)), shuffle_buffer=data.shuffle_buffer,
                       stream_images=stream)


def unlabeled_loader(images: ImageData, data: DataConfig, training: TrainConfig, share: float,
                     process: int = 0) -> ShuffledPasses:
    """The unlabeled images (`ImageData.unlabeled`) shuffled pass after pass, augmented as the training images,
    `share` of a training batch at a time; each process draws its own (seeded by `process`)."""
    seed = training.seed + 1 + process
    loader = make_loader(images, "unlabeled", max(1, round(share * training.batch_size)), augment=True, seed=seed,
                         pad=data.pad, hflip=data.hflip, num_workers=data.num_workers, auto_augment=data.auto_augment)
    return ShuffledPasses(loader, seed)


def world_size() -> int:
    """The processes of the launch (accelerate and torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def images_trained(images: ImageData, training: TrainConfig, processes: int = 1) -> int:
    """How many training images a run's steps go through: its epochs, or fewer under --max-steps."""
    capped = training.capped_images(processes)
    planned = training.epochs * (images.train_size or stream_length(images, capped))
    return min(planned, capped) if capped else planned


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
    model = accelerator.unwrap_model(model).eval()
    if evaluation.keep_best:
        return model, check.restore(model)
    if fall := late_fall(run["history"]):
        accelerator.print(fall)
    return model, None
