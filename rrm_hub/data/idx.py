"""Folders of IDX files, the format the MNIST family ships in (MNIST, Fashion-MNIST, KMNIST, EMNIST), as a
`datasets.DatasetDict` of train and test splits with an `Image` and a `ClassLabel` column.

A folder holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
`t10k-labels-idx1-ubyte` (each optionally `.gz`), or EMNIST's `emnist-<split>-{train,test}-{images-idx3,labels-idx1}
-ubyte[.gz]`, whose images are stored transposed. Images keep the files' order, which is the order of the Hub's
copies (`ylecun/mnist`, `zalando-datasets/fashion_mnist`), so `train[5848:]` names the same images offline and online.
Built once per content into the rrm-hub cache, then loaded from there.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RRMError

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 / 1 dimensions
PARTS = {"train": "train", "test": "t10k"}
_EMNIST = re.compile(r"^emnist-(?P<split>[a-z]+)-(?P<part>train|test)-(?P<kind>images-idx3|labels-idx1)-ubyte(\.gz)?$")

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
DIGITS = [str(d) for d in range(10)]
EMNIST = {  # as torchvision names EMNIST's classes (letters keeps label 0 unused, as the files do)
    "byclass": DIGITS + list(string.ascii_uppercase) + list(string.ascii_lowercase),
    "bymerge": DIGITS + list(string.ascii_uppercase) + list("abdefghnqrt"),
    "balanced": DIGITS + list(string.ascii_uppercase) + list("abdefghnqrt"),
    "letters": ["N/A"] + list(string.ascii_lowercase),
    "digits": DIGITS,
    "mnist": DIGITS,
}


@dataclass(frozen=True)
class KnownSet:
    """A dataset recognised by the SHA-256 of its (decompressed) test labels file."""

    name: str
    hub_id: str | None
    class_names: list[str]


KNOWN = {
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2": KnownSet("mnist", "ylecun/mnist", DIGITS),
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34": KnownSet(
        "fashion_mnist", "zalando-datasets/fashion_mnist", FASHION),
}


def _named(path: Path, stem: str) -> Path | None:
    for candidate in (path / stem, path / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def files(folder: str | Path, config: str | None = None) -> dict[str, tuple[Path, Path]] | None:
    """{split: (images file, labels file)} of an IDX folder, or None where `folder` holds no IDX files. EMNIST's
    split is `config` (needed when the folder holds several)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = {split: (_named(folder, f"{prefix}-images-idx3-ubyte"), _named(folder, f"{prefix}-labels-idx1-ubyte"))
             for split, prefix in PARTS.items()}
    emnist = sorted({m["split"] for p in folder.iterdir() if (m := _EMNIST.match(p.name))})
    if emnist and not any(a or b for a, b in found.values()):
        if config is None and len(emnist) > 1:
            raise RRMError(f"'{folder}' holds the EMNIST splits {', '.join(emnist)}: name one with --dataset-config")
        split = config or emnist[0]
        if split not in emnist:
            raise RRMError(f"'{folder}' has no EMNIST split '{split}' (it has {', '.join(emnist)}); fix "
                           "--dataset-config")
        found = {part: (_named(folder, f"emnist-{split}-{part}-images-idx3-ubyte"),
                        _named(folder, f"emnist-{split}-{part}-labels-idx1-ubyte")) for part in PARTS}
    if not any(a or b for a, b in found.values()):
        return None
    missing = [f"{PARTS[split]}-{kind}" for split, pair in found.items()
               for kind, path in zip(("images", "labels"), pair, strict=True) if path is None]
    if missing:
        raise RRMError(f"IDX folder '{folder}' lacks its {', '.join(missing)} file(s); put all four files there")
    return found


def read(path: Path, magic: int) -> np.ndarray:
    """The array in one IDX file (uint8), its header checked against its size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise RRMError(f"cannot read IDX file '{path}' ({err}); download it again") from None
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        kind = "images (magic 2051)" if magic == IMAGES_MAGIC else "labels (magic 2049)"
        raise RRMError(f"'{path}' is not an IDX file of {kind}; check which file is which")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise RRMError(f"IDX file '{path}' is truncated or padded: its header says {shape} ({expected} bytes) but it "
                       f"holds {len(raw)} bytes; download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def known_set(labels_file: Path) -> KnownSet | None:
    """The known dataset whose test labels are in `labels_file`, or None."""
    raw = gzip.open(labels_file).read() if labels_file.suffix == ".gz" else labels_file.read_bytes()
    return KNOWN.get(hashlib.sha256(raw).hexdigest())


def class_names(folder: Path, found: dict, config: str | None, labels: list[np.ndarray]) -> list[str]:
    """The classes: those of a known set (by content), of EMNIST's split, of KMNIST (by folder name), else 0..N-1."""
    top = int(max(int(part.max()) for part in labels)) if any(len(part) for part in labels) else 0
    known = known_set(found["test"][1])
    if known is not None:
        names = known.class_names
    elif found["test"][1].name.startswith("emnist-"):
        names = EMNIST.get(_EMNIST.match(found["test"][1].name)["split"]) or [str(i) for i in range(top + 1)]
    elif _kmnist(folder):
        names = KMNIST
    else:
        names = [str(i) for i in range(top + 1)]
    if top >= len(names):
        raise RRMError(f"IDX labels in '{folder}' go up to {top} but the set has {len(names)} classes: a labels file "
                       "is from another set; check the files")
    return names


def _kmnist(folder: Path) -> bool:
    return "kmnist" in folder.resolve().name.lower()


def cache_key(folder: str | Path, found: dict) -> str:
    """A short hash of the files' bytes and of what names their classes (the folder's name, for KMNIST): the cache
    key of the built dataset."""
    digest = hashlib.sha256(b"kmnist" if _kmnist(Path(folder)) else b"")
    for pair in found.values():
        for path in pair:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(folder: str | Path, config: str | None = None):
    """The IDX folder as a `datasets.DatasetDict` (train, test), not cached (see `rrm_hub.data.load_idx`)."""
    import datasets

    folder = Path(folder)
    found = files(folder, config)
    if found is None:
        raise RRMError(f"'{folder}' holds no IDX files (train-images-idx3-ubyte, ...)")
    emnist = found["test"][1].name.startswith("emnist-")
    arrays = {}
    for split, (images_file, labels_file) in found.items():
        images, labels = read(images_file, IMAGES_MAGIC), read(labels_file, LABELS_MAGIC)
        if len(images) != len(labels):
            raise RRMError(f"'{images_file}' holds {len(images)} images but '{labels_file}' {len(labels)} labels: "
                           "the two files are from different sets; check them")
        arrays[split] = (images.transpose(0, 2, 1) if emnist else images, labels)
    names = class_names(folder, found, config, [labels for _, labels in arrays.values()])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
        for split, (images, labels) in arrays.items()})
