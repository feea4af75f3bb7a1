"""Loaders of ([0, 1] pixels, label) over one split of an `ImageData`, augmented as the run asks, seeded so that any
process, worker or resumed run sees the same images; unreadable images skipped (`rrm_hub.data.unreadable`)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..errors import RRMError
from .images import ImageData
from .streaming import PixelStream
from .transforms import RandomShift, build_transform, timm_transform, to_mode
from .unreadable import UNREADABLE, collate_readable, decode, raw, where


class PixelDataset(Dataset):
    """A Hugging Face dataset seen as (pixels in [0, 1], label) pairs, or with `origins` (pixels, label, origin)
    triples: origin = (index, dy, dx, flipped), which image this is and how its augmentation moved it (see
    `RandomShift.draw`; what `rrm_hub.memory.PerturbationMemory` needs).

    Images are converted to the dataset's mode (`ImageData.image_mode`), so a grayscale image in an RGB
    dataset is repeated over three channels. With `seed`, the random augmentation of an example depends only on
    (seed, epoch, index): the same in any process, worker or resumed run (`set_epoch` moves it on). An image that
    cannot be read is logged in `unreadable` and replaced by the next readable one (`substitute`, for training) or
    given as None (`rrm_hub.unreadable.collate_readable` leaves it out).
    """

    def __init__(self, data: ImageData, split: str, transform: transforms.Compose, limit: int | None = None,
                 seed: int | None = None, augment: RandomShift | None = None, origins: bool = False,
                 substitute: bool = False):
        rows = data.rows(split)
        if rows is None:
            raise RRMError(f"no '{split}' split: use train, test, holdout after ImageData.hold_out, or unlabeled "
                           "(--unlabeled-split)")
        if limit and limit < len(rows):  # None or 0: all
            rows = rows.select(range(limit))
        self.rows, self.split, self.unreadable = raw(rows, data.image_column), split, data.unreadable_log(split)
        self.image_column, self.label_column = data.image_column, data.label_column
        self.mode, self.transform, self.augment = data.image_mode, transform, augment
        self.seed, self.epoch, self.origins, self.substitute = seed, 0, origins, substitute

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _readable_row(self, index: int) -> tuple[int, Image.Image | None, int]:
        """(index, image, label) of row `index`, or with `substitute` of the next readable row (image None when
        `index` cannot be read and nothing is substituted); label -1 where the rows have none (unlabeled images)."""
        for offset in range(len(self.rows)):
            at = (index + offset) % len(self.rows)
            row = self.rows[at]
            try:
                return at, decode(row[self.image_column]), int(row.get(self.label_column, -1))
            except UNREADABLE as err:
                self.unreadable.record(at, where(row[self.image_column], f"{self.split}[{at}]"), err)
                if not self.substitute:
                    return at, None, int(row.get(self.label_column, -1))
        raise RRMError(f"no image of the {self.split} split can be read; check the files")

    def __getitem__(self, index: int) -> tuple | None:
        index, image, label = self._readable_row(index)
        if image is None:
            return None
        pixels = self.transform(to_mode(image, self.mode))
        move = (0, 0, False)
        if self.augment is not None:
            seed = None if self.seed is None else (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            move = self.augment.draw(random.Random(seed))
            pixels = self.augment.apply(pixels, *move)
        if self.origins:
            return pixels, label, torch.tensor([index, *move], dtype=torch.long)
        return pixels, label


def make_loader(
    data: ImageData,
    split: str,
    batch_size: int,
    *,
    augment: bool = False,
    limit: int | None = None,
    seed: int = 0,
    num_workers: int | None = 0,
    pad: int = 2,
    hflip: bool = False,
    origins: bool = False,
    auto_augment: str | None = None,
    shuffle_buffer: int = 10_000,
    stream_images: int | None = None,
) -> DataLoader:
    """A DataLoader over one split; the train and unlabeled splits are shuffled with a seeded generator. With
    `augment` the training views are `data.augment`'s: timm's random-resized crops (with `auto_augment`), or shifts
    of `pad` pixels and `hflip` flips. With `origins` its batches are (pixels, labels, origins), see `PixelDataset`.
    `num_workers` None: `workers`' default; memory is pinned where a GPU is. A streamed training split is
    shuffled through `shuffle_buffer` images, `stream_images` (default: all) an epoch."""
    shift, cropped = None, augment and data.augment == "timm"
    if cropped or data.framing == "crop":
        transform = timm_transform(data.image_size, cropped, crop_pct=data.crop_pct,
                                   interpolation=data.interpolation, auto_augment=auto_augment)
    else:
        transform = build_transform(data.image_size)
    if augment and data.augment == "shift" and (pad > 0 or hflip):
        shift = RandomShift(pad, hflip)
    if split == "train" and data.streaming:
        if origins:
            raise RRMError("streamed images have no index to keep a perturbation by: use --match-start random")
        stream = PixelStream(data.train, data.image_column, data.label_column, data.image_mode, transform,
                             stream_images or data.train_size, seed, shuffle_buffer, shift,
                             data.unreadable_log("train"))
        return DataLoader(stream, batch_size=batch_size, num_workers=workers(num_workers, data),
                          pin_memory=torch.cuda.is_available())
    shuffle = split in ("train", "unlabeled")
    dataset = PixelDataset(data, split, transform, limit, seed=seed, augment=shift, origins=origins,
                           substitute=shuffle)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    count = workers(num_workers, data)
    # workers kept alive between epochs, unless the augmentation follows the epoch (PixelDataset.set_epoch)
    persistent = count > 0 and shuffle and shift is None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=count,
        drop_last=False, pin_memory=torch.cuda.is_available(), persistent_workers=persistent,
        collate_fn=None if shuffle else collate_readable,
    )


class ShuffledPasses:
    """The images of a `make_loader` loader (its dataset, batch size, workers), pass after pass, each pass shuffled
    and its augmentation drawn by (`seed`, pass) alone, so that the stream can start anywhere: `batches(start)`
    gives the pixel batches from the stream's `start`-th image on (the first batch cut to begin there) without
    reading the images before it, the images a stream read from 0 gives there. A resumed run draws what the stopped
    one would have: the same images in the same order, and the same views where the augmentation is seeded per
    image (shifts and flips of small images); timm's random crops, drawn from the random state of the process or
    worker that reads them, differ. Each pass starts a new DataLoader (its workers too)."""

    def __init__(self, loader: DataLoader, seed: int):
        self.loader, self.seed = loader, seed

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def generator(self, epoch: int) -> torch.Generator:
        """The random numbers of pass `epoch`: its order, and its loader workers' seeds."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def order(self, epoch: int) -> list[list[int]]:
        """The batches of image indices of pass `epoch`."""
        shuffle = self.generator(epoch)
        return [chunk.tolist() for chunk in torch.randperm(len(self), generator=shuffle).split(self.loader.batch_size)]

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(start, len(self))
        while True:
            skip, cut = divmod(offset, self.loader.batch_size)
            dataset = self.loader.dataset
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            # the workers' seeds come from the pass too, not from the run's random state
            passing = DataLoader(dataset, batch_sampler=self.order(epoch)[skip:],
                                 num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory,
                                 generator=self.generator(epoch))
            for pixels, *_ in passing:
                yield pixels[cut:]
                cut = 0
            epoch, offset = epoch + 1, 0


def workers(count: int | None, data: ImageData) -> int:
    """`count`, or by default: the machine's (`default_workers`) for photos, none for small images, whose decoding
    costs less than the workers' own overhead (the embedded default runs 4% faster on two cores without them)."""
    if count is not None:
        return count
    return default_workers() if data.framing == "crop" else 0


def default_workers() -> int:
    """Loader workers for this process: the CPU cores it may use, shared among the processes of this machine, up
    to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
