"""Robust models in other formats -> frozen-ready `PixelModel`s taking [0, 1] pixels.

- weight files for a timm or torchvision architecture, including MadryLab `robustness` checkpoints
  (`module.model.*` weights, `module.normalizer.*` statistics, `module.attacker.*` copies);
- transformers image classifiers (`AutoModelForImageClassification` + their image-processor config).

Files are read with safetensors or `torch.load(weights_only=True)`; nothing is ever fully unpickled.
"""

from __future__ import annotations

import difflib
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..errors import RRMError
from ..models.features import classifier_name
from ..models.names import resolve
from ..models.pixel import PixelModel, PixelPreprocess, preprocess_for

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".tar")
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
TORCHVISION_INPUT_SIZE = (3, 224, 224)
LIBRARIES = ("timm", "torchvision")


# ---- weight files

def convert_hint(source: str) -> str:
    """How to turn a pickled checkpoint into safetensors, in an environment that trusts it."""
    name = Path(source).name
    return (f"where you trust the file, run: python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{name}', weights_only=False); sd = sd.get('model', sd.get('state_dict', sd)); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items() if 'attacker' not in k}}, "
            f"'{Path(name).stem}.safetensors')\" and pass that file")


def refusal(err: pickle.UnpicklingError, source: str, name: str | None = None) -> RRMError:
    """The one-line error for a file `torch.load(weights_only=True)` refused: pickled objects, or not a checkpoint."""
    if "global" not in str(err).lower():  # no pickled object: a truncated or foreign file
        return RRMError(f"cannot read checkpoint '{source}' (not a torch.save or safetensors file, or truncated); "
                        "download it again or give another file")
    return RRMError(f"checkpoint '{source}' holds more than tensors and would need full unpickling, which can run "
                    f"arbitrary code; rrm-hub never unpickles untrusted files: {convert_hint(name or source)}")


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a `torch.save` file read with `weights_only=True`."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise RRMError(f"cannot read checkpoint '{source}' as safetensors ({err}): it is damaged or not a "
                           "safetensors file; download it again, or give the file it was converted from") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(err, source) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise RRMError(f"cannot read checkpoint '{source}' ({str(err).splitlines()[0][:120]}); give a safetensors "
                       "or torch.save file") from None
    return state_dict_in(obj, source)


