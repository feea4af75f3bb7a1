"""What a model learned from, as pixel hashes: a teacher ships the hashes of its training images, so anyone can check
that their own data (the student's, a test set) holds none of them, offline and without the teacher's dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np

from ..errors import RRMError
from .unreadable import UNREADABLE, decode, raw

HASHES_FILE = "train_hashes.safetensors"
"""The training images' pixel hashes, beside a model that `--disjoint-from` built (`save_hashes`)."""


def pixel_hash(image) -> int:
    """64 bits of the SHA-256 of an image's pixels as decoded (mode, size and bytes): the same for an image read from
    IDX, PNG or an array, whatever file it came in."""
    array = np.asarray(image)
    digest = hashlib.sha256(f"{getattr(image, 'mode', array.dtype)}{array.shape}".encode() + array.tobytes())
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def hashes(rows: datasets.Dataset, column: str) -> np.ndarray:
    """The pixel hashes of every image in one column of `rows` (int64, in the rows' order)."""
    return np.fromiter((pixel_hash(row[column]) for row in rows), dtype=np.int64, count=len(rows))


def readable_hashes(rows: datasets.Dataset, column: str) -> np.ndarray:
    """`hashes`, of the images of `rows` that can be read only (the loaders skip and count the others)."""
    found = []
    for row in raw(rows, column):
        try:
            found.append(pixel_hash(decode(row[column])))
        except UNREADABLE:
            continue
    return np.asarray(found, dtype=np.int64)


def dataset_hashes(spec: str, config: str | None = None) -> dict[str, np.ndarray]:
    """{split: pixel hashes} of every split of the dataset `spec` names (as --dataset takes it)."""
    from .images import find_image_column
    from .sources import load_splits

    loaded = load_splits(spec, config)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return {name: hashes(rows, find_image_column(rows)) for name, rows in loaded.items()}


def check_disjoint(train: np.ndarray, others: dict[str, np.ndarray], what: str) -> None:
    """Refuse (one line) when any image of `train` is also in one of `others` ({split: hashes})."""
    for split, other in others.items():
        shared = np.intersect1d(train, other)
        if len(shared):
            raise RRMError(f"{len(shared)} training images are also in {what}'s {split} split; train on images it "
                           "does not hold (e.g. another --train-split slice), or drop --disjoint-from")


def save_hashes(train: np.ndarray, folder: str | Path, metadata: dict[str, str]) -> Path:
    """Write the training images' hashes (sorted) into `folder`/`HASHES_FILE`, with `metadata` (dataset, split)."""
    from safetensors.numpy import save_file

    path = Path(folder) / HASHES_FILE
    save_file({"pixel_sha256_64": np.sort(train)}, str(path), metadata=metadata)
    return path


def load_hashes(folder: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """The training-image hashes a model folder ships, and their metadata."""
    from safetensors import safe_open

    path = Path(folder) / HASHES_FILE
    if not path.exists():
        raise RRMError(f"'{folder}' ships no {HASHES_FILE}: it was not built with --disjoint-from")
    with safe_open(str(path), framework="numpy") as f:
        return f.get_tensor("pixel_sha256_64"), f.metadata() or {}
