"""The one training loop, read as timm's `train_one_epoch`: for each epoch, for each batch, one step of the
objective (accelerate, AdamW / SGD, cosine schedule with warm-up). Beside it: the `Checkpointer` (checkpoints, resume,
run ownership) and the `NonFiniteGuard` (a non-finite loss and Ctrl-C, read on the host every few steps)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from ..config.runs import TrainConfig
from ..errors import RRMError
from ..methods.base import Objective, as_objective
from ..progress import progress as progress_bar
from .checkpoints import Checkpointer, TrainState
from .distributed import finite_weights, means, trainable, trained
from .guard import READ_EVERY, NonFiniteGuard, StopRequest

__all__ = ["READ_EVERY", "TrainState", "make_optimizer", "train", "train_one_epoch"]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD, fused where torch has the kernels: a fused step can be skipped on the device (`NonFiniteGuard`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True, fused=fused)
    raise RRMError(f"unknown optimizer '{config.optimizer}'; use adamw or sgd")


@dataclass
class Plan:
    """How long the run is: optimizer steps per epoch (per process), in all, and the epochs they take."""

    steps_per_epoch: int
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, loader: DataLoader, accelerator: Accelerator, config: TrainConfig, replays: int) -> Plan:
        per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * replays
        total = min(config.epochs * per_epoch, config.max_steps or config.epochs * per_epoch)
        return cls(per_epoch, total, math.ceil(total / per_epoch))


def make_scheduler(optimizer, config: TrainConfig, total_steps: int, accelerator: Accelerator):
    """Cosine with linear warm-up; accelerate steps a prepared scheduler once per process for each optimizer step,
    hence the factor."""
    scale = accelerator.num_processes
    return get_cosine_schedule_with_warmup(optimizer, int(config.warmup * total_steps) * scale, total_steps * scale)


@dataclass
class Run:
    """What the loop works with, prepared: the model (`given`: the caller's module, which gets the weights back), the
    objective, optimizer, schedule, loader, plan, guard, checkpointer and progress bar."""

    model: nn.Module
    given: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: DataLoader
    accelerator: Accelerator
    config: TrainConfig
    plan: Plan
    guard: NonFiniteGuard
    checkpointer: Checkpointer
    bar: progress_bar

    def step(self, batch: list, state: TrainState) -> None:
        """One forward/backward of the objective on `batch` (x, y[, origins]) and, at the end of an accumulation
        window, one optimizer step (skipped on the device once the guard has seen a non-finite loss); the logged
        values are summed on the device."""
        accelerator, guard = self.accelerator, self.guard
        guard.mark(state.step, state.batches, state.count, self.scheduler)
        self.objective.schedule(state.step / self.plan.total_steps)  # e.g. an epsilon warm-up
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                loss, logs = self.objective(self.model, *batch)
            if guard.check(loss):
                accelerator.backward(loss)
                if self.config.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
        for key, value in {"loss": loss.detach(), **logs}.items():  # stays on the device: no sync per step
            state.sums[key] = state.sums.get(key, 0.0) + guard.masked(value)
        state.count += 1
        if accelerator.sync_gradients:
            state.step += 1
            self.bar.update(1)

    def trained(self) -> nn.Module:
        return trained(self.model, self.given, self.accelerator)

    def look(self, state: TrainState, elapsed: float) -> bool:
        """Read the guard: raise on a non-finite loss (after saving the last good state), else say whether to stop."""
        bad, value, stopping, last = self.guard.read(state.step)
        if bad is None:
            self.bar.set_postfix(loss=f"{last:.4f}", epoch=state.epoch + 1)
            return stopping
        self.guard.rewind(self.scheduler, bad)
        last_good = replace(state, step=bad.step, batches=bad.batches, count=bad.count, train_seconds=elapsed)
        # the objective's own state (e.g. carried perturbations) moved on after the bad step: a resume restarts it
        path = self.save(last_good, with_objective=False) if finite_weights(self.model, self.accelerator) else None
        path = path or self.checkpointer.latest()
        where = f"; the last good state is in {path} (--resume continues from it)" if path else ""
        self.trained()  # the caller's module holds the last good weights, as without FSDP
        raise RRMError(f"the loss became {value} at step {bad.step}{where}; lower --lr or use --mixed-precision no")

    def save(self, state: TrainState, with_objective: bool = True):
        return self.checkpointer.save(replace(state, sums={k: float(v) for k, v in state.sums.items()}),
                                      with_objective)

    def stop(self, state: TrainState) -> KeyboardInterrupt:
        """Ctrl-C: save where the loop stands, give the caller the weights, say how to go on."""
        path = self.save(state)
        self.trained()
        return KeyboardInterrupt(f"stopped by Ctrl-C at step {state.step}; the checkpoint {path} holds it: run the "
                                 "same command with --resume")


def train(
    model: nn.Module,
    objective: Objective | Callable,
    loader: DataLoader,
    accelerator: Accelerator,
    config: TrainConfig,
    on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Train `model` in place with `objective` (an `Objective`, or a plain `loss_fn(model, x, y) -> (loss, logs)`);
    returns the history, the training seconds, the steps and epochs, and the schedule's re-plans.

    `on_epoch_end(epoch, model)` may evaluate; its time is not counted in `train_seconds`. A run that
    checkpoints (`config.output_dir`) and is resumed sees the same batches, schedule and random numbers as
    one that was never stopped.
    """
    objective = as_objective(objective)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    given, model = model, trainable(model, accelerator)
    optimizer = make_optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plan = Plan.of(loader, accelerator, config, objective.replays)
    scheduler = accelerator.prepare(make_scheduler(optimizer, config, plan.total_steps, accelerator))
    checkpointer = Checkpointer(config, accelerator, objective)
    state = checkpointer.start(plan.total_steps)  # fresh, or where --resume left off
    bar = progress_bar(total=plan.total_steps, initial=state.step, desc="train", leave=False,
                       disable=not accelerator.is_local_main_process)
    with StopRequest(checkpointer.enabled) as stop, bar:  # the bar closes before any message
        guard = NonFiniteGuard(optimizer, accelerator, stop)
        guard.read_at = state.step
        run = Run(model, given, objective, optimizer, scheduler, loader, accelerator, config, plan, guard,
                  checkpointer, bar)
        for epoch in range(state.epoch, plan.epochs):
            state = train_one_epoch(run, epoch, state, on_epoch_end)
            if state.step >= plan.total_steps:
                break
    run.trained()
    return {"history": state.history, "train_seconds": state.train_seconds, "steps": state.step,
            "epochs": len(state.history), "schedule_replanned": state.replanned, "run_id": state.run_id,
            "checkpoint": str(checkpointer.latest()) if checkpointer.latest() else None}


def train_one_epoch(run: Run, epoch: int, state: TrainState,
                    on_epoch_end: Callable[[int, nn.Module], dict] | None = None) -> TrainState:
    """One epoch (or the rest of one, when resumed mid-epoch): every batch's steps, the periodic checkpoints and
    guard reads, then the epoch's record (the logged means, `on_epoch_end`'s check) and its checkpoint."""
    run.model.train()
    run.loader.set_epoch(epoch)  # the shuffle of each epoch depends on the seed and the epoch only
    if hasattr(run.loader.dataset, "set_epoch"):  # and so may the augmentation (rrm_hub.data.PixelDataset)
        run.loader.dataset.set_epoch(epoch)
    state = replace(state, epoch=epoch, sums=dict(state.sums))
    batches = run.accelerator.skip_first_batches(run.loader, state.batches) if state.batches else run.loader
    clock, stopping = Stopwatch(state.train_seconds), False
    for batch in batches:
        if run.config.channels_last and batch[0].dim() == 4:
            batch = [batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]]
        for _ in range(run.objective.replays):  # free-AT takes several optimizer steps on each minibatch
            run.step(batch, state)
            stopping = run.look(state, clock.seconds) if run.guard.per_step else stopping
            if state.step >= run.plan.total_steps:
                break
        state.batches += 1
        if state.step >= run.plan.total_steps or state.batches == len(run.loader):
            break  # the epoch's end reads the guard and saves
        stopping = checkpoint_if_due(run, state, clock, stopping)
    stopping = run.look(state, clock.seconds) or stopping  # before the epoch's checkpoint
    state.train_seconds = clock.seconds
    return end_epoch(run, state, on_epoch_end, stopping)


