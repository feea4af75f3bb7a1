"""Pixel transforms ending in [0, 1] tensors: timm's for natural images (random-resized crop and flip, optional
AutoAugment / RandAugment; resize by `crop_pct` and center crop for evaluation) and seeded zero-fill shifts for digits
and other small images, whose moves a perturbation memory can follow."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms

Augment = Literal["auto", "timm", "shift", "none"]
SMALL_IMAGES = 64
"""`--augment auto` shifts images up to this many pixels a side (digits, CIFAR) and crops larger ones as timm does."""


def resolve_augment(augment: Augment, image_size: tuple[int, int]) -> str:
    """`augment` with auto resolved by the size of the images: shift for small ones, timm's for natural photos."""
    if augment != "auto":
        return augment
    return "shift" if max(image_size) <= SMALL_IMAGES else "timm"


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` ("L" or "RGB"); palette images go through RGBA so their transparency is read right."""
    if image.mode == mode:
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert(mode)


def build_transform(image_size: tuple[int, int]) -> transforms.Compose:
    """Resize and center crop to `image_size`, as a [0, 1] tensor."""
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                               transforms.ToTensor()])


def timm_transform(image_size: tuple[int, int], training: bool, *, crop_pct: float = 0.875,
                   interpolation: str = "bicubic", auto_augment: str | None = None) -> transforms.Compose:
    """timm's transforms (`timm.data.create_transform`) without normalization (that lives in each model), as [0, 1]
    tensors: random-resized crop, flip and color jitter (or `auto_augment`) for training; resize by `crop_pct` and
    center crop for evaluation."""
    from timm.data import create_transform

    from ..errors import RRMError

    try:
        steps = create_transform((3, *image_size), is_training=training, interpolation=interpolation or "bilinear",
                                 crop_pct=None if training else crop_pct,
                                 auto_augment=auto_augment if training else None, normalize=False)
    except (AssertionError, ValueError, KeyError) as err:
        raise RRMError(f"timm does not know --auto-augment '{auto_augment}' ({err}); use a timm policy such as "
                       "rand-m9-mstd0.5-inc1, augmix-m5 or original") from None
    return transforms.Compose([steps, transforms.ConvertImageDtype(torch.float32)])



def translate(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`out[..., i, j] = t[..., i + dy, j + dx]`, zero where that falls outside `t`."""
    height, width = t.shape[-2:]
    out = torch.zeros_like(t)
    if abs(dy) < height and abs(dx) < width:
        out[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)] = \
            t[..., max(dy, 0):height - max(-dy, 0), max(dx, 0):width - max(-dx, 0)]
    return out


@dataclass(frozen=True)
class RandomShift:
    """Random shifts of up to `pad` pixels (zero fill) and, with `hflip`, horizontal flips of a (C, H, W) tensor,
    drawn from the `random.Random` given (cheap to seed per example, unlike torch's global generator)."""

    pad: int = 2
    hflip: bool = False

    def draw(self, rng: random.Random) -> tuple[int, int, bool]:
        """A random move (dy, dx, flipped): the view shows pixel (i + dy, j + dx) at (i, j), then flips."""
        dy = dx = 0
        if self.pad > 0:
            dy, dx = rng.randint(0, 2 * self.pad) - self.pad, rng.randint(0, 2 * self.pad) - self.pad
        return dy, dx, self.hflip and rng.random() < 0.5

    @staticmethod
    def apply(pixels: torch.Tensor, dy: int, dx: int, flipped: bool) -> torch.Tensor:
        """The view of `pixels` that the move (dy, dx, flipped) of `draw` gives."""
        pixels = translate(pixels, dy, dx)
        return pixels.flip(-1) if flipped else pixels

    def __call__(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return self.apply(pixels, *self.draw(rng))


@dataclass(frozen=True)
class ModelInput:
    """What a model expects of its images: size (H, W), evaluation crop and interpolation."""

    size: tuple[int, int]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
