"""transformers image classifiers as teachers: a repo's model behind its image processor's preprocessing, taking
[0, 1] pixels like every other teacher."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import RRMError
from ..models.pixel import PixelModel, PixelPreprocess
from .converters import refusal, weights_in


class TransformersClassifier(nn.Module):
    """A transformers image classifier as a plain module: normalized pixels in, logits out.

    `get_classifier()` names the head, so the default feature layer is the input of the classifier.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)

    def get_classifier(self) -> nn.Module:
        head = next((getattr(self.model, n) for n in ("classifier", "cls_classifier", "head", "fc")
                     if isinstance(getattr(self.model, n, None), nn.Module)), self.model)
        linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise RRMError(f"{type(self.model).__name__} has no linear classifier; name a layer with --teacher-layer")
        return linear[-1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def is_transformers_config(config: dict) -> bool:
    return "model_type" in config or "architectures" in config


def _image_classifier_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_classifier_config(config: dict, source: str, trust_remote_code: bool) -> None:
    remote = "AutoModelForImageClassification" in config.get("auto_map", {})
    if remote and not trust_remote_code:
        raise RRMError(f"teacher '{source}' needs its own Python code from the repo; pass trust_remote_code=True "
                       "(--trust-remote-code) only if you trust it")
    architectures = config.get("architectures") or []
    if not remote and not set(architectures) & _image_classifier_names():
        named = ", ".join(architectures) or f"model_type '{config.get('model_type')}'"
        raise RRMError(f"teacher '{source}' is a transformers {named}, not an image classifier "
                       "(AutoModelForImageClassification with a trained head)")


def _size(size: object) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    edge = get("shortest_edge") or get("longest_edge")
    return (int(edge), int(edge)) if edge else None


def processor_preprocess(folder: Path, model_config, source: str, trust_remote_code: bool,
                         fallback: PixelPreprocess | None = None) -> PixelPreprocess:
    """Input size, normalization and resampling from the model's image processor (`preprocessor_config.json`);
    `fallback` where a repo has none."""
    from transformers import AutoImageProcessor

    if not (folder / "preprocessor_config.json").exists() and fallback is not None:
        return fallback
    if not (folder / "preprocessor_config.json").exists():
        raise RRMError(f"teacher '{source}' has no preprocessor_config.json, so its input size and normalization "
                       "are unknown; add the image processor of the model it was trained from (save_pretrained)")
    processor = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    image_size = getattr(model_config, "image_size", 224)
    height, width = _size(crop) or _size(getattr(processor, "size", None)) or _size(image_size)
    # the model sees (255 * rescale_factor * pixels - mean) / std; PixelPreprocess computes (pixels - m) / s
    scale = 255.0 * (processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0)
    normalize = getattr(processor, "do_normalize", True)
    mean = processor.image_mean if normalize else [0.0]
    std = processor.image_std if normalize else [1.0]
    resample = getattr(processor, "resample", None)
    bicubic = resample == 3 or "bicubic" in str(resample).lower()
    channels = int(getattr(model_config, "num_channels", 3))
    return PixelPreprocess((channels, height, width), [m / scale for m in mean], [s / scale for s in std],
                           "bicubic" if bicubic else "bilinear")


def from_pretrained(cls, folder: Path, source: str, trust_remote_code: bool = False):
    """(model, loading info) of transformers' `cls` from safetensors, else `pytorch_model.bin` read weights-only."""
    pickled = weights_in(folder, source)
    try:
        return cls.from_pretrained(str(folder), trust_remote_code=trust_remote_code, use_safetensors=pickled is None,
                                   weights_only=True, output_loading_info=True)
    except pickle.UnpicklingError as err:
        raise refusal(err, f"{source}/{pickled.name}", pickled.name) from None
    except (OSError, ValueError, RuntimeError, EOFError) as err:
        raise RRMError(f"transformers cannot load teacher '{source}' ({str(err).splitlines()[0][:160]})") from None


def transformers_teacher(folder: Path, config: dict, source: str, trust_remote_code: bool = False) -> PixelModel:
    """A folder with a transformers image-classification config.json, weights and image processor."""
    from transformers import AutoModelForImageClassification

    _check_classifier_config(config, source, trust_remote_code)
    model, info = from_pretrained(AutoModelForImageClassification, folder, source, trust_remote_code)
    untrained = sorted(info["missing_keys"])
    if untrained:
        raise RRMError(f"teacher '{source}' lacks trained weights for {len(untrained)} tensors "
                       f"(e.g. {untrained[0]}); give a repo with a trained image-classification head")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    preprocess = processor_preprocess(folder, model.config, source, trust_remote_code)
    return PixelModel(TransformersClassifier(model.float()), preprocess, labels, source)
