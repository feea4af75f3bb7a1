"""What guards the loop without a host sync per step: the non-finite loss test and the Ctrl-C stop request."""

from __future__ import annotations

import copy
import signal
import threading
from dataclasses import dataclass

import torch
from accelerate import Accelerator


class StopRequest:
    """Ctrl-C during training asks the loop to stop at the next read of its guard (within `READ_EVERY` optimizer
    steps, or the next checkpoint), after a checkpoint.

    A second Ctrl-C stops at once. Only installed in the main thread, and only when the run checkpoints.
    """

    def __init__(self, active: bool):
        self.requested, self._previous = False, None
        self.active = active and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> StopRequest:
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


READ_EVERY = 16  # optimizer steps between two reads of the guard (it is also read before every checkpoint)


@dataclass
class Position:
    """Where the loop stood before one objective call, with the schedule as it was then."""

    step: int
    batches: int
    count: int
    schedule: dict
    lrs: list[float]


class NonFiniteGuard:
    """Finite-loss test and stop request without a host sync per step.

    Each objective call tests its loss on the device (agreed by all processes with a device-side all-reduce) and
    folds the result into a flag that, once false, stays false. The flag is the `found_inf` of the fused
    optimizer (the mechanism `torch.amp.GradScaler` uses), so from the first non-finite loss on every optimizer
    step is skipped on the device: weights and optimizer moments stay those of the last good step however many
    steps run before the host looks. The host reads the flag, the stop request and the last loss in one transfer
    every `READ_EVERY` steps and before any checkpoint, so no checkpoint is written after a non-finite loss
    unless it is the last good state, rebuilt from the positions kept since the last read (step, batches, logged
    sums and schedule exactly; the random-number states are those of the read). An optimizer that cannot skip on
    the device (not fused, or stepped by a gradient scaler) is read after every call, before its step.
    """

    def __init__(self, optimizer, accelerator: Accelerator, stop: StopRequest):
        self.accelerator, self.stop, self.optimizer = accelerator, stop, optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        self.per_step = accelerator.scaler is not None or not getattr(inner, "_step_supports_amp_scaling", False)
        device = accelerator.device
        self.good = torch.ones((), dtype=torch.bool, device=device)
        self.skip = torch.zeros((), device=device)
        self.good_calls = torch.zeros((), device=device)
        self.bad_value = torch.zeros((), device=device)
        self.last_loss = torch.zeros((), device=device)
        if not self.per_step:
            inner.found_inf = self.skip  # read by the fused kernels: 1 skips the step, moments and count included
        self.positions: list[Position] = []
        self.read_at = 0

    def mark(self, step: int, batches: int, count: int, scheduler) -> None:
        """Remember the position before an objective call (host values only)."""
        self.positions.append(Position(step, batches, count, copy.deepcopy(scheduler.state_dict()),
                                        [g["lr"] for g in self.optimizer.param_groups]))

    def check(self, loss: torch.Tensor) -> bool:
        """Test `loss` on the device; False (read on the host) only when reading per step and it is not finite."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        bad = (~finite).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")  # all-reduce on the device: no host sync
        self.bad_value = torch.where(self.good, torch.where(finite, torch.nan, loss), self.bad_value)
        self.good = self.good & (bad == 0)
        self.good_calls = self.good_calls + self.good
        self.skip.copy_(~self.good)
        self.last_loss = torch.where(finite, loss, self.last_loss)
        return bool(self.good) if self.per_step else True

    def masked(self, value) -> torch.Tensor:
        """`value` where every call so far had a finite loss, else 0: the logged sums of the good steps."""
        return torch.where(self.good, torch.as_tensor(value, device=self.good.device), 0.0)

    def due(self, step: int) -> bool:
        return self.per_step or step - self.read_at >= READ_EVERY

    def read(self, step: int) -> tuple[Position | None, float, bool, float]:
        """One host read: the position before the first non-finite call (None if all were finite), that loss,
        whether any process asked to stop, and the last finite loss."""
        stop = torch.tensor([float(self.stop.requested)], device=self.good.device)
        if self.accelerator.num_processes > 1:
            stop = self.accelerator.reduce(stop, "sum")
        local = torch.stack([self.good.float(), self.good_calls, self.bad_value, self.last_loss])
        good, calls, bad_value, last, stopping = torch.cat([local, stop]).tolist()
        first_bad = None if good else self.positions[int(calls)]
        self.positions, self.read_at = [], step
        self.good_calls = torch.zeros_like(self.good_calls)
        return first_bad, bad_value, stopping > 0, last

    def rewind(self, scheduler, position: Position) -> None:
        """Put the schedule back where it was at `position` (the skipped steps still stepped it)."""
        scheduler.load_state_dict(position.schedule)
        for group, lr in zip(self.optimizer.param_groups, position.lrs, strict=True):
            group["lr"] = lr