def end_epoch(run: Run, state: TrainState, on_epoch_end, stopping: bool) -> TrainState:
    """The epoch's record (step, training seconds, the logged means, `on_epoch_end`'s check), printed and kept in the
    history, then its checkpoint; on Ctrl-C the stop."""
    record = {"epoch": state.epoch + 1, "step": state.step, "seconds": round(state.train_seconds, 2)}
    record.update({key: round(value, 5) for key, value in means(state.sums, state.count, run.accelerator).items()})
    if on_epoch_end is not None:
        record.update(on_epoch_end(state.epoch, run.trained()))
    state.history.append(record)
    run.accelerator.print(" ".join(f"{k}={v}" for k, v in record.items()))
    if state.batches >= len(run.loader):  # else stopped by --max-steps mid-epoch: a resume goes on from here
        state = replace(state, epoch=state.epoch + 1, batches=0, sums={}, count=0)
    run.save(state)
    if stopping:
        raise run.stop(state)
    return state


def checkpoint_if_due(run: Run, state: TrainState, clock: Stopwatch, stopping: bool) -> bool:
    """Inside an epoch, after a batch: read the guard every `READ_EVERY` steps and before a checkpoint
    (`--save-every`); on Ctrl-C save and stop. Returns whether a stop was asked for."""
    if not run.accelerator.sync_gradients:
        return stopping  # inside an accumulation window
    due = bool(run.config.save_every) and state.step - (run.checkpointer.saved_step or 0) >= run.config.save_every
    if not run.guard.per_step and (due or run.guard.due(state.step)):
        stopping = run.look(state, clock.seconds)
    if stopping:
        raise run.stop(replace(state, train_seconds=clock.seconds))
    if due:
        with clock.paused():  # saving is not training time
            run.save(replace(state, train_seconds=clock.seconds))
    return stopping


class Stopwatch:
    """Training seconds, from `seconds` on: running, except while `paused`."""

    def __init__(self, seconds: float = 0.0):
        self.base, self.since = seconds, time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.base + time.perf_counter() - self.since

    @contextmanager
    def paused(self):
        seconds = self.seconds
        try:
            yield
        finally:
            self.base, self.since = seconds, time.perf_counter()
