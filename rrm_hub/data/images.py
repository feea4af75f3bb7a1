"""Image classification data from Hugging Face `datasets` (Hub ids, folders, IDX files, the embedded digits): the
splits, columns, classes and how the images are seen (`ImageData`); loaders of ([0, 1] pixels, label) are
`rrm_hub.data.loaders`'.

Normalization is *not* done here: it lives inside each model (see `rrm_hub.models`), so an attack's
epsilon is measured in the same pixel space for every model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets

from ..errors import RRMError
from . import idx, splits
from .sources import EMBEDDED_MNIST, load_splits
from .streaming import open_stream
from .transforms import SMALL_IMAGES, Augment, ModelInput, resolve_augment
from .unlabeled import apart, unlabeled_images
from .unreadable import UNREADABLE, UnreadableImages, decode, raw

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
    unlabeled: datasets.Dataset | None = None  # images whose labels are never read, for the teacher to label
    augment: str = "shift"  # the training augmentation: "timm" (random-resized crops), "shift" or "none"
    framing: str = "resize"  # unaugmented views: "resize" to image_size, or "crop" as timm evaluates
    crop_pct: float = 1.0  # of "crop": resize to image_size / crop_pct, then center crop
    interpolation: str = "bilinear"
    stream_length: int | None = None  # of a streamed training split (`train` a `datasets.IterableDataset`), if known
    hub_id: str | None = None  # the Hub dataset these images are (a Hub id, or a known set's IDX files)
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
            rows = self.rows(split)
            total = self.train_size if split == "train" else (len(rows) if rows is not None else None)
            self.unreadable[split] = UnreadableImages(split, total, self.max_bad_images)
        return self.unreadable[split]

    def rows(self, split: str) -> datasets.Dataset | None:
        """The rows of `split` (train, test, holdout or unlabeled), None where there is no such split."""
        return {"train": self.train, "test": self.test, "holdout": self.holdout, "unlabeled": self.unlabeled}.get(split)

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


def _test_name(loaded: datasets.DatasetDict, train_split: str, test_split: str | None) -> str:
    """The split the test images come from: --test-split's, else the first test-like split, else the training
    split's (20% of it held out)."""
    if test_split is not None:
        return splits.parse(test_split, "--test-split")[0]
    train_name = splits.parse(train_split, "--train-split")[0]
    return next((name for name in _TEST_SPLITS if name in loaded and name != train_name), train_name)


def _split(loaded: datasets.DatasetDict, train_split: str, test_split: str | None, seed: int
           ) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = splits.pick(loaded, train_split, "--train-split")
    if test_split is not None:
        return train, splits.pick(loaded, test_split, "--test-split")
    test_name = _test_name(loaded, train_split, None)
    if test_name != splits.parse(train_split, "--train-split")[0]:
        return train, loaded[test_name]
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
    unlabeled_split: str | None = None,
    unlabeled_dataset: str | None = None,
) -> ImageData:
    """Load an image classification dataset: a Hub id, a `save_to_disk` folder, an imagefolder, or the default.

    Image and label columns are found from the features (`Image`, `ClassLabel`) or common names unless
    named. Without a test split, 20% of the train split is held out (seeded). Images of any size and mode are
    read as RGB (grayscale if all of a sample are). `augment` auto resolves to shifts for small images and to timm's
    random-resized crops for larger ones, which are then seen at `image_size`, else at `model_input`'s size (the
    model's own, with its evaluation crop), else at 224. With `streaming` the training split is read as a stream
    (`rrm_hub.streaming`), and its first images stand for it where the images must be looked at. `unlabeled_split`
    (a split, or `rest`: the training split's images outside --train-split's slice) gives `ImageData.unlabeled`;
    `unlabeled_dataset` takes them from another dataset (its `unlabeled_split`, by default its train split), none
    of them a test image.
    """
    name = spec or EMBEDDED_MNIST
    length, unlabeled = None, None
    if streaming:
        if name == EMBEDDED_MNIST:
            raise RRMError("--streaming reads a Hub dataset or data files: give --dataset")
        if unlabeled_split or unlabeled_dataset:
            raise RRMError("--unlabeled-split / --unlabeled-dataset read images of datasets on disk, not of a stream: "
                           "drop --streaming")
        train, test, sample, length = open_stream(name, config, train_split, test_split, _TEST_SPLITS)
    else:
        loaded = load_splits(name, config)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        train, test = _split(loaded, train_split, test_split, seed)
        sample = train
        unlabeled = unlabeled_images(loaded, train_split, _test_name(loaded, train_split, test_split),
                                     unlabeled_split, unlabeled_dataset)
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
    if unlabeled_dataset:
        unlabeled = apart(unlabeled, test, image_column, unlabeled_dataset)
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
        unlabeled=unlabeled,
        hub_id=hub_id_of(name, config),
        max_bad_images=max_bad_images,
    )


def hub_id_of(spec: str, config: str | None = None) -> str | None:
    """The Hub dataset `spec` is: itself when it is a Hub id, a known set's id for its IDX files, else None."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists():
        return spec
    found = idx.files(spec, config) if Path(spec).is_dir() else None
    known = idx.known_set(found["test"][1]) if found else None
    return known.hub_id if known else None


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


