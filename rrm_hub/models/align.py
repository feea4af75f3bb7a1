"""Pairs of matched layers, and the shapes that make two layers comparable.

A pair is written `TEACHER_LAYER:STUDENT_LAYER[:WEIGHT]` (layer names as in `named_modules()`, `NAME@input`
allowed; the student name `penultimate`, or nothing, is the projected penultimate representation the
classifier reads). Each side is a CNN map (B, C, H, W) (or (B, H, W, C) for timm models whose `output_fmt` is
NHWC, e.g. Swin), ViT/Swin tokens (B, N, D), or a vector (B, D). Two modes:
- "pooled": one vector per image (maps averaged over space, tokens over tokens, as `features.pool`);
- "spatial": tokens reshaped to a grid (B, D, h, w) after dropping class/register tokens, both maps
  average-pooled to the smaller grid; the mismatch is then taken at each grid location and averaged.
A pair of two vectors is matched as vectors in either mode; a map against a vector cannot be matched spatially.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RRMError
from .features import FeatureTap, pool

PENULTIMATE = "penultimate"
MatchMode = Literal["pooled", "spatial"]
MODES: tuple[str, ...] = get_args(MatchMode)


@dataclass(frozen=True)
class Match:
    """One matched pair; `student_layer` None is the student's projected penultimate representation."""

    teacher_layer: str
    student_layer: str | None = None
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.teacher_layer}:{self.student_layer or PENULTIMATE}"


def parse_match(text: str) -> Match:
    """`layer2:blocks.1:0.5` -> Match("layer2", "blocks.1", 0.5); `fc@input:penultimate` -> weight 1."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise RRMError(f"--match '{text}' is not TEACHER_LAYER:STUDENT_LAYER[:WEIGHT] "
                       "(e.g. layer2:blocks.1:0.5 or fc@input:penultimate)")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise RRMError(f"--match '{text}': weight '{parts[2]}' is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise RRMError(f"--match '{text}': the weight must be a number >= 0")
    student = parts[1] if parts[1] not in ("", PENULTIMATE) else None
    return Match(parts[0], student, weight)


def first(features) -> torch.Tensor:
    """The tensor of a module output that may be a tuple (transformers layers return tuples)."""
    return features[0] if isinstance(features, (tuple, list)) else features


def channels_last(network: nn.Module) -> bool:
    """Whether `network`'s 4-d feature maps are (B, H, W, C), as timm declares with `output_fmt`."""
    return str(getattr(network, "output_fmt", "NCHW")) == "NHWC"


def to_vector(features, nhwc: bool = False) -> torch.Tensor:
    """One vector per image: `features.pool`, with (B, H, W, C) maps averaged over H and W."""
    features = first(features)
    if features.dim() == 4 and nhwc:
        return features.mean(dim=(1, 2))
    return pool(features)


def to_grid(features, prefix_tokens: int | None = None, nhwc: bool = False, layer: str = "") -> torch.Tensor:
    """A (B, C, h, w) map from a map or from tokens (B, N, D); None if `features` are vectors.

    Tokens lose their `prefix_tokens` class/register tokens (when unknown: N minus the largest square
    grid that fits) and the remaining patch tokens must form a square grid.
    """
    features = first(features)
    if features.dim() == 4:
        return features.permute(0, 3, 1, 2) if nhwc else features
    if features.dim() != 3:
        raise RRMError(f"layer '{layer}' gives shape {tuple(features.shape[1:])}, neither a map, tokens nor a "
                       "vector, and cannot be matched spatially; match it --match-mode pooled")
    n = features.shape[1]
    prefix = n - math.isqrt(n) ** 2 if prefix_tokens is None else prefix_tokens
    side = math.isqrt(n - prefix)
    if prefix < 0 or side * side != n - prefix:
        raise RRMError(f"layer '{layer}' has {n} tokens, of which {n - prefix} after {prefix} class/register "
                       "tokens: not a square grid; match it --match-mode pooled")
    tokens = features[:, prefix:]
    return tokens.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)


def is_vector(features) -> bool:
    return first(features).dim() == 2


