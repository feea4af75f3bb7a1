"""`RRMStudent`: a timm backbone, a linear projection to the teacher's width, and a classifier on it.

One `save_pretrained` folder serves three loaders:
- `config.json` is a timm config (`architecture`, `num_classes`, `model_args`, `pretrained_cfg`) with
  an extra `rrm` section;
- `model.safetensors` holds plain timm weights, projection and classifier folded into one linear head
  (exact, as there is no nonlinearity between them), for `timm.create_model("hf-hub:...")`;
- `rrm_head.safetensors` holds the projection and classifier themselves, and the learned projections
  (`aligners`) of matched layer pairs, for `RRMStudent`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from . import align
from .errors import RRMError
from .features import FeatureTap, classifier_name, pool
from .models import PixelPreprocess, data_config, per_channel

HEAD_FILE = "rrm_head.safetensors"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def create_backbone(architecture: str, model_args: dict, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (`num_classes=0`): its output is the penultimate representation."""
    try:
        return timm.create_model(architecture, pretrained=pretrained, num_classes=0, **model_args)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid model" in str(err):
            near = timm.list_models(f"*{architecture.split('_')[0]}*")[:5]
            raise RRMError(f"timm has no model '{architecture}' (near: {', '.join(near) or 'none'}); "
                           "see timm.list_models()") from None
        raise
    except TypeError as err:
        raise RRMError(f"bad --student-kwargs for '{architecture}': {err}") from None


