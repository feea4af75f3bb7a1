"""`TeacherTargets`: what a frozen teacher says about a batch (logits and representations), for the student to match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models import align
from ..models.features import FeatureTap
from ..teachers.cache import TeacherCache


class TeacherTargets:
    """The teacher's logits and representation of images, by forward hooks on its layers or a cache lookup.

    One `layer` gives one pooled (B, D) representation; `pairs` (`rrm_hub.align.MatchedPair`) give one view per pair
    (a vector, or a map on the pair's grid), with one hook per distinct teacher layer. `cache` (a `TeacherCache`,
    one layer, clean images only) replaces the teacher's forward by a lookup.
    """

    def __init__(self, teacher: nn.Module, layer: str | None = None, pairs: Sequence[align.MatchedPair] = (),
                 cache: TeacherCache | None = None):
        self.teacher, self.pairs, self.cache = teacher, list(pairs), cache
        layers = [pair.teacher_layer for pair in self.pairs] or [layer]
        self.taps = {name: FeatureTap(teacher.network, name) for name in dict.fromkeys(layers)}
        self.tap = self.taps[layers[0]]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...]]:
        """The teacher's logits and representation(s) of `x`, computed without building a graph (or looked up)."""
        if self.cache is not None:
            return self.cache.lookup(x)
        with torch.inference_mode():
            logits = self.teacher(x)
            features = self.features()
        clone = tuple(f.clone() for f in features) if isinstance(features, tuple) else features.clone()
        return logits.clone(), clone  # normal tensors, usable in the student's graph

    def features(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What the hooks recorded in the last teacher forward: pooled (B, D) features, or one view per pair."""
        if not self.pairs:
            return self.tap.pop()
        raw = {layer: tap.pop_raw() for layer, tap in self.taps.items()}
        prefix, nhwc = align.grid_options(self.teacher.network)
        return tuple(align.view(raw[p.teacher_layer], p.mode, p.grid, prefix, nhwc, p.teacher_layer)
                     for p in self.pairs)

    def remove(self) -> None:
        """Remove the hooks from the teacher."""
        for tap in self.taps.values():
            tap.remove()