def view(features, mode: str, grid: tuple[int, int] | None = None, prefix_tokens: int | None = None,
         nhwc: bool = False, layer: str = "") -> torch.Tensor:
    """What is compared for one side of a pair: a (B, D) vector ("pooled"), or a (B, C, *grid) map ("spatial")."""
    if mode == "pooled" or is_vector(features):
        return to_vector(features, nhwc)
    return F.adaptive_avg_pool2d(to_grid(features, prefix_tokens, nhwc, layer), grid)


def view_shape(features, mode: str, prefix_tokens: int | None = None, nhwc: bool = False,
               layer: str = "") -> list[int]:
    """[D] for a vector side, or [C, h, w] for a side matched spatially (before pooling to the common grid)."""
    if mode == "pooled" or is_vector(features):
        return [to_vector(features, nhwc).shape[1]]
    return list(to_grid(features, prefix_tokens, nhwc, layer).shape[1:])


def common_grid(match: Match, mode: str, teacher_shape: list[int], student_shape: list[int]) -> list[int] | None:
    """The grid both sides are pooled to (the smaller one), or None for a pair matched as vectors."""
    if mode == "pooled" or (len(teacher_shape) == 1 and len(student_shape) == 1):
        return None
    if len(teacher_shape) == 1 or len(student_shape) == 1:
        side, name = (("teacher", match.teacher_layer) if len(teacher_shape) == 1
                      else ("student", match.student_layer or PENULTIMATE))
        raise RRMError(f"--match {match.name}: the {side} layer '{name}' is a vector, which cannot be matched "
                       "spatially; pick a map or token layer, or use --match-mode pooled")
    return [min(teacher_shape[1], student_shape[1]), min(teacher_shape[2], student_shape[2])]


@dataclass(frozen=True)
class MatchedPair:
    """One matched pair as a run uses it: the layers, the weight, how the sides are compared (`mode`) and the teacher
    side's shape (`view_shape`). `grid`, the common grid of a spatial pair, comes with the student side
    (`with_student`), which also turns a pair of two vectors into a pooled one."""

    teacher_layer: str
    student_layer: str | None
    weight: float
    mode: str
    teacher_shape: list[int]
    grid: list[int] | None = None

    @property
    def name(self) -> str:
        return f"{self.teacher_layer}:{self.student_layer or PENULTIMATE}"

    def with_student(self, student_shape: list[int]) -> MatchedPair:
        match = Match(self.teacher_layer, self.student_layer, self.weight)
        grid = common_grid(match, self.mode, list(self.teacher_shape), student_shape)
        return replace(self, grid=grid, mode="spatial" if grid is not None else "pooled")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MatchedPair:
        return cls(data["teacher_layer"], data.get("student_layer"), float(data.get("weight", 1.0)), data["mode"],
                   list(data["teacher_shape"]), list(data["grid"]) if data.get("grid") is not None else None)


def grid_options(network: nn.Module) -> tuple[int | None, bool]:
    """How `network`'s layers lay out their tokens and maps: class/register tokens ahead of the patch tokens (None:
    infer from the count) and whether its maps are (B, H, W, C)."""
    return getattr(network, "num_prefix_tokens", None), channels_last(network)


@torch.no_grad()
def teacher_pairs(model: nn.Module, network: nn.Module, matches: list[Match], mode: str,
                  sample: torch.Tensor) -> list[MatchedPair]:
    """The pairs as `RRMStudent.for_teacher(pairs=...)` takes them, with each teacher layer's shape from one dry
    forward pass of `model` (whose `network` names the layers)."""
    if mode not in MODES:
        raise RRMError(f"unknown --match-mode '{mode}'; use one of {', '.join(MODES)}")
    taps = {}
    try:
        for match in matches:
            if match.teacher_layer not in taps:
                taps[match.teacher_layer] = FeatureTap(network, match.teacher_layer)
        model.eval()(sample)
        raw = {layer: tap.pop_raw() for layer, tap in taps.items()}
    finally:
        for tap in taps.values():
            tap.remove()
    prefix, nhwc = grid_options(network)
    return [MatchedPair(m.teacher_layer, m.student_layer, m.weight, mode,
                        view_shape(raw[m.teacher_layer], mode, prefix, nhwc, m.teacher_layer)) for m in matches]