def state_dict_in(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint: the dict itself, or the one under 'model' / 'state_dict'."""
    if isinstance(obj, dict):
        obj = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), obj)
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise RRMError(f"checkpoint '{source}' holds no state dict (a dict of tensors, alone or under "
                       f"{' / '.join(repr(k) for k in STATE_DICT_KEYS)})")
    return state


def split_robustness(state: dict[str, torch.Tensor]) -> tuple[dict, list[float], list[float]] | None:
    """(model weights, mean, std) of a MadryLab `robustness` state dict; None for any other layout.

    The attacker's copy of the model and both normalizers are dropped; the normalizer gives the statistics.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not {"normalizer.new_mean", "normalizer.new_std"} <= state.keys():
        return None
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return weights, state["normalizer.new_mean"].flatten().tolist(), state["normalizer.new_std"].flatten().tolist()


def strip_prefixes(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` without the `module.` (DataParallel) or `model.` prefix that all its keys share and `model` lacks."""
    expected = model.state_dict().keys()
    for prefix in ("module.", "model.", "module."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def guess_architecture(filename: str, names: Iterable[str]) -> str | None:
    """The longest of `names` found as whole words in the file name (`resnet50_l2_eps3.ckpt` -> resnet50)."""
    stem = Path(filename).name.lower()
    starts = [0] + [m.end() for m in re.finditer(r"[_-]", stem)]
    fits = [n for n in names for i in starts if stem.startswith(n, i) and not stem[i + len(n):][:1].isalnum()]
    return max(fits, key=len, default=None)


def architecture_names(library: str) -> list[str]:
    """Classifier names of `library` ('timm' or 'torchvision')."""
    return torchvision.models.list_models(module=torchvision.models) if library == "torchvision" else timm.list_models()


def resolve_architecture(arch: str | None, filename: str, default_library: str) -> tuple[str, str]:
    """(library, name) from `arch` (`name`, `timm:name` or `torchvision:name`) or from the file name."""
    library, _, name = arch.rpartition(":") if arch else ("", "", "")
    library = library or default_library
    if library not in LIBRARIES:
        raise RRMError(f"architecture '{arch}': the prefix must be one of {', '.join(LIBRARIES)}")
    names = architecture_names(library)
    if library == "timm" and name:  # timm's names as users type them: vit_small, tags
        resolved = resolve(name, "--teacher-arch")
        if resolved.note:
            print(resolved.note)
        name = resolved.name.partition(".")[0]
    name = name or guess_architecture(filename, names)
    if name is None:
        raise RRMError(f"cannot tell the {library} architecture of '{filename}' from its name; "
                       "give it with --teacher-arch (e.g. resnet50)")
    if name not in names:
        near = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        raise RRMError(f"{library} has no architecture '{name}' (near: {', '.join(near) or 'none'}); "
                       "give one of its model names with --teacher-arch")
    return library, name


def build_architecture(library: str, name: str, num_classes: int | None, model_args: dict) -> nn.Module:
    """An untrained classifier; `num_classes` None keeps the library's default."""
    kwargs = {**model_args, **({"num_classes": num_classes} if num_classes else {})}
    try:
        if library == "timm":
            return timm.create_model(name, pretrained=False, **kwargs)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as err:
        raise RRMError(f"bad model kwargs for {library} '{name}': {err}") from None
    model.num_classes = dict(model.named_modules())[classifier_name(model)].out_features
    return model


def _classes_in(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    weight = state.get(classifier_name(model) + ".weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """Load `state` strictly, or raise one line naming the first keys that do not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise RRMError(f"checkpoint '{source}' does not fit {what}: {'; '.join(problems)}; "
                       "give the right architecture with --teacher-arch")
    model.load_state_dict(state, strict=False)


def _label_names(num_classes: int) -> list[str] | None:
    return timm.data.ImageNetInfo().label_descriptions() if num_classes == 1000 else None


def checkpoint_teacher(
    path: Path,
    source: str,
    arch: str | None = None,
    model_args: dict | None = None,
    num_classes: int | None = None,
) -> PixelModel:
    """A weight file as a `PixelModel`: `robustness` checkpoints go to torchvision, other state dicts to timm.

    `arch` (`name`, `timm:name`, `torchvision:name`) defaults to a guess from the file name; `num_classes`
    to the rows of the checkpoint's classifier. Normalization: the `robustness` normalizer, else timm's
    pretrained config, else ImageNet's (torchvision), at 224 px for torchvision.
    """
    state = read_state_dict(path, source)
    robustness = split_robustness(state)
    library, name = resolve_architecture(arch, Path(source).name, "torchvision" if robustness else "timm")
    if robustness:
        state, mean, std = robustness
    model = build_architecture(library, name, num_classes, model_args or {})
    state = strip_prefixes(state, model)
    inferred = _classes_in(state, model)
    if num_classes is None and inferred and inferred != model.num_classes:
        model = build_architecture(library, name, inferred, model_args or {})
    load_weights(model, state, f"{library} '{name}'", source)
    if library == "timm":
        preprocess = preprocess_for(model)
        if robustness:
            preprocess = PixelPreprocess(preprocess.input_size, mean, std, preprocess.interpolation)
    else:
        preprocess = PixelPreprocess(TORCHVISION_INPUT_SIZE, mean if robustness else IMAGENET_DEFAULT_MEAN,
                                     std if robustness else IMAGENET_DEFAULT_STD)
    return PixelModel(model, preprocess, _label_names(model.num_classes), source)


def weights_in(folder: Path, source: str, pickled: str = "pytorch_model.bin", safetensors: str = "*.safetensors",
               ) -> Path | None:
    """None if `folder` has safetensors weights, else its `pickled` file (read with `weights_only=True` only)."""
    if any(folder.glob(safetensors)):
        return None
    if (folder / pickled).is_file():
        return folder / pickled
    raise RRMError(f"teacher '{source}' has no {safetensors.lstrip('*')} or {pickled} weights "
                   "(not downloaded? HF_HUB_OFFLINE?)")


# ---- transformers image classifiers
