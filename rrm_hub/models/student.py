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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RRMError, RRMLoadError, hub_errors
from . import align
from .features import FeatureTap, classifier_name, pool
from .pixel import PixelPreprocess, create_backbone, data_config, per_channel, trained_cfg

HEAD_FILE = "rrm_head.safetensors"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
        requested = [align.MatchedPair.from_dict(pair) for pair in rrm.get("pairs") or []]
        width, layer_width, pair_shapes = self._dry_run(requested)
        self.proj = nn.Linear(width, rrm["feature_dim"])
        self.head = nn.Linear(rrm["feature_dim"], self.config["num_classes"])
        self.layer_proj = nn.Linear(layer_width, rrm["feature_dim"]) if self.student_layer else None
        self.pairs = [pair.with_student(shape) for pair, shape in zip(requested, pair_shapes, strict=True)]
        if self.pairs:
            rrm["pairs"] = [pair.to_dict() for pair in self.pairs]
            self.aligners = nn.ModuleDict({str(i): self._aligner(pair, shape, rrm["feature_dim"])
                                           for i, (pair, shape) in enumerate(zip(self.pairs, pair_shapes,
                                                                                  strict=True))})

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
        pairs: list[align.MatchedPair] | None = None,
        label_names: list[str] | None = None,
        teacher: str | None = None,
        teacher_layer: str | None = None,
        pretrained_backbone: bool = False,
        crop_pct: float = 1.0,
    ) -> RRMStudent:
        """A student whose matched representation has the teacher's width `feature_dim`.

        The backbone's own width (and `student_layer`'s) is found by one dry forward pass; `pretrained_backbone`
        starts it from the weights of its timm tag; `crop_pct` is the evaluation crop its images had. `pairs`
        (`rrm_hub.align.teacher_pairs`) instead match several layers; the dry run gives each its common grid.
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
                "crop_pct": crop_pct,
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
            config["rrm"]["pairs"] = [pair.to_dict() for pair in pairs]
        return cls(config, pretrained_backbone=pretrained_backbone)

    @torch.no_grad()
    def _dry_run(self, pairs: list[align.MatchedPair]) -> tuple[int, int, list[list[int]]]:
        """One forward pass of the backbone on zeros: its width, `student_layer`'s, and each pair's student-side
        shape (`rrm_hub.align.view_shape`; the penultimate side is the projection, of the teacher's width)."""
        was_training = self.backbone.training
        self.backbone.eval()
        taps = {layer: FeatureTap(self.backbone, layer) for layer in self._tapped_layers(pairs)}
        try:
            width = pool(self.backbone(self.preprocess(torch.zeros(2, *self.preprocess.input_size)))).shape[1]
            raw = {layer: tap.pop_raw() for layer, tap in taps.items()}
        finally:
            for tap in taps.values():
                tap.remove()
            self.backbone.train(was_training)
        layer_width = pool(raw[self.student_layer]).shape[1] if self.student_layer else 0
        prefix, nhwc = align.grid_options(self.backbone)
        feature_dim = self.config["rrm"]["feature_dim"]
        shapes = [[feature_dim] if p.student_layer is None else
                  align.view_shape(raw[p.student_layer], p.mode, prefix, nhwc, p.student_layer) for p in pairs]
        return width, layer_width, shapes

    @staticmethod
    def _aligner(pair: align.MatchedPair, shape: list[int], feature_dim: int) -> nn.Module:
        """The projection of a pair's student side to the teacher's width: a 1x1 convolution on the common grid, the
        identity for the penultimate projection at the teacher's width, else a linear layer."""
        teacher_width = pair.teacher_shape[0]
        if pair.grid is not None:
            return nn.Conv2d(shape[0], teacher_width, kernel_size=1)
        if pair.student_layer is None and feature_dim == teacher_width:
            return nn.Identity()  # the projection the classifier reads is the match
        return nn.Linear(shape[0], teacher_width)

    def _tapped_layers(self, pairs: list[align.MatchedPair]) -> list[str]:
        """The student layers whose outputs the matched representations read."""
        return sorted({pair.student_layer for pair in pairs if pair.student_layer} | {self.student_layer} - {None})

    def _matched(self, projected: torch.Tensor, raw: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each pair's student side, projected to the teacher's width (on the pair's grid for a spatial pair)."""
        prefix, nhwc = align.grid_options(self.backbone)
        out = []
        for i, pair in enumerate(self.pairs):
            side = projected if pair.student_layer is None else raw[pair.student_layer]
            if pair.grid is None:
                out.append(self.aligners[str(i)](align.to_vector(side, nhwc)))
            else:  # pool to the common grid first, then the 1x1 projection (the same, as both are linear)
                out.append(self.aligners[str(i)](align.view(side, "spatial", tuple(pair.grid), prefix, nhwc,
                                                            pair.student_layer or "")))
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
        if not return_features:
            return self.head(self.proj(pool(self.backbone(self.preprocess(pixels)))))
        taps = {layer: FeatureTap(self.backbone, layer) for layer in self._tapped_layers(self.pairs)}
        try:
            projected = self.proj(pool(self.backbone(self.preprocess(pixels))))
            raw = {layer: tap.pop_raw() for layer, tap in taps.items()}
        finally:
            for tap in taps.values():
                tap.remove()
        if self.pairs:
            features = self._matched(projected, raw)
        elif self.student_layer:
            features = self.layer_proj(pool(raw[self.student_layer]))
        else:
            features = projected
        return self.head(projected), features

    def generate_model_card(self, metrics: dict | None = None, context: dict | None = None, **kwargs):
        """The card from `model_cards/student.md` when the measured `metrics` are given."""
        if metrics is None:
            return super().generate_model_card(**kwargs)
        from ..hub.cards import render_card

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
        model.pretrained_cfg = {**trained_cfg(model.pretrained_cfg), **self.config["pretrained_cfg"]}
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        timm_state = {k: v.contiguous() for k, v in self.to_timm().state_dict().items()}
        save_file(timm_state, str(save_directory / WEIGHTS_FILE), metadata={"format": "pt"})
        head_state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        save_file(head_state, str(save_directory / HEAD_FILE), metadata={"format": "pt"})
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False, **kwargs) -> RRMStudent:
        """A student from a folder or a Hub repo (`revision`, `token`, `local_files_only` as Hugging Face loaders
        take them). What cannot be loaded is an `RRMLoadError`: one line that says what to do, and an `OSError` as
        transformers raises."""
        source = str(pretrained_model_name_or_path)
        try:
            with hub_errors(f"student '{source}'", RRMLoadError, revision):
                return super().from_pretrained(source, revision=revision, token=token,
                                               local_files_only=local_files_only, **kwargs)
        except RRMLoadError:
            raise
        except RRMError as err:
            raise RRMLoadError(str(err)) from None
        except json.JSONDecodeError as err:
            raise RRMLoadError(f"student '{source}': its config.json is not valid JSON (line {err.lineno}); download "
                               "it again (force_download=True) or re-save the student with save_pretrained") from None
        except SafetensorError as err:
            raise RRMLoadError(f"student '{source}': a weight file is damaged ({err}); download it again "
                               "(force_download=True) or re-save the student with save_pretrained") from None

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
