"""`robustbench:[dataset/threat/]name` teachers: RobustBench's model zoo through its own `load_model`.

Checkpoints live in RobustBench's `model_dir` layout inside rrm-hub's cache,
`cache_dir()/robustbench/<dataset>/<threat>/<name>.pt`: a file already there is used as is (offline), a missing one
is downloaded by RobustBench (unless `HF_HUB_OFFLINE` is set). RobustBench builds the architecture and fixes the
state dict; every `torch.load` it makes during the call is forced to `weights_only=True`, so a checkpoint that
would need full unpickling is refused, never unpickled. Its models take [0, 1] pixels, normalization inside.

RobustBench 1.1.1 (installed with `--no-deps`, since it pins an old timm) has two import-time rough edges, bridged
while it is imported and undone afterwards, without touching its files: it imports `pkg_resources` (gone from
recent setuptools; a stand-in with `resource_filename` is provided only when it is missing), and it imports
AutoAttack as `autoattack` (with `autoattack.state`), while AutoAttack's PyPI package installs as `pyautoattack`
(aliased only when no full `autoattack` is importable).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..data import cache_dir
from ..errors import RRMError
from ..models.pixel import PixelModel, PixelPreprocess
from .converters import refusal

PREFIX = "robustbench:"
DEFAULTS = ("cifar10", "Linf")
INSTALL = ("pip install --no-deps robustbench==1.1.1 gdown==5.1.0 torchdiffeq geotorch beautifulsoup4 soupsieve "
           "(--no-deps keeps rrm-hub's timm)")
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def model_dir() -> Path:
    """RobustBench's `model_dir` inside rrm-hub's cache (`$RRM_HUB_CACHE/robustbench`)."""
    return cache_dir() / "robustbench"


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`robustbench:name` or `robustbench:dataset/threat/name` -> (dataset, threat, name)."""
    parts = spec.removeprefix(PREFIX).split("/")
    if len(parts) == 1 and parts[0]:
        return (*DEFAULTS, parts[0])
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise RRMError(f"'{spec}' is not robustbench:<name> or robustbench:<dataset>/<threat>/<name> "
                   "(e.g. robustbench:cifar10/Linf/Wong2020Fast)")


def _pkg_resources() -> types.ModuleType:
    """The part of `pkg_resources` RobustBench uses, on `importlib.resources`."""
    module = types.ModuleType("pkg_resources")
    module.resource_filename = lambda package, path: str(importlib.resources.files(package) / path)
    return module


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # its parent package is missing or broken
        return False


@contextmanager
def _import_shims() -> Iterator[None]:
    """`pkg_resources` and `autoattack(.state)` importable while RobustBench is imported; sys.modules restored."""
    stand_ins: dict[str, types.ModuleType] = {}
    if not _has("pkg_resources"):
        stand_ins["pkg_resources"] = _pkg_resources()
    if not _has("autoattack.state") and _has("pyautoattack.state"):
        stand_ins["autoattack"] = importlib.import_module("pyautoattack")
        stand_ins["autoattack.state"] = importlib.import_module("pyautoattack.state")
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_robustbench() -> types.ModuleType:
    """`robustbench.utils`, or a one-line error with the command that installs RobustBench beside rrm-hub's timm."""
    try:
        with _import_shims(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its imports of timm's deprecated module paths
            return importlib.import_module("robustbench.utils")
    except Exception as err:  # missing, or broken by one of its dependencies
        detail = str(err).splitlines()[0][:100] if str(err) else ""
        raise RRMError(f"robustbench cannot be imported ({type(err).__name__}: {detail}); install it with: "
                       f"{INSTALL}") from None


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside the block reads with `weights_only=True`, whatever its caller passes."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _choose(value: str, choices: dict, what: str, spec: str):
    """`choices[value]` (matched case-insensitively), or a one-line error with the near matches."""
    by_name = {str(getattr(k, "value", k)): v for k, v in choices.items()}
    folded = {k.lower(): k for k in by_name}
    if value.lower() in folded:
        return folded[value.lower()], by_name[folded[value.lower()]]
    near = difflib.get_close_matches(value, list(by_name), n=5, cutoff=0.5)
    shown = near or sorted(by_name)[:8]
    raise RRMError(f"'{spec}': RobustBench has no {what} '{value}' ({'near' if near else 'some'}: "
                   f"{', '.join(shown)})")


def _input_size(entry: dict, dataset: str) -> tuple[int, int, int]:
    """CIFAR's 32 px, or the crop of an ImageNet model's preprocessing (`Res256Crop224` -> 224)."""
    if dataset != "imagenet":
        return 3, 32, 32
    preprocessing = str(entry.get("preprocessing") or "Res256Crop224")
    size = int((re.findall(r"Crop(\d+)", preprocessing) or re.findall(r"\d+", preprocessing) or [224])[-1])
    return 3, size, size


def _labels(dataset: str, num_classes: int) -> list[str] | None:
    if dataset == "cifar10":
        return CIFAR10_LABELS
    if dataset == "imagenet":
        import timm.data

        return timm.data.ImageNetInfo().label_descriptions()
    return None


def _load(utils: types.ModuleType, name: str, dataset: str, threat: str, spec: str) -> nn.Module:
    try:
        with _weights_only_loads():
            return utils.load_model(name, model_dir=model_dir(), dataset=dataset, threat_model=threat)
    except pickle.UnpicklingError as err:
        raise refusal(err, f"RobustBench's {name}.pt ({spec})", f"{name}.pt") from None
    except Exception as err:  # a failed download, a truncated file, a checkpoint that does not fit
        raise RRMError(f"RobustBench cannot load '{spec}' ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:140] if str(err) else ''}); put its checkpoint at "
                       f"{model_dir() / dataset / threat / name}.pt") from None


def robustbench_teacher(spec: str) -> PixelModel:
    """A RobustBench model as a `PixelModel` (input size from its dataset; normalization is inside the model)."""
    dataset, threat, name = parse_spec(spec)
    utils = import_robustbench()
    dataset, threats = _choose(dataset, utils.all_models, "dataset", spec)
    threat, models = _choose(threat, threats, "threat model", spec)
    name, entry = _choose(name, models, "model", spec)
    source = f"{PREFIX}{dataset}/{threat}/{name}"
    path = model_dir() / dataset / threat / f"{name}.pt"
    files = ([path] if not isinstance(entry.get("gdrive_id"), list) else
             [Path(f"{path}_m{i}.pt") for i in range(len(entry["gdrive_id"]))])
    missing = [f for f in files if not f.is_file()]
    if missing and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise RRMError(f"'{source}' is not in the cache ({missing[0]}) and HF_HUB_OFFLINE is set; download it "
                       "first (run once online) or put its checkpoint there")
    model = _load(utils, name, dataset, threat, source)
    num_classes = utils.DATASET_CLASSES[utils.BenchmarkDataset(dataset)]
    model.num_classes = num_classes
    preprocess = PixelPreprocess(_input_size(entry, dataset), [0.0], [1.0])  # [0, 1] pixels; normalized inside
    return PixelModel(model, preprocess, _labels(dataset, num_classes), source)
