"""Representations by forward hooks on named modules of any `nn.Module`.

A layer is named as in `model.named_modules()`; `name` taps the module's output and `name@input` its
input. The default is the input of the model's final classifier (`get_classifier()` in timm), i.e.
the penultimate representation the RRM paper matches; a representation-only model (an image encoder such as
CLIP's) names its embedding in `embedding_layer`.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import RRMError

INPUT_SUFFIX = "@input"


def classifier_name(model: nn.Module) -> str:
    """Name of the final classifier module (timm `get_classifier()`, else the last `nn.Linear`)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {id(module): name for name, module in model.named_modules()}
    if isinstance(classifier, nn.Module) and id(classifier) in names and names[id(classifier)]:
        return names[id(classifier)]
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise RRMError(f"{type(model).__name__} has no classifier to find; name a layer with --teacher-layer")
    return linear[-1]


def default_layer(model: nn.Module) -> str:
    """The penultimate representation: the input of the model's classifier, or an encoder's `embedding_layer`."""
    embedding = getattr(model, "embedding_layer", None)
    return embedding if isinstance(embedding, str) else classifier_name(model) + INPUT_SUFFIX


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` in `model.named_modules()`, or an error listing near matches."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    near = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"near matches: {', '.join(near)}" if near else "use --list-layers to see the layers"
    raise RRMError(f"{type(model).__name__} has no layer '{name}' ({hint})")


def pool(features: torch.Tensor | tuple | list) -> torch.Tensor:
    """One vector per image: average CNN maps (B,C,H,W) over space and ViT tokens (B,N,D) over tokens."""
    if isinstance(features, (tuple, list)):
        features = features[0]
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 2:
        return features
    raise RRMError(f"cannot pool features of shape {tuple(features.shape)} into one vector per image")


class FeatureTap:
    """Records what one named module of `model` sees (`name@input`) or returns (`name`) on each forward.

    Use as a context manager or call `remove()`; `pop()` returns the last recording and clears it.
    """

    def __init__(self, model: nn.Module, layer: str | None = None):
        self.layer = layer or default_layer(model)
        name, take_input = (
            (self.layer[: -len(INPUT_SUFFIX)], True) if self.layer.endswith(INPUT_SUFFIX) else (self.layer, False)
        )
        module = find_module(model, name)
        self._output: torch.Tensor | None = None
        if take_input:
            self._handle = module.register_forward_pre_hook(self._record_input)
        else:
            self._handle = module.register_forward_hook(self._record_output)

    def _record_input(self, module: nn.Module, args: tuple) -> None:
        self._output = args[0]

    def _record_output(self, module: nn.Module, args: tuple, output) -> None:
        self._output = output

    def pop(self) -> torch.Tensor:
        """The features recorded by the last forward pass, pooled to (B, D)."""
        return pool(self.pop_raw())

    def pop_raw(self):
        """The features recorded by the last forward pass, as the module saw or returned them."""
        if self._output is None:
            raise RuntimeError(f"layer '{self.layer}' was not run by the last forward pass")
        output, self._output = self._output, None
        return output

    def remove(self) -> None:
        self._handle.remove()
        self._output = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def list_layers(model: nn.Module, sample: torch.Tensor, network: nn.Module | None = None) -> list[tuple]:
    """(name, type, output shape) of each module of `network` (default: `model`) when `model` runs `sample`."""
    network = network if network is not None else model
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in network.named_modules():
        if name:
            def hook(mod, args, out, name=name):
                out = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape)
            handles.append(module.register_forward_hook(hook))
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return [(n, type(m).__name__, shapes[n]) for n, m in network.named_modules() if n in shapes]


@torch.no_grad()
def feature_width(model: nn.Module, network: nn.Module, layer: str | None, sample: torch.Tensor) -> int:
    """Width of the pooled representation at `layer` of `network` (inside `model`), by one dry forward pass."""
    with FeatureTap(network, layer) as tap:
        model(sample)
        return tap.pop().shape[1]
