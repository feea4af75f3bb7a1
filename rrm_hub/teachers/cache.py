"""The teacher's outputs on the clean training images, computed once and kept on disk (`--cache-teacher`).

When the teacher only ever sees the clean training images (no random augmentation), its logits and
representation of each image never change: one pass before training computes them, they are stored under
`cache_dir()/teacher-features/<key>.safetensors`, and training looks them up instead of running the teacher.
Images are found by a hash of their pixels computed where they are (CPU or GPU), so the data loader is
unchanged, and an image that is not in the cache (an augmented view, added noise) is refused rather than
answered with another image's outputs. The key and the file's metadata hold the dataset's fingerprint, a
hash of the teacher's weights, the layer and the image size: a change of any gives another file, built anew;
a file whose metadata do not match, or that cannot be read, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn
from torch.utils.data import DataLoader

from ..data import cache_dir
from ..errors import RRMError
from ..models.features import FeatureTap

if TYPE_CHECKING:
    from ..data.images import ImageData

SCHEME = "pixel-hash-v1"
"""Version of the key scheme and file layout; a change makes old files mismatch (and rebuild)."""

PRIME = 2**31 - 1
MISS = ("an input image is not in the teacher cache (random augmentation or noise changes the teacher's input); "
        "use --pad 0 without --hflip and --match-on clean (or --teacher-input clean), or drop --cache-teacher")


@lru_cache(maxsize=8)
def _coefficients(width: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(20220201)
    return torch.randint(1, PRIME, (2, width), generator=generator, dtype=torch.int64).to(device)


def pixel_keys(x: torch.Tensor) -> torch.Tensor:
    """One int64 key per image of `x` (B, ...): two independent hashes (mod 2^31 - 1) of its float32 pixel bits.

    Exact integer arithmetic, so the same image gives the same key on any device and in any batch.
    """
    flat = x.detach().float().reshape(x.shape[0], -1).contiguous()
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # < 2^32: bits * c < 2^63 fits in int64
    first, second = ((bits * c).remainder_(PRIME).sum(1).remainder_(PRIME)
                     for c in _coefficients(flat.shape[1], flat.device))
    return first * PRIME + second


def weights_hash(model: nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherCache:
    """The teacher's (logits, representation) of a set of images, looked up by the images' pixels."""

    def __init__(self, keys: torch.Tensor, logits: torch.Tensor, features: torch.Tensor,
                 metadata: dict[str, str] | None = None):
        order = torch.argsort(keys)
        keys, logits, features = keys[order], logits[order], features[order]
        unique = torch.ones_like(keys, dtype=torch.bool)  # a repeated image: keep its first copy
        unique[1:] = keys[1:] != keys[:-1]
        self.keys, self.logits, self.features = keys[unique], logits[unique], features[unique]
        self.metadata = dict(metadata or {})
        self.path: Path | None = None  # the file it was read from or saved to
        self.reused = False  # whether `load_or_build` read it from disk

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> TeacherCache:
        self.keys, self.logits, self.features = (t.to(device) for t in (self.keys, self.logits, self.features))
        return self

    @classmethod
    def build(cls, teacher: nn.Module, layer: str | None, loader: DataLoader,
              metadata: dict[str, str] | None = None) -> TeacherCache:
        """One pass of `teacher` over `loader`, which must yield the images exactly as training will."""
        device = next(iter(teacher.parameters())).device
        keys, logits, features = [], [], []
        with FeatureTap(teacher.network, layer) as tap, torch.inference_mode():
            for x, _ in loader:
                x = x.to(device)
                logits.append(teacher(x).float().cpu())
                features.append(tap.pop().float().cpu())
                keys.append(pixel_keys(x).cpu())
        return cls(torch.cat(keys), torch.cat(logits).clone(), torch.cat(features).clone(), metadata)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and representation of each image of `x`; an image not in the cache is refused."""
        keys = pixel_keys(x).to(self.keys.device)
        index = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        if not bool((self.keys[index] == keys).all()):
            raise RRMError(MISS)
        return self.logits[index].to(x.device), self.features[index].to(x.device)

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, then a rename): readers never see half a cache."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {"keys": self.keys.cpu().contiguous(), "logits": self.logits.cpu().contiguous(),
                   "features": self.features.cpu().contiguous()}
        try:
            save_file(tensors, str(temporary), metadata=self.metadata)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        """Read a saved cache (safetensors only: no code runs on load); raises on an unreadable file."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("keys", "logits", "features")}
        if not (len(tensors["keys"]) == len(tensors["logits"]) == len(tensors["features"])):
            raise ValueError("tables of different lengths")
        return cls(tensors["keys"], tensors["logits"], tensors["features"], metadata)


def cache_metadata(teacher: nn.Module, layer: str, data: ImageData, revision: str | None = None) -> dict[str, str]:
    """What the cached outputs depend on: any difference means another cache."""
    height, width = data.image_size
    return {"scheme": SCHEME, "dataset": data.name, "dataset_fingerprint": data.train._fingerprint,
            "train_images": str(len(data.train)), "image_column": data.image_column, "image_mode": data.image_mode,
            "image_size": f"{height}x{width}", "teacher": getattr(teacher, "source", type(teacher).__name__),
            "teacher_revision": revision or "", "teacher_weights": weights_hash(teacher), "layer": layer,
            "dtype": "float32"}


def cache_path(metadata: dict[str, str]) -> Path:
    """`cache_dir()/teacher-features/<hash of the metadata>.safetensors`."""
    key = hashlib.blake2b(json.dumps(metadata, sort_keys=True).encode(), digest_size=16).hexdigest()
    return cache_dir() / "teacher-features" / f"{key}.safetensors"


def load_or_build(teacher: nn.Module, layer: str, data: ImageData, batch_size: int = 256, *,
                  revision: str | None = None, num_workers: int = 0,
                  log: Callable[[str], None] = print) -> TeacherCache:
    """The teacher cache for `data`'s train split: reused from disk when it matches, else built and saved.

    Its `path` is the file and `reused` says whether it was read from there. With several processes, run it
    on the main process first (`accelerator.main_process_first()`): the others then reuse its file.
    """
    metadata = cache_metadata(teacher, layer, data, revision)
    path = cache_path(metadata)
    if path.exists():
        try:
            cache = TeacherCache.load(path)
        except (OSError, SafetensorError, ValueError, RuntimeError) as err:
            log(f"teacher cache: {path} is unreadable ({type(err).__name__}); rebuilding")
        else:
            differs = sorted(k for k in metadata if cache.metadata.get(k) != metadata[k])
            if not differs:
                log(f"teacher cache: reusing {path} ({len(cache)} images)")
                cache.path, cache.reused = path, True
                return cache
            log(f"teacher cache: {path} was made for another {', '.join(differs)}; rebuilding")
    started = time.perf_counter()
    from ..data.loaders import make_loader  # reading datasets: only where a cache is built from one

    loader = make_loader(data, "train", batch_size, augment=False, num_workers=num_workers)
    cache = TeacherCache.build(teacher, layer, loader, metadata)
    cache.save(path)
    cache.path = path
    log(f"teacher cache: built {path} ({len(cache)} images, {time.perf_counter() - started:.1f}s)")
    return cache
