"""`load_teacher(spec)`: a frozen classifier that takes [0, 1] pixels, from a folder or the Hub.

Resolution goes through `huggingface_hub` (its cache, revisions, `HF_HUB_OFFLINE`, tokens).
Weights are read from safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from torch import nn

from .errors import RRMError
from .models import PixelModel, preprocess_for
from .student import CONFIG_FILE, RRMStudent

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TEACHER = ASSETS / "mnist-robust-resnet"
"""The bundled teacher: a small PGD-trained ResNet for the embedded MNIST (L-inf eps 0.3)."""


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _load_folder(folder: Path, source: str) -> nn.Module:
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise RRMError(f"teacher '{source}' has no config.json; give a timm or rrm-hub model folder or Hub id")
    config = json.loads(config_path.read_text())
    if "rrm" in config:
        student = RRMStudent.from_pretrained(str(folder))
        student.source = source
        return _freeze(student)
    if "architecture" in config:
        if not any(folder.glob("*.safetensors")):
            raise RRMError(f"teacher '{source}' has no .safetensors weights; rrm-hub does not unpickle .bin/.pth")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        labels = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
        return _freeze(PixelModel(model, preprocess_for(model), labels, source))
    raise RRMError(f"teacher '{source}': config.json is neither a timm nor an rrm-hub config")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).suffix != ""


def load_teacher(spec: str | None = None, revision: str | None = None) -> nn.Module:
    """A frozen, eval-mode teacher taking [0, 1] pixels, with `num_classes`, `label_names` and `network`.

    `spec`: None for the bundled default, a local folder, or a Hub id (`org/name` or `hf-hub:org/name`).
    """
    if spec is None or spec == "default":
        return _load_folder(DEFAULT_TEACHER, "rrm-hub bundled MNIST teacher")
    repo_id = spec.removeprefix("hf-hub:")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, spec)
    if path.exists() or _looks_like_path(repo_id) and not spec.startswith("hf-hub:"):
        raise RRMError(f"teacher '{spec}' not found: give an existing folder, a Hub id like org/name, "
                       "or leave --teacher out for the bundled default")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.md"])
    except LocalEntryNotFoundError:
        raise RRMError(f"teacher '{repo_id}' is not in the local Hugging Face cache and the Hub cannot be "
                       "reached (HF_HUB_OFFLINE?); download it first or give a local folder") from None
    except HfHubHTTPError as err:
        raise RRMError(f"teacher '{repo_id}' could not be fetched from the Hub ({type(err).__name__}); "
                       "check the id, the revision and your token (huggingface-cli login)") from None
    return _load_folder(Path(folder), repo_id)
