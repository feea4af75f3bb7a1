"""`load_teacher(spec)`: a frozen classifier or image encoder taking [0, 1] pixels, wherever a robust model lives.

Sources: the bundled teacher; a folder or Hub repo in timm, transformers, rrm-hub, transformers CLIP or open_clip
format; a weight file (timm or torchvision state dict, MadryLab `robustness` checkpoint), local or
`hf://org/repo/path/in/repo`; a RobustBench model (`robustbench:[dataset/threat/]name`). Resolution goes through
`huggingface_hub` (its cache, revisions, `HF_HUB_OFFLINE`, tokens). Weights are read from safetensors or with
`torch.load(weights_only=True)`; nothing is ever fully unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import timm
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from torch import nn

from ..errors import RRMError, RRMLoadError, hub_errors
from ..models.pixel import PixelModel, preprocess_for
from ..models.student import CONFIG_FILE, RRMStudent
from .converters import (
    CHECKPOINT_SUFFIXES,
    architecture_names,
    checkpoint_teacher,
    load_weights,
    read_state_dict,
    weights_in,
)
from .encoders import OPEN_CLIP_CONFIG, PICKLED_WEIGHTS, clip_teacher, is_clip_config, open_clip_teacher
from .transformers import is_transformers_config, transformers_teacher

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER = ASSETS / "mnist-robust-resnet"
"""The bundled teacher: a PGD-trained ResNet (L-inf eps 0.3) of the 54,152 MNIST training digits the embedded 5,000 do
not hold."""
L2_TEACHER = ASSETS / "mnist-robust-resnet-l2"
"""`load_teacher("default-l2")`: the same ResNet, PGD-trained at L2 eps 2.0 on the same 54,152 digits (its card)."""
FASHION_TEACHER = ASSETS / "fashion-mnist-robust-resnet"
"""`load_teacher("default-fashion-mnist")`: the L-inf teacher's ResNet, PGD-trained at L-inf eps 0.1 on Fashion-MNIST's
60,000 training images."""
BUNDLED = {"default": (DEFAULT_TEACHER, "rrm-hub bundled MNIST teacher"),
           "default-l2": (L2_TEACHER, "rrm-hub bundled MNIST teacher (L2)"),
           "default-fashion-mnist": (FASHION_TEACHER, "rrm-hub bundled Fashion-MNIST teacher")}
"""The teachers that ship inside the package, by the name --teacher takes."""

HF_URL = "hf://"
ROBUSTBENCH = "robustbench:"
REPO_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")
def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _timm_teacher(folder: Path, config: dict, source: str) -> PixelModel:
    pickled = weights_in(folder, source)  # a pytorch_model.bin is read here, weights-only, not by timm
    model = timm.create_model(f"local-dir:{folder}", pretrained=pickled is None)
    if pickled is not None:
        load_weights(model, read_state_dict(pickled, f"{source}/{pickled.name}"), f"timm '{config['architecture']}'",
                     source)
    labels = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    return PixelModel(model, preprocess_for(model), labels, source)


def _load_folder(folder: Path, source: str, trust_remote_code: bool = False) -> nn.Module:
    """An rrm-hub student, a transformers image classifier or a timm model, as its config.json says.

    A truncated or corrupt config.json or safetensors file (an interrupted download) is a one-line error.
    """
    try:
        return _load_folder_as_configured(folder, source, trust_remote_code)
    except (SafetensorError, json.JSONDecodeError) as err:
        raise RRMError(f"teacher '{source}' has a corrupt or incomplete file ({str(err).splitlines()[0][:120]}); "
                       "download it again (an interrupted download?) or re-save it") from None


def _load_folder_as_configured(folder: Path, source: str, trust_remote_code: bool) -> nn.Module:
    config_path = folder / CONFIG_FILE
    if (folder / OPEN_CLIP_CONFIG).exists():
        return open_clip_teacher(folder, source)
    if not config_path.exists():
        raise RRMError(f"teacher '{source}' has no config.json (nor open_clip_config.json); give a timm, "
                       "transformers, CLIP, open_clip or rrm-hub model, "
                       "or a single weight file as hf://org/repo/file or a path")
    config = json.loads(config_path.read_text())
    if "rrm" in config:
        student = RRMStudent.from_pretrained(str(folder))
        student.source = source
        return student
    if is_clip_config(config):
        return clip_teacher(folder, config, source)
    if is_transformers_config(config):
        return transformers_teacher(folder, config, source, trust_remote_code)
    if "architecture" in config:
        return _timm_teacher(folder, config, source)
    raise RRMError(f"teacher '{source}': config.json is not a timm, transformers, CLIP or rrm-hub config")


def _snapshot(repo_id: str, revision: str | None, trust_remote_code: bool, access: dict | None = None) -> Path:
    """The config, weights and card of a Hub model repo (its code too with `trust_remote_code`); a repo without
    safetensors gets its `pytorch_model.bin` (or open_clip's), which is then read weights-only."""
    patterns = ["*.json", "*.safetensors", "*.md"] + (["*.py"] if trust_remote_code else [])
    with hub_errors(f"teacher '{repo_id}'", RRMLoadError, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **(access or {})))
    if not any(folder.glob("*.safetensors")):
        name = PICKLED_WEIGHTS if (folder / OPEN_CLIP_CONFIG).exists() else "pytorch_model.bin"
        with hub_errors(f"'{name}' of '{repo_id}'", RRMLoadError, revision):
            try:
                hf_hub_download(repo_id, name, revision=revision, **(access or {}))  # into the same snapshot
            except (EntryNotFoundError, LocalEntryNotFoundError):
                pass  # the folder loader says which weights are missing
    return folder


