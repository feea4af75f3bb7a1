"""A frozen model's measured robustness, kept: a teacher never changes, so its report on the same images under the
same attacks is measured once and reused. Bundled teachers ship theirs (`evaluations.json` beside the weights); any
other model's are kept in `cache_dir()/evaluations/<model hash>.json`.

An entry is found by its key: the model's weights (hash), the exact test images and labels (hash of the pixels the
loaders give, so the dataset, split, slice and number of images are all in it), and every setting of the attacks
(suite, eps, norm, steps, checks, sweep, seed). A reused report says so (`cached`) and where it was measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

EVALUATIONS_FILE = "evaluations.json"


def model_hash(model: nn.Module) -> str:
    """A short hash of a model's weights and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_hash(loader: DataLoader | None) -> str | None:
    """A short hash of every (pixels, label) batch a loader gives, in order (None for no loader)."""
    if loader is None:
        return None
    digest = hashlib.sha256()
    for x, y, *_ in loader:
        digest.update(x.detach().cpu().float().numpy().tobytes())
        digest.update(y.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def key(model: nn.Module, test_loader: DataLoader, sweep_loader: DataLoader | None, settings: dict) -> dict:
    """What an evaluation's result depends on: weights, images and attack settings (JSON-ready)."""
    return {"model": model_hash(model), "test_images": data_hash(test_loader),
            "num_examples": len(test_loader.dataset), "sweep_images": data_hash(sweep_loader),
            "sweep_examples": len(sweep_loader.dataset) if sweep_loader is not None else 0,
            **{name: value for name, value in sorted(settings.items())}}


def places(model_key: str) -> list[Path]:
    """Where evaluations of a model with hash `model_key` are looked up: beside each bundled teacher, then the cache
    (where new ones are stored)."""
    from ..data import cache_dir
    from ..teachers.load import ASSETS

    return [*sorted(ASSETS.glob(f"*/{EVALUATIONS_FILE}")), cache_dir() / "evaluations" / f"{model_key}.json"]


def _entries(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: nothing cached there
        return []


def lookup(wanted: dict) -> tuple[dict, Path] | None:
    """The stored report of the evaluation `wanted` (a `key`), and the file it came from, or None."""
    for path in places(wanted["model"]):
        for entry in _entries(path):
            if entry.get("key") == wanted:
                return entry["report"], path
    return None


def store(wanted: dict, report: dict, measured_on: str) -> Path:
    """Keep `report` under `wanted` in the cache (written aside, then moved: never half a file)."""
    path = places(wanted["model"])[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [e for e in _entries(path) if e.get("key") != wanted]
    entries.append({"key": wanted, "report": report, "measured_on": measured_on})
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(entries, tmp, indent=1)
    os.replace(tmp.name, path)
    return path


def cached_report(model: nn.Module, test_loader: DataLoader, sweep_loader: DataLoader | None, settings: dict,
                  measure: Callable[[], dict], measured_on: str, save: bool = True) -> dict:
    """The report `measure()` gives, reused when the same model, images and settings were measured before (then
    with `cached`: where from and where it was measured), else measured and (with `save`) stored."""
    wanted = key(model, test_loader, sweep_loader, settings)
    found = lookup(wanted)
    if found is not None:
        report, path = found
        entry = next(e for e in _entries(path) if e.get("key") == wanted)
        return {**report, "cached": {"from": str(path), "measured_on": entry.get("measured_on"), "key": wanted}}
    report = measure()
    if save:
        store(wanted, report, measured_on)
    return {**report, "cached": None}