class RRMStudent(nn.Module, PyTorchModelHubMixin, library_name="timm", tags=["rrm", "adversarial-robustness"]):
    """A student for Robust Representation Matching; takes [0, 1] pixels, returns logits.

    `forward(pixels, return_features=True)` also returns the representation matched to the teacher:
    the projected penultimate features, or the projection of `student_layer`'s output when one is set.
    With matched pairs (config `rrm.pairs`, see `rrm_hub.align`) it returns a list, one tensor per pair:
    a vector (B, D_teacher) for a pooled pair, a map (B, C_teacher, h, w) on the common grid for a spatial
    one. `aligners[str(i)]` projects pair i to the teacher's width (a linear layer, or a 1x1 convolution for
    a spatial pair); a penultimate pair whose teacher width is `feature_dim` uses the projection itself.
    """

    def __init__(self, config: dict, pretrained_backbone: bool = False):
        super().__init__()
        self.config = copy.deepcopy(config)
        rrm, cfg = self.config["rrm"], self.config["pretrained_cfg"]
        self.backbone = create_backbone(self.config["architecture"], self.config.get("model_args", {}),
                                        pretrained_backbone)
        self.preprocess = PixelPreprocess(cfg["input_size"], cfg["mean"], cfg["std"], cfg.get("interpolation", ""))
        self.student_layer: str | None = rrm.get("student_layer")
        width, layer_width = self._dry_run()
        self.proj = nn.Linear(width, rrm["feature_dim"])
        self.head = nn.Linear(rrm["feature_dim"], self.config["num_classes"])
        self.layer_proj = nn.Linear(layer_width, rrm["feature_dim"]) if self.student_layer else None
        self.pairs: list[dict] = rrm.get("pairs") or []
        if self.pairs:
            self.aligners = self._build_aligners()

    @classmethod
    def for_teacher(
        cls,
        architecture: str,
        *,
        feature_dim: int,
        num_classes: int,
        model_args: dict | None = None,
        input_size: tuple[int, int, int] | None = None,
        student_layer: str | None = None,
        pairs: list[dict] | None = None,
        label_names: list[str] | None = None,
        teacher: str | None = None,
        teacher_layer: str | None = None,
        pretrained_backbone: bool = False,
    ) -> RRMStudent:
        """A student whose matched representation has the teacher's width `feature_dim`.

        The backbone's own width (and `student_layer`'s) is found by one dry forward pass. `pairs` instead
        match several layers: dicts with `teacher_layer`, `student_layer` (None: penultimate), `weight`, `mode`
        and `teacher_shape` (see `rrm_hub.align.view_shape`); the dry run adds each pair's common `grid`.
        """
        if pairs and student_layer:
            raise RRMError("give either student_layer or pairs, not both")
        model_args = dict(model_args or {})
        if input_size is not None:
            model_args.setdefault("in_chans", input_size[0])
        probe = create_backbone(architecture, model_args)
        data = data_config(probe)
        channels, height, width = data["input_size"]
        fixed_size = getattr(getattr(probe, "patch_embed", None), "img_size", None) is not None
        if input_size is not None and not (fixed_size and not model_args.get("dynamic_img_size")):
            height, width = input_size[1:]  # CNNs (and dynamic-size ViTs) run at the data's size
        config = {
            "architecture": architecture,
            "num_classes": num_classes,
            "label_names": list(label_names) if label_names else [str(i) for i in range(num_classes)],
            "model_args": model_args,
            "pretrained_cfg": {
                "input_size": [channels, height, width],
                "interpolation": data.get("interpolation", "bilinear"),
                "mean": per_channel(data["mean"], channels),
                "std": per_channel(data["std"], channels),
                "crop_pct": 1.0,
                "crop_mode": "center",
                "num_classes": num_classes,
                "classifier": classifier_name(probe),
            },
            "rrm": {
                "feature_dim": int(feature_dim),
                "student_layer": student_layer,
                "teacher": teacher,
                "teacher_layer": teacher_layer,
            },
        }
        if pairs:
            config["rrm"]["pairs"] = [dict(pair) for pair in pairs]
        return cls(config, pretrained_backbone=pretrained_backbone)

    @torch.no_grad()
    def _dry_run(self) -> tuple[int, int]:
        was_training = self.backbone.training
        self.backbone.eval()
        sample = torch.zeros(2, *self.preprocess.input_size)
        tap = FeatureTap(self.backbone, self.student_layer) if self.student_layer else None
        try:
            width = pool(self.backbone(sample)).shape[1]
            layer_width = tap.pop().shape[1] if tap else 0
        finally:
            if tap:
                tap.remove()
            self.backbone.train(was_training)
        return width, layer_width

    def _layer_taps(self) -> dict[str, FeatureTap]:
        layers = {pair["student_layer"] for pair in self.pairs if pair["student_layer"]}
        return {layer: FeatureTap(self.backbone, layer) for layer in sorted(layers)}

    def _pair_features(self, projected: torch.Tensor, taps: dict[str, FeatureTap]) -> list:
        raw = {layer: tap.pop_raw() for layer, tap in taps.items()}
        return [projected if pair["student_layer"] is None else raw[pair["student_layer"]] for pair in self.pairs]

    @torch.no_grad()
    def _build_aligners(self) -> nn.ModuleDict:
        """One projection per pair, sized by a dry forward pass; fills in each pair's `grid`."""
        was_training = self.backbone.training
        self.backbone.eval()
        taps = self._layer_taps()
        try:
            projected = self.proj(pool(self.backbone(self.preprocess(torch.zeros(2, *self.preprocess.input_size)))))
            features = self._pair_features(projected, taps)
        finally:
            for tap in taps.values():
                tap.remove()
            self.backbone.train(was_training)
        aligners = nn.ModuleDict()
        for i, (pair, raw) in enumerate(zip(self.pairs, features, strict=True)):
            match = align.Match(pair["teacher_layer"], pair["student_layer"], pair.get("weight", 1.0))
            shape = align.view_shape(raw, pair["mode"], self.prefix_tokens, align.channels_last(self.backbone),
                                     match.student_layer or align.PENULTIMATE)
            teacher_shape = list(pair["teacher_shape"])
            pair["grid"] = align.common_grid(match, pair["mode"], teacher_shape, shape)
            if pair["grid"] is not None:
                aligners[str(i)] = nn.Conv2d(shape[0], teacher_shape[0], kernel_size=1)
                continue
            pair["mode"] = "pooled"  # matched as vectors
            if pair["student_layer"] is None and shape[0] == teacher_shape[0]:
                aligners[str(i)] = nn.Identity()  # the projection the classifier reads is the match
            else:
                aligners[str(i)] = nn.Linear(shape[0], teacher_shape[0])
        return aligners

    @property
    def prefix_tokens(self) -> int | None:
        """Class/register tokens ahead of the patch tokens (timm ViTs say so; None: infer from the count)."""
        return getattr(self.backbone, "num_prefix_tokens", None)

    def _matched(self, features: list) -> list[torch.Tensor]:
        nhwc = align.channels_last(self.backbone)
        out = []
        for i, (pair, raw) in enumerate(zip(self.pairs, features, strict=True)):
            grid = pair["grid"]
            if grid is None:
                out.append(self.aligners[str(i)](align.to_vector(raw, nhwc)))
            else:  # pool to the common grid first, then the 1x1 projection (the same, as both are linear)
                out.append(self.aligners[str(i)](align.view(raw, "spatial", tuple(grid), self.prefix_tokens, nhwc,
                                                            pair["student_layer"] or "")))
        return out

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def label_names(self) -> list[str]:
        return self.config["label_names"]

    @property
    def network(self) -> nn.Module:
        """The module whose `named_modules()` name this model's layers (for feature taps)."""
        return self

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, pixels: torch.Tensor, return_features: bool = False):
        if self.pairs and return_features:
            taps = self._layer_taps()
            try:
                projected = self.proj(pool(self.backbone(self.preprocess(pixels))))
                features = self._matched(self._pair_features(projected, taps))
            finally:
                for tap in taps.values():
                    tap.remove()
        elif self.student_layer and return_features:
            with FeatureTap(self.backbone, self.student_layer) as tap:
                projected = self.proj(pool(self.backbone(self.preprocess(pixels))))
                features = self.layer_proj(tap.pop())
        else:
            projected = self.proj(pool(self.backbone(self.preprocess(pixels))))
            features = projected
        logits = self.head(projected)
        return (logits, features) if return_features else logits

    def generate_model_card(self, metrics: dict | None = None, context: dict | None = None, **kwargs):
        """The card from `model_cards/student.md` when the measured `metrics` are given."""
        if metrics is None:
            return super().generate_model_card(**kwargs)
        from .cards import render_card

        return render_card("student", metrics, context or {})

    # ---- export: a plain timm model with projection and classifier folded into one linear head
    def to_timm(self) -> nn.Module:
        """The student as a plain timm model taking normalized inputs; logits identical to `self`."""
        model = timm.create_model(self.config["architecture"], pretrained=False,
                                  num_classes=self.num_classes, **self.config.get("model_args", {}))
        missing, unexpected = model.load_state_dict(self.backbone.state_dict(), strict=False)
        classifier = model.get_classifier()
        name = self.config["pretrained_cfg"]["classifier"]
        if unexpected or set(missing) != {f"{name}.weight", f"{name}.bias"} or not isinstance(classifier, nn.Linear):
            raise RRMError(f"cannot fold the head of '{self.config['architecture']}' into a timm classifier")
        with torch.no_grad():
            classifier.weight.copy_(self.head.weight @ self.proj.weight)
            classifier.bias.copy_(self.head.weight @ self.proj.bias + self.head.bias)
        model.pretrained_cfg = {**model.pretrained_cfg, **self.config["pretrained_cfg"]}
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        timm_state = {k: v.contiguous() for k, v in self.to_timm().state_dict().items()}
        save_file(timm_state, str(save_directory / WEIGHTS_FILE), metadata={"format": "pt"})
        head_state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        save_file(head_state, str(save_directory / HEAD_FILE), metadata={"format": "pt"})
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, config: dict | None = None,
                         map_location: str = "cpu", **kwargs) -> RRMStudent:
        def fetch(name: str) -> str:
            if Path(model_id).is_dir():
                path = Path(model_id) / name
                if not path.exists():
                    raise RRMError(f"'{model_id}' has no {name}: it is not an rrm-hub student folder")
                return str(path)
            return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                   force_download=force_download, local_files_only=local_files_only)

        if not config or "rrm" not in config:
            raise RRMError(f"'{model_id}' is not an rrm-hub student (its config.json has no 'rrm' section)")
        model = cls(config)
        timm_state = load_file(fetch(WEIGHTS_FILE), device=map_location)
        state = {"backbone." + k: v for k, v in timm_state.items() if "backbone." + k in model.state_dict()}
        state.update(load_file(fetch(HEAD_FILE), device=map_location))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise RRMError(f"weights in '{model_id}' do not match its config.json ({str(err).splitlines()[1][:120]})"
                           "; re-save the student with save_pretrained") from None
        return model.eval()
