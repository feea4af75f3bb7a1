"""Models that see pixels: channel matching, resizing and normalization live inside the model.

Every model in rrm-hub takes images in [0, 1] of any size and channel count, so an attack's epsilon
means the same thing for a teacher and a student with different input sizes and normalizations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from torch import nn

from ..data.transforms import ModelInput
from ..errors import RRMError
from .names import near_names


def per_channel(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel statistics for `channels` channels (averaged for grayscale, repeated otherwise)."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if channels == 1:  # e.g. ImageNet statistics for a grayscale model
        return [sum(values) / len(values)]
    return [values[0]] * channels


class PixelPreprocess(nn.Module):
    """[0, 1] pixels -> the model's input: match channels, resize to `input_size`, normalize."""

    def __init__(
        self,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
    ):
        super().__init__()
        self.input_size = tuple(int(v) for v in input_size)  # (C, H, W)
        channels = self.input_size[0]
        self.interpolation = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(per_channel(mean, channels)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(per_channel(std, channels)).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.input_size
        if pixels.shape[1] != channels:
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, channels, -1, -1)
            elif channels == 1:
                pixels = pixels.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot feed {pixels.shape[1]}-channel images to a {channels}-channel model")
        if tuple(pixels.shape[-2:]) != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode=self.interpolation, align_corners=False)
        return (pixels - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, interpolation={self.interpolation}"


class PixelModel(nn.Module):
    """A classifier behind `PixelPreprocess`; `network` (the inner model) names the layers for feature taps."""

    def __init__(self, model: nn.Module, preprocess: PixelPreprocess, label_names: list[str] | None = None,
                 source: str = ""):
        super().__init__()
        self.preprocess = preprocess
        self.model = model
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.label_names = list(label_names) if label_names else [str(i) for i in range(self.num_classes)]
        self.source = source

    @property
    def network(self) -> nn.Module:
        return self.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(pixels))


def _input_channels(model: nn.Module, default: int) -> int:
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    modules = dict(model.named_modules())
    first = modules.get(name) if isinstance(name, str) else None
    if first is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return getattr(first, "in_channels", default)


def data_config(model: nn.Module) -> dict:
    """Input size, mean, std and interpolation of a timm model, from its own pretrained config."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    channels, height, width = config["input_size"]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # a ViT built with img_size=... knows its size better than its pretrained config
        height, width = tuple(img_size)
    config["input_size"] = (_input_channels(model, channels), height, width)
    return config


def preprocess_for(model: nn.Module, input_size: Sequence[int] | None = None) -> PixelPreprocess:
    """The `PixelPreprocess` a timm model expects, optionally at another input size."""
    config = data_config(model)
    return PixelPreprocess(input_size or config["input_size"], config["mean"], config["std"], config["interpolation"])


def create_pixel_model(
    architecture: str,
    num_classes: int,
    input_size: Sequence[int],
    model_args: dict | None = None,
    label_names: list[str] | None = None,
    pretrained: bool = False,
) -> PixelModel:
    """A timm classifier for `input_size` (C, H, W) images, behind its own pixel preprocessing."""

    model_args = {"in_chans": input_size[0], **(model_args or {})}
    try:
        model = timm.create_model(architecture, pretrained=pretrained, num_classes=num_classes, **model_args)
    except RuntimeError as err:
        raise RRMError(f"timm cannot build '{architecture}' ({err}); see timm.list_models()") from None
    except TypeError as err:
        raise RRMError(f"bad model kwargs for '{architecture}' ({err}); fix or drop that key=value") from None
    config = data_config(model)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None) is not None
    size = config["input_size"] if fixed else (config["input_size"][0], *input_size[1:])
    channels = size[0]
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": tuple(size),
        "mean": tuple(per_channel(config["mean"], channels)),
        "std": tuple(per_channel(config["std"], channels)),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": num_classes,
    }
    return PixelModel(model, preprocess_for(model), label_names, source=architecture)


TIMM_WEIGHT_FACTS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids", "paper_name",
                     "notes", "license", "custom_load", "test_input_size", "test_crop_pct")
"""The `pretrained_cfg` keys that describe timm's own published weights (which tag, paper, license, test size): not
true of weights we trained, so a folder we write leaves them out."""


def trained_cfg(pretrained_cfg: dict) -> dict:
    """A timm `pretrained_cfg` for weights trained here: the input, normalization and head, not timm's weight facts."""
    return {key: value for key, value in pretrained_cfg.items() if key not in TIMM_WEIGHT_FACTS}


def save_timm_folder(model: nn.Module, folder: str, model_args: dict, label_names: list[str] | None = None) -> None:
    """Write `config.json` + `model.safetensors` the way timm pushes to the Hub, for weights trained here.

    `num_classes` stays out of `model_args` (transformers' timm wrapper passes it separately).
    """
    import json
    model_config = {"label_names": list(label_names)} if label_names else None
    save_for_hf(model, folder, model_config=model_config, model_args=model_args, safe_serialization=True)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    config["pretrained_cfg"] = trained_cfg(config.get("pretrained_cfg", {}))
    path.write_text(json.dumps(config, indent=2))


def model_input(architecture: str, model_args: dict | None = None):
    """The images timm model `architecture` expects (`rrm_hub.data.ModelInput`: size, evaluation crop,
    interpolation), read from a copy built on the meta device (no memory, no weights)."""

    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, num_classes=0, **(model_args or {}))
    except TypeError as err:
        raise RRMError(f"bad model kwargs for '{architecture}' ({err}); fix or drop that key=value") from None
    except RuntimeError as err:
        raise RRMError(f"timm cannot build '{architecture}' ({err}); see timm.list_models()") from None
    config = data_config(model)
    return ModelInput(tuple(config["input_size"][1:]), float(config.get("crop_pct") or 0.875),
                      config.get("interpolation") or "bicubic")


def create_backbone(architecture: str, model_args: dict, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (`num_classes=0`): its output is the penultimate representation."""
    try:
        return timm.create_model(architecture, pretrained=pretrained, num_classes=0, **model_args)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid model" in str(err):
            near = near_names(architecture)
            raise RRMError(f"timm has no model '{architecture}' (near: {', '.join(near) or 'none'}); "
                           "see timm.list_models()") from None
        if pretrained and "pretrained" in str(err).lower():
            raise RRMError(f"timm has no pretrained weights for '{architecture}'; name a tag that has some "
                           "(timm.list_pretrained()) or drop --student-pretrained") from None
        raise
    except (OSError, ValueError) as err:  # huggingface_hub: not in the cache and offline, or not on the Hub
        if not pretrained:
            raise
        raise RRMError(f"cannot get the pretrained weights of '{architecture}' ({type(err).__name__}); offline they "
                       "must be in the Hugging Face cache: download them once online, or drop --student-pretrained"
                       ) from None
    except TypeError as err:
        raise RRMError(f"bad --student-kwargs for '{architecture}' ({err}); fix or drop that key=value") from None
