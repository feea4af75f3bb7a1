"""Input makers: the images an objective trains or matches on, made from the clean batch.

Each maker is called as `maker(model, x, y, origins, mismatch)` (`mismatch`: what an attack on the teacher's clean
outputs raises, of the student's features or logits) and scaled by `schedule(factor)` (an epsilon warm-up).
`perturbs` says whether its images differ from the clean ones, `reads_clean_target` whether it needs `mismatch`;
a maker with a `memory` (a `PerturbationMemory`) needs the batches' origins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, random_perturbation
from ..data.transforms import translate
from ..errors import RRMError
from .base import unwrap
from .losses import kl_divergence
from .memory import MemoryCheckpointing, PerturbationMemory

FeatureMismatch = Callable[[torch.Tensor], torch.Tensor]
"""A divergence from the teacher's clean outputs, of the student's features or logits."""


class InputMaker(MemoryCheckpointing):
    perturbs = True
    reads_clean_target = False

    def __init__(self, memory: PerturbationMemory | None = None):
        self.memory, self.factor = memory, 1.0

    def schedule(self, factor: float) -> None:
        """Scale the perturbation's size by `factor` (0 to 1) from now on."""
        self.factor = factor


class CleanInputs(InputMaker):
    """The training images themselves (the paper's matching)."""

    perturbs = False

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        return x


class NoisyInputs(InputMaker):
    """The images plus random `noise` of size `eps` (see `rrm_hub.attacks.random_perturbation`), clipped to [0, 1]."""

    def __init__(self, eps: float, norm: str, noise: str = "uniform"):
        super().__init__()
        self.eps, self.norm, self.noise = eps, norm, noise

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        return (x + random_perturbation(x, self.eps * self.factor, self.norm, self.noise)).clamp(0, 1)


