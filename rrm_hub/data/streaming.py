"""`--streaming`: training images read as a stream (`datasets` iterable datasets) for Hub datasets too large to
download, shuffled through a buffer; the test images are the first ones of the test split, read into memory.

An epoch of a stream is seeded by (seed, epoch), so a resumed run that skips the batches it has done sees the same
stream as a run never stopped (`rrm_hub.train` skips them).
"""

from __future__ import annotations

import math
import random

import datasets
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import RRMError
from . import splits
from .transforms import to_mode
from .unreadable import UNREADABLE, decode, raw, where

TEST_IMAGES = 1000
"""Test images read from the start of a streamed test split (or split off the start of the training stream)."""
SAMPLE = 64
"""Training images read first to find the columns, the classes, the mode and the size of the images."""


def open_stream(spec: str, config: str | None, train_split: str, test_split: str | None, tests: tuple[str, ...]):
    """(training stream, test images, a sample of training images, the number of training images if known): an
    `IterableDataset`, two `Dataset`s and an int or None."""
    try:
        loaded = datasets.load_dataset(spec, config, streaming=True)
    except Exception as err:  # datasets raises many types for "not there"
        raise RRMError(f"could not stream dataset '{spec}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                       "--streaming reads Hub datasets and folders of data files (parquet, images); drop it for a "
                       "folder saved with save_to_disk") from None
    train = splits.pick(loaded, train_split, "--train-split")
    train_name = splits.parse(train_split, "--train-split")[0]
    if test_split is not None:
        test = splits.pick(loaded, test_split, "--test-split").take(TEST_IMAGES)
    else:
        named = next((name for name in tests if name in loaded and name != train_name), None)
        test = loaded[named].take(TEST_IMAGES) if named else None
    info = train.info.splits.get(train_name) if train.info and train.info.splits else None
    length = splits.stream_length(train_split, info.num_examples if info and info.num_examples else None)
    if test is None:  # no test split: the first images of the training stream are kept out of training
        test, train = train.take(TEST_IMAGES), train.skip(TEST_IMAGES)
        length = None if length is None else max(0, length - TEST_IMAGES)
    features = train.features
    return (train, datasets.Dataset.from_list(list(test), features=features),
            datasets.Dataset.from_list(list(train.take(SAMPLE)), features=features), length)


class PixelStream(IterableDataset):
    """A training stream seen as (pixels in [0, 1], label) pairs, shuffled through a buffer of `buffer` images,
    `length` images an epoch (split among loader workers), moved by `shift` (a `RandomShift`) if given; `set_epoch`
    reseeds the shuffle and the shifts."""

    def __init__(self, rows: datasets.IterableDataset, image_column: str, label_column: str, mode: str, transform,
                 length: int, seed: int = 0, buffer: int = 10_000, shift=None, unreadable=None):
        self.rows, self.image_column, self.label_column, self.mode = raw(rows, image_column), image_column, \
            label_column, mode
        self.transform, self.length, self.seed, self.buffer, self.epoch = transform, length, seed, buffer, 0
        self.shift, self.unreadable = shift, unreadable  # an `UnreadableImages` log: bad images are skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rows = self.rows.shuffle(seed=self.seed, buffer_size=self.buffer)
        rows.set_epoch(self.epoch)
        worker = get_worker_info()
        share = self.length if worker is None else math.ceil(self.length / worker.num_workers)
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 101 + (worker.id if worker else 0))
        for count, row in enumerate(rows):  # in a worker, `datasets` streams that worker's shards only
            if count == share:
                return
            try:
                image = decode(row[self.image_column])
            except UNREADABLE as err:
                if self.unreadable is None:
                    raise
                self.unreadable.record(count, where(row[self.image_column], f"stream[{count}]"), err)
                continue
            pixels = self.transform(to_mode(image, self.mode))
            yield (pixels if self.shift is None else self.shift(pixels, rng)), int(row[self.label_column])


def stream_length(images, capped: int | None) -> int:
    """Images in an epoch of a stream: all of them when the dataset says how many; else the `capped` images the
    run's --max-steps go through (`TrainConfig.capped_images`)."""
    if images.stream_length:
        return images.stream_length
    if capped is None:
        raise RRMError(f"the stream of '{images.name}' does not say how many images it has: add --max-steps")
    return capped
