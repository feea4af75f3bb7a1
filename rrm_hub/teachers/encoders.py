"""Representation-only teachers: CLIP image encoders (transformers `CLIPModel` / `CLIPVisionModel(WithProjection)`
repos, and open_clip repos: `open_clip_config.json` + `open_clip_pytorch_model.bin` or `open_clip_model.safetensors`).

They have no classes (`num_classes` 0): their forward returns the image embedding, which is also their default
layer (`embedding_layer`). Preprocessing (CLIP mean/std, input size, bicubic resizing) comes from the repo's own
config and lives inside the model. Only the image tower is kept; weights are read from safetensors or with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from ..errors import RRMError
from ..models.pixel import PixelModel, PixelPreprocess
from .converters import load_weights, read_state_dict, weights_in
from .transformers import from_pretrained, processor_preprocess

CLIP_ARCHITECTURES = ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionModel")
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
OPEN_CLIP_CONFIG = "open_clip_config.json"
PICKLED_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_INSTALL = "pip install --no-deps open-clip-torch ftfy (or pip install 'rrm-hub[clip]')"


class ClipImageEncoder(nn.Module):
    """transformers' CLIP vision tower (+ its projection): normalized pixels in, the image embedding out."""

    num_classes = 0
    num_prefix_tokens = 1  # the class token ahead of the patch tokens

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.embedding_layer = "visual_projection" if visual_projection is not None else "vision_model.post_layernorm"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)


class OpenClipImageEncoder(nn.Module):
    """open_clip's image tower (`model.visual`): normalized pixels in, the (projected) image embedding out."""

    num_classes = 0
    embedding_layer = "visual"

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.num_prefix_tokens = 0 if getattr(visual, "class_embedding", None) is None else 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def is_clip_config(config: dict) -> bool:
    """A transformers CLIP config.json (the whole model or its vision tower)."""
    return bool(set(config.get("architectures") or []) & set(CLIP_ARCHITECTURES)) or (
        not config.get("architectures") and config.get("model_type") in CLIP_MODEL_TYPES)


def clip_teacher(folder: Path, config: dict, source: str) -> PixelModel:
    """A transformers CLIP repo as an image encoder, with its image processor's size and CLIP mean/std."""
    import transformers

    names = [a for a in config.get("architectures") or [] if a in CLIP_ARCHITECTURES]
    default = "CLIPModel" if config.get("model_type") == "clip" else "CLIPVisionModel"
    cls = getattr(transformers, names[0] if names else default)
    model, info = from_pretrained(cls, folder, source)
    untrained = sorted(k for k in info["missing_keys"] if k.startswith(("vision_model", "visual_projection")))
    if untrained:
        raise RRMError(f"teacher '{source}' lacks trained weights for {len(untrained)} tensors of its image encoder "
                       f"(e.g. {untrained[0]})")
    vision_config = getattr(model.config, "vision_config", model.config)
    vision = getattr(model, "vision_model", model)  # transformers 5: CLIPVisionModel is the tower itself
    encoder = ClipImageEncoder(vision, getattr(model, "visual_projection", None)).float()
    size = int(vision_config.image_size)
    fallback = PixelPreprocess((int(getattr(vision_config, "num_channels", 3)), size, size), OPENAI_CLIP_MEAN,
                               OPENAI_CLIP_STD, "bicubic")
    return PixelModel(encoder, processor_preprocess(folder, vision_config, source, False, fallback), None, source)


def _open_clip(source: str):
    try:
        from open_clip import model as open_clip_model
    except Exception as err:  # missing, or broken by a dependency
        raise RRMError(f"teacher '{source}' is an open_clip repo and open_clip cannot be imported "
                       f"({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}); "
                       f"install it with: {OPEN_CLIP_INSTALL}") from None
    return open_clip_model


def open_clip_teacher(folder: Path, source: str) -> PixelModel:
    """An open_clip repo's image tower, built from `open_clip_config.json` (its `model_cfg` and `preprocess_cfg`)."""
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    model_cfg, preprocess_cfg = config.get("model_cfg"), config.get("preprocess_cfg", {})
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise RRMError(f"teacher '{source}': {OPEN_CLIP_CONFIG} has no model_cfg with embed_dim and vision_cfg")
    open_clip_model = _open_clip(source)
    visual = open_clip_model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                                 quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    pickled = weights_in(folder, source, PICKLED_WEIGHTS, "open_clip_model.safetensors")
    path = pickled or folder / "open_clip_model.safetensors"
    state = read_state_dict(path, f"{source}/{path.name}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("visual.") for k in state):
        raise RRMError(f"teacher '{source}': {path.name} holds no image tower (no visual.* weights)")
    load_weights(visual, {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")},
                 "its open_clip image tower", source)
    size = model_cfg["vision_cfg"].get("image_size") or preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    preprocess = PixelPreprocess((3, height, width), preprocess_cfg.get("mean", OPENAI_CLIP_MEAN),
                                 preprocess_cfg.get("std", OPENAI_CLIP_STD),
                                 preprocess_cfg.get("interpolation", "bicubic"))
    return PixelModel(OpenClipImageEncoder(visual.float()), preprocess, None, source)