class AttackedInputs(InputMaker):
    """The images moved by an attack against the model being trained. What it raises (`loss`): the cross-entropy
    on the labels ("ce"); the student's feature mismatch with the teacher's clean representation ("mismatch") or
    its logits' divergence from the teacher's clean soft labels ("kl"), both given as the call's `mismatch`; or
    KL(teacher(x') || student(x')) with both models on the moved images and the teacher's input gradient included
    ("joint", AdaAD's, which needs `teacher`). With a `memory`, each image's attack starts where it ended the epoch
    before (ATTA), else at random. `attack_at(factor)` is the attack at `factor` times the full epsilon."""

    LOSSES = ("ce", "mismatch", "kl", "joint")

    def __init__(self, attack_at: Callable[[float], Attack], loss: str = "ce",
                 memory: PerturbationMemory | None = None, teacher: nn.Module | None = None):
        super().__init__(memory)
        if loss not in self.LOSSES or (loss == "joint") != (teacher is not None):
            raise RRMError(f"attack loss '{loss}' (use one of {', '.join(self.LOSSES)}; 'joint' and only it with a "
                           "teacher)")
        self.attack_at, self.loss, self.teacher, self.current = attack_at, loss, teacher, attack_at(1.0)
        self.reads_clean_target = loss in ("mismatch", "kl")

    def schedule(self, factor: float) -> None:
        super().schedule(factor)
        self.current = self.attack_at(factor)

    def loss_of(self, model: nn.Module, y: torch.Tensor | None, mismatch: FeatureMismatch | None
                ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss the attack raises, as a function of the moved images."""
        if self.loss == "ce":
            if y is None:
                raise RRMError("attack_loss='ce' moves the images against the labels: pass y")
            return lambda x_adv: F.cross_entropy(model(x_adv), y)
        if self.loss == "joint":
            return lambda x_adv: kl_divergence(model(x_adv), self.teacher(x_adv))
        if mismatch is None:
            raise RRMError(f"attack_loss='{self.loss}' raises a divergence from the teacher's clean outputs: pass it")
        if self.loss == "kl":
            return lambda x_adv: mismatch(model(x_adv))
        return lambda x_adv: mismatch(model(x_adv, return_features=True)[1])

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                 origins: torch.Tensor | None = None, mismatch: FeatureMismatch | None = None) -> torch.Tensor:
        loss_of = self.loss_of(unwrap(model), y, mismatch)
        if self.memory is None:
            return self.current.maximize(loss_of, x)
        return self.memory.continue_attack(self.current, loss_of, x, origins)


class FreeInputs(InputMaker):
    """Each image plus its carried perturbation, with no attack pass: the training step's own backward pass moves the
    perturbation one step of `step` (a multiple of eps) along the training loss's gradient, for the next epoch."""

    def __init__(self, memory: PerturbationMemory, eps: float, norm: str, step: float):
        super().__init__(memory)
        self.eps, self.norm, self.step = eps, norm, step

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        eps = self.eps * self.factor
        return self.memory.free_view(eps, self.norm, self.step * eps, x, origins)


class MixedInputs(InputMaker):
    """Mixes of the batch's images with each other, for matching the teacher on points between the training images
    at clean matching's cost: `kind="mixup"` blends each image with another (`lam * x + (1 - lam) * x[perm]`),
    "cutmix" pastes a box of another image covering `1 - lam` of its area. `lam ~ Beta(alpha, alpha)` per image,
    folded to >= 0.5, so that each mix's larger share is its own image (the label its cross-entropy takes)."""

    KINDS = ("mixup", "cutmix")

    def __init__(self, kind: str = "mixup", alpha: float = 1.0):
        super().__init__()
        if kind not in self.KINDS or alpha <= 0:
            raise RRMError(f"mixing '{kind}' with alpha {alpha}: use mixup or cutmix, alpha > 0")
        self.kind, self.alpha = kind, alpha

    def shares(self, n: int, device) -> torch.Tensor:
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((n,)).to(device)
        return torch.maximum(lam, 1 - lam)

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        n, (height, width) = x.shape[0], x.shape[-2:]
        other, lam = x[torch.randperm(n, device=x.device)], self.shares(n, x.device)
        if self.kind == "mixup":
            return lam.view(-1, *[1] * (x.dim() - 1)) * x + (1 - lam.view(-1, *[1] * (x.dim() - 1))) * other
        side = (1 - lam).sqrt()  # a box of (1 - lam) of the area, at a random place inside the image
        box_h, box_w = (side * height).round().long(), (side * width).round().long()
        top = (torch.rand(n, device=x.device) * (height - box_h + 1)).long()
        left = (torch.rand(n, device=x.device) * (width - box_w + 1)).long()
        rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
        inside_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
        inside_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
        box = (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)
        return torch.where(box, other, x)


def stream_from(batches: Iterable, start: int) -> Iterator[torch.Tensor]:
    """The pixels of `batches` from its `start`-th image on, pass after pass: `batches.batches(start)` where it can
    start anywhere (`rrm_hub.data.loaders.ShuffledPasses`), else a plain iterable of (pixels, labels) batches (a
    loader's dataset told each new pass, for its augmentation), read over and over with the first `start` images
    skipped."""
    if hasattr(batches, "batches"):
        yield from batches.batches(start)
        return
    passes = 0
    while True:
        seen = 0
        for pixels, *_ in batches:
            seen += len(pixels)
            cut, start = min(start, len(pixels)), start - min(start, len(pixels))
            if cut < len(pixels):
                yield pixels[cut:]
        if not seen:
            raise RRMError("no unlabeled images to draw: the iterable of batches is empty or was used up (give a "
                           "loader or a list, not a one-pass iterator)")
        passes += 1
        if hasattr(getattr(batches, "dataset", None), "set_epoch"):
            batches.dataset.set_epoch(passes)


class UnlabeledInputs(InputMaker):
    """The batch with its first `share` of images replaced by the next images of `batches` (a `ShuffledPasses` of
    `ImageData.unlabeled`, or any iterable of (pixels, labels) batches), whose labels are never read: the teacher
    labels what the training labels do not reach. `drawn` is how many the last call replaced, the first ones;
    `used` how many it has drawn in all, kept by checkpoints so that a resumed run draws on from there."""

    perturbs = False

    def __init__(self, batches: Iterable, share: float = 0.5):
        super().__init__()
        if not 0 < share <= 1:
            raise RRMError(f"the share of unlabeled images is a fraction: 0 < --unlabeled-share <= 1, got {share}")
        self.batches, self.share, self.drawn, self.used = batches, share, 0, 0
        self.stream: Iterator[torch.Tensor] | None = None
        self.left: torch.Tensor | None = None

    def draw(self, count: int) -> torch.Tensor:
        """The next `count` unlabeled images."""
        if self.stream is None:
            self.stream, self.left = stream_from(self.batches, self.used), None
        held = [] if self.left is None else [self.left]
        while sum(len(images) for images in held) < count:
            held.append(next(self.stream))
        images = torch.cat(held)
        self.left = images[count:] if len(images) > count else None
        self.used += count
        return images[:count]

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        self.drawn = round(self.share * len(x))
        if not self.drawn:
            return x
        return torch.cat([self.draw(self.drawn).to(device=x.device, dtype=x.dtype), x[self.drawn:]])

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {"unlabeled_used": torch.tensor([self.used], dtype=torch.long)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if "unlabeled_used" in state:
            self.used, self.stream = int(state["unlabeled_used"][0]), None


class ShiftedInputs(InputMaker):
    """Augmented views: each image shifted by up to `shift` pixels each way (zero fill), a new draw every step."""

    def __init__(self, shift: int = 2):
        super().__init__()
        self.shift = shift

    def __call__(self, model, x, y=None, origins=None, mismatch=None) -> torch.Tensor:
        moves = torch.randint(-self.shift, self.shift + 1, (x.shape[0], 2))
        out = torch.empty_like(x)
        for (dy, dx) in moves.unique(dim=0).tolist():
            rows = ((moves[:, 0] == dy) & (moves[:, 1] == dx)).nonzero().flatten().to(x.device)
            out[rows] = translate(x[rows], dy, dx)
        return out
