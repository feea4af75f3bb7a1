"""`PerturbationMemory`: one perturbation per training image, carried from one epoch to the next.

An attack that starts where the same image's attack ended an epoch before adds one step an epoch to a
many-step attack, at the cost of one step (ATTA: Zheng et al., "Efficient Adversarial Training with
Transferable Adversarial Examples", CVPR 2020). Perturbations are kept in the images' unaugmented frame:
the loader says, per example, which image it is and how its augmentation moved it (`origins`, see
`rrm_hub.data.PixelDataset`), and the memory moves each perturbation the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather

from ..attacks import Attack, ascent_direction, project, random_perturbation
from ..data.transforms import translate
from ..errors import RRMError

if TYPE_CHECKING:
    from ..data.images import ImageData

CARRIED_STEP = 0.5
"""Step of an attack carried over epochs, as a multiple of eps (many small steps add up over the epochs)."""
MAX_BYTES = 4 * 2**30
"""Largest memory allowed (float16 on the CPU): 4 GiB, about 900,000 RGB images of 28 x 28, 14,000 of 224 x 224."""


class PerturbationMemory:
    """The last perturbation of each of `num_examples` training images of `shape` (C, H, W), float16 on the CPU.

    `origins` (B, 4) rows are (dataset index, dy, dx, flipped): the augmented view shows pixel (i + dy, j + dx)
    of the image at (i, j), then flipped left-right if `flipped`.
    """

    def __init__(self, num_examples: int, shape: tuple[int, ...]):
        if reason := self.too_large(num_examples, shape):
            raise RRMError(f"--match-start previous keeps one perturbation per training image: {reason}; use "
                           "--match-start random")
        self.deltas = torch.zeros(num_examples, *shape, dtype=torch.float16)
        self.seen = torch.zeros(num_examples, dtype=torch.bool)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a free step not stored yet (see free_view)

    @staticmethod
    def too_large(num_examples: int, shape: tuple[int, ...]) -> str | None:
        """Why a memory of `num_examples` perturbations of `shape` does not fit in `MAX_BYTES`, or None."""
        size = num_examples * math.prod(shape) * 2
        if size <= MAX_BYTES:
            return None
        return (f"{size / 2**30:.1f} GiB for {num_examples} images of {tuple(shape)}, over "
                f"{MAX_BYTES / 2**30:.0f} GiB")

    @classmethod
    def unavailable(cls, data: ImageData) -> str | None:
        """Why the training images of `data` cannot have a memory, or None: too many, an augmentation (random-
        resized crops) that moves each image's frame in ways a perturbation cannot follow, or unlabeled images drawn
        beside them."""
        if data.streaming:
            return "streamed images have no index to keep a perturbation by"
        if data.augment == "timm":
            return "random-resized crops move each image's frame"
        if data.unlabeled is not None:
            return "the unlabeled images drawn (--unlabeled-split) are seen about once, with no perturbation to carry"
        return cls.too_large(len(data.train), (data.channels, *data.image_size))

    @classmethod
    def for_training_images(cls, data: ImageData) -> PerturbationMemory:
        if reason := cls.unavailable(data):
            raise RRMError(f"a perturbation carried over epochs needs one kept per training image, not possible here "
                           f"({reason}); use --match-start random, or another method than atta_at")
        return cls(len(data.train), (data.channels, *data.image_size))

    def continue_attack(self, attack: Attack, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        origins: torch.Tensor | None) -> torch.Tensor:
        """`attack.maximize(loss_of, x)` from each image's stored perturbation (a random start for an image not
        seen yet); stores where it ended."""
        x_adv = attack.maximize(loss_of, x, self.start(attack.eps, attack.norm, x, origins))
        self.remember(origins, x_adv - x)
        return x_adv

    def free_view(self, eps: float, norm: str, step_size: float, x: torch.Tensor,
                  origins: torch.Tensor | None) -> torch.Tensor:
        """`x` plus each image's stored perturbation, with no attack step of its own: the training step's own
        backward pass moves the perturbation one ascent step of `step_size` along the gradient of the training loss,
        and the next epoch uses it (free adversarial training's trick, Shafahi et al. 2019, carried over epochs).
        Returns a leaf that requires grad; the step is stored at the next call (or checkpoint)."""
        start = self.start(eps, norm, x, origins)
        x_view = (x + start).clamp(0, 1).detach().requires_grad_(True)

        def step(grad: torch.Tensor) -> None:
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # fp16 overflow: no step, not NaN
            delta = project(x_view.detach() - x + step_size * ascent_direction(grad, norm), eps, norm)
            self.pending = (origins, (x + delta).clamp(0, 1) - x)

        x_view.register_hook(step)
        return x_view

    def start(self, eps: float, norm: str, x: torch.Tensor, origins: torch.Tensor | None) -> torch.Tensor:
        """Each image's stored perturbation as the batch `x` shows it, or a random one of size `eps` for an image
        not seen yet."""
        if origins is None:
            raise RRMError("a perturbation memory needs the batches' origins: build the loader with "
                           "make_loader(..., origins=True)")
        self.flush()
        stored, seen = self.recall(origins, x)
        fresh = random_perturbation(x, eps, norm)
        return torch.where(seen.view(-1, *[1] * (x.dim() - 1)), stored, fresh)

    def flush(self) -> None:
        """Store the step a training backward pass left (`free_view`)."""
        if self.pending is not None:
            origins, deltas = self.pending
            self.pending = None
            self.remember(origins, deltas)

    def recall(self, origins: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored perturbations seen as the batch `like` shows its images, and which images have one."""
        origins = origins.cpu()
        views = self.deltas[origins[:, 0]]  # unmoved views as they are; moved ones one by one
        for row in origins[:, 1:].any(dim=1).nonzero().flatten().tolist():
            index, dy, dx, flipped = origins[row].tolist()
            view = translate(self.deltas[index], dy, dx)
            views[row] = view.flip(-1) if flipped else view
        return views.to(device=like.device, dtype=like.dtype), self.seen[origins[:, 0]].to(like.device)

    def remember(self, origins: torch.Tensor, deltas: torch.Tensor) -> None:
        """Store each view's perturbation in its image's frame (pixels the view did not show keep their old value).
        With several processes, every process stores every process's batch."""
        origins = gather(origins.detach().to(deltas.device)).cpu()  # every process's batch (equal batches: accelerate
        deltas = gather(deltas.detach().to(torch.float16)).cpu()  # pads the last one, even_batches)
        moved = origins[:, 1:].any(dim=1)
        self.deltas[origins[~moved, 0]] = deltas[~moved]
        self.seen[origins[:, 0]] = True
        for (index, dy, dx, flipped), delta in zip(origins[moved].tolist(), deltas[moved], strict=True):
            delta = delta.flip(-1) if flipped else delta
            shown = translate(torch.ones_like(delta, dtype=torch.bool), -dy, -dx)
            self.deltas[index] = torch.where(shown, translate(delta, -dy, -dx), self.deltas[index])

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        return {"deltas": self.deltas, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["deltas"].shape != self.deltas.shape:
            raise RRMError(f"the checkpoint's perturbation memory has shape {tuple(state['deltas'].shape)}, this run's "
                           f"{tuple(self.deltas.shape)}: resume with the same dataset and --holdout")
        self.deltas, self.seen = state["deltas"].to(torch.float16), state["seen"].to(torch.bool)


class MemoryCheckpointing:
    """Mixin for what holds a `memory` (a `PerturbationMemory` or None; the input makers of `rrm_hub.objectives`):
    training checkpoints save and restore it through `checkpoint_state` / `load_checkpoint_state`."""

    memory: PerturbationMemory | None = None

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.memory.state_dict() if self.memory is not None else {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state)
