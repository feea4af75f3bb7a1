"""Images whose labels are never read, for a teacher to label (`--unlabeled-split`, `--unlabeled-dataset`): a split
of the dataset itself (or `rest`, its training split outside --train-split's slice), or a split of another dataset,
never the test images."""

from __future__ import annotations

import datasets
import numpy as np

from ..errors import RRMError
from . import splits
from .provenance import readable_hashes
from .sources import load_splits


def unlabeled_images(loaded: datasets.DatasetDict, train_split: str, test_name: str, split: str | None,
                     dataset: str | None) -> datasets.Dataset | None:
    """The unlabeled images: of `dataset` (its `split`, by default its train split; then checked by `apart`), else
    `split` of `loaded` (whose test images come from `test_name`), else None."""
    if dataset:
        return _elsewhere(dataset, split)
    if not split:
        return None
    flag = "--unlabeled-split"
    if split == "rest":
        return splits.rest(loaded, train_split, flag)
    name = splits.parse(split, flag)[0]
    if name == test_name:
        raise RRMError(f"{flag} '{split}' reads '{name}', where the test images come from: the student would learn "
                       "from the images it is measured on; name another split, or rest")
    return splits.pick(loaded, split, flag)


def _elsewhere(spec: str, split: str | None) -> datasets.Dataset:
    """The images of split `split` (default: train, or the only split) of the dataset `spec` names, any other column
    dropped."""
    flag = f"--unlabeled-dataset '{spec}'"
    loaded = load_splits(spec)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split == "rest":
        raise RRMError(f"--unlabeled-split rest is the rest of --dataset's training split; name a split of {flag} "
                       f"({', '.join(loaded)}), or leave it out")
    if split is None and "train" not in loaded and len(loaded) > 1:
        raise RRMError(f"{flag} has no train split: name one of its splits ({', '.join(loaded)}) with "
                       "--unlabeled-split")
    rows = splits.pick(loaded, split or ("train" if "train" in loaded else next(iter(loaded))), "--unlabeled-split")
    column = next((name for name, kind in rows.features.items() if isinstance(kind, datasets.Image)), None)
    if column is None:
        raise RRMError(f"{flag} has no column of images (columns: {rows.column_names}); give a folder of images or a "
                       "dataset with an Image column")
    return rows.select_columns([column])


def apart(rows: datasets.Dataset, test: datasets.Dataset, image_column: str, spec: str) -> datasets.Dataset:
    """`rows` (another dataset's images, their one column) with the images in `image_column`, refused if one of them
    is a test image (pixel hashes: the same pixels in any file)."""
    if rows.column_names != [image_column]:
        rows = rows.rename_column(rows.column_names[0], image_column)
    shared = np.intersect1d(readable_hashes(rows, image_column), readable_hashes(test, image_column))
    if len(shared):
        raise RRMError(f"{len(shared)} images of --unlabeled-dataset '{spec}' are also test images of --dataset: the "
                       "student would learn from the images it is measured on; remove them or use another split")
    return rows