def parse_hf_url(url: str) -> tuple[str, str, str | None]:
    """`hf://org/repo[@revision]/path/in/repo` -> (repo id, path in repo, revision); the path may be ''."""
    parts = url.removeprefix(HF_URL).split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise RRMError(f"'{url}' is not hf://org/repo/path/in/repo")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None


def _download(repo_id: str, filename: str, revision: str | None, access: dict | None = None) -> Path:
    """One file of a Hub model repo, through the Hugging Face cache."""
    with hub_errors(f"'{filename}' of '{repo_id}'", RRMLoadError, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision, **(access or {})))


def _load_file(spec: str, revision: str | None, arch: str | None, model_args: dict | None,
               num_classes: int | None, access: dict | None = None) -> nn.Module:
    """A weight file given as `hf://org/repo/path/in/repo` or a local path."""
    if spec.startswith(HF_URL):
        repo_id, filename, url_revision = parse_hf_url(spec)
        path = _download(repo_id, filename, url_revision or revision, access)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise RRMLoadError(f"checkpoint '{spec}' not found: give an existing file or hf://org/repo/path/in/repo")
    return checkpoint_teacher(path, spec, arch, model_args, num_classes)


def _is_weight_file(spec: str) -> bool:
    """`hf://org/repo/path`, an existing file, or a path ending like a checkpoint (which may be missing)."""
    if spec.startswith(HF_URL):
        return bool(parse_hf_url(spec)[1])
    path = Path(spec).expanduser()
    return path.is_file() or not path.is_dir() and path.suffix in CHECKPOINT_SUFFIXES


def _is_architecture(spec: str) -> bool:
    return "/" not in spec and (spec in architecture_names("torchvision") or timm.is_model(spec))


def load_teacher(
    spec: str | None = None,
    revision: str | None = None,
    *,
    checkpoint: str | None = None,
    arch: str | None = None,
    model_args: dict | None = None,
    num_classes: int | None = None,
    trust_remote_code: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """A frozen, eval-mode teacher taking [0, 1] pixels, with `num_classes`, `label_names`, `source` and `network`.

    `spec`: None for the bundled default; a Hub model id (`org/name`, `hf-hub:org/name`, `hf://org/name`) or a
    local folder in timm, transformers, rrm-hub, transformers CLIP or open_clip format (CLIP encoders have no
    classes: `num_classes` 0, the image embedding as default layer); `robustbench:[dataset/threat/]name`; or a
    weight file, `hf://org/repo/path/in/repo` or a path. A weight file's architecture is `arch` (`name`,
    `timm:name`, `torchvision:name`) or guessed from the file name; `load_teacher("resnet18", checkpoint=...)`
    names it as `spec`. `model_args` and `num_classes`
    build that architecture. `trust_remote_code` lets transformers run a repo's own model code. `token` and
    `local_files_only` go to the Hub downloads, as Hugging Face loaders take them.
    """
    access = {"token": token, "local_files_only": local_files_only}
    if checkpoint is not None:
        named = None if spec in (None, "default") else spec
        if named and arch not in (None, named):
            raise RRMError(f"two architectures given ('{named}' and '{arch}'); give one")
        return _freeze(_load_file(checkpoint, revision, arch or named, model_args, num_classes, access))
    is_file = spec is not None and _is_weight_file(spec)
    if not is_file and (arch or model_args or num_classes):
        raise RRMError("an architecture, model kwargs or a number of classes only apply to a weight file "
                       "(--teacher-checkpoint or a .safetensors/.ckpt/.pt teacher)")
    if (spec or "default") in BUNDLED:
        folder, source = BUNDLED[spec or "default"]
        return _freeze(_load_folder(folder, source))
    if spec.startswith(ROBUSTBENCH):
        from .robustbench import robustbench_teacher

        return _freeze(robustbench_teacher(spec))
    if is_file:
        return _freeze(_load_file(spec, revision, arch, model_args, num_classes, access))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _freeze(_load_folder(path, spec, trust_remote_code))
    if spec.startswith(HF_URL):
        repo_id, _, url_revision = parse_hf_url(spec)
        return _freeze(_load_folder(_snapshot(repo_id, url_revision or revision, trust_remote_code, access), repo_id,
                                    trust_remote_code))
    repo_id = spec.removeprefix("hf-hub:")
    if spec.startswith("hf-hub:") or REPO_ID.fullmatch(spec):
        return _freeze(_load_folder(_snapshot(repo_id, revision, trust_remote_code, access), repo_id,
                                    trust_remote_code))
    if _is_architecture(spec):
        raise RRMError(f"'{spec}' is an architecture name: give its weights with checkpoint=... "
                       "(--teacher-checkpoint), or a Hub repo such as timm/<name>")
    raise RRMLoadError(f"teacher '{spec}' not found: give an existing folder or file, a Hub id like org/name, "
                   "hf://org/repo/file.ckpt, or leave --teacher out for the bundled default")
