"""What the training loop asks of an objective, and the small helpers objectives share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import RRMError

Logs = dict[str, torch.Tensor]


@runtime_checkable
class Objective(Protocol):
    """Maps (model, pixels, labels[, origins]) to (loss, logs); the loop in `rrm_hub.train` is shared by all.

    `schedule(progress)` is called before each step with the fraction of training done; `replays` optimizer steps
    are taken on each batch (free-AT); `uses_origins` says whether batches must carry the images' origins
    (`make_loader(..., origins=True)`); `checkpoint_state` / `load_checkpoint_state` carry state that training
    checkpoints keep (a perturbation memory).
    """

    name: str
    replays: int
    uses_origins: bool

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor
                 ) -> tuple[torch.Tensor, Logs]: ...

    def schedule(self, progress: float) -> None: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None: ...


class ObjectiveBase:
    """Defaults for every part of `Objective` but the loss: nothing scheduled, one step a batch; the state that
    checkpoints keep is that of the objective's input maker (`inputs`, e.g. its perturbation memory), if any."""

    name = "objective"
    replays = 1
    uses_origins = False
    inputs = None

    def schedule(self, progress: float) -> None:
        pass

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {} if self.inputs is None else self.inputs.checkpoint_state()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.inputs is not None:
            self.inputs.load_checkpoint_state(state)


class FunctionObjective(ObjectiveBase):
    """A plain `loss_fn(model, x, y) -> (loss, logs)` as an `Objective`."""

    def __init__(self, loss_fn: Callable[..., tuple[torch.Tensor, Logs]]):
        self.loss_fn, self.name = loss_fn, getattr(loss_fn, "__name__", "objective")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor):
        return self.loss_fn(model, x, y, *rest)


def as_objective(objective) -> Objective:
    """`objective` itself if it is an `Objective`, else a plain loss function wrapped as one; an object with only some
    of the protocol (a `schedule`, `replays`, a `memory`) is refused rather than run without them."""
    if isinstance(objective, Objective):
        return objective
    partial = [name for name in ("schedule", "replays", "memory", "checkpoint_state") if hasattr(objective, name)]
    if partial:
        raise RRMError(f"{type(objective).__name__} has {', '.join(partial)} but not all of rrm_hub.Objective: "
                       "subclass rrm_hub.objectives.ObjectiveBase")
    return FunctionObjective(objective)


def warmup_scale(progress: float, warmup: float) -> float:
    """Linear ramp from 0 to 1 over the first `warmup` fraction of training."""
    return min(1.0, progress / warmup) if warmup > 0 else 1.0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper: attacks run on it, outside gradient sync."""
    return getattr(model, "module", model)
