"""The one training loop: accelerate, AdamW / SGD, cosine schedule with warm-up, any objective."""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from . import checkpoints
from .config import TrainConfig
from .errors import RRMError
from .objectives.base import Objective, as_objective
from .progress import progress as progress_bar


@dataclass
class TrainState:
    """Where the loop stands: optimizer steps taken, the epoch and the batches done in it, the epoch's sums of the
    logged values so far (over `count` steps), the history of finished epochs and the training seconds. Every
    checkpoint keeps it (`trainer.json`)."""

    step: int = 0
    epoch: int = 0
    batches: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD, fused where torch has the kernels: a fused step can be skipped on the device (`_Guard`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True, fused=fused)
    raise RRMError(f"unknown optimizer '{config.optimizer}'; use adamw or sgd")


class _StopRequest:
    """Ctrl-C during training asks the loop to stop at the next read of its guard (within `READ_EVERY` optimizer
    steps, or the next checkpoint), after a checkpoint.

    A second Ctrl-C stops at once. Only installed in the main thread, and only when the run checkpoints.
    """

    def __init__(self, active: bool):
        self.requested, self._previous = False, None
        self.active = active and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _StopRequest:
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
class _Position:
    """Where the loop stood before one objective call, with the schedule as it was then."""

    step: int
    batches: int
    count: int
    schedule: dict
    lrs: list[float]


class _Guard:
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

    def __init__(self, optimizer, accelerator: Accelerator, stop: _StopRequest):
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
        self.positions: list[_Position] = []
        self.read_at = 0

    def mark(self, step: int, batches: int, count: int, scheduler) -> None:
        """Remember the position before an objective call (host values only)."""
        self.positions.append(_Position(step, batches, count, copy.deepcopy(scheduler.state_dict()),
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

    def read(self, step: int) -> tuple[_Position | None, float, bool, float]:
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

    def rewind(self, scheduler, position: _Position) -> None:
        """Put the schedule back where it was at `position` (the skipped steps still stepped it)."""
        scheduler.load_state_dict(position.schedule)
        for group, lr in zip(self.optimizer.param_groups, position.lrs, strict=True):
            group["lr"] = lr


def _step(model, objective: Objective, batch: list, optimizer, scheduler, accelerator: Accelerator, config: TrainConfig,
          step: int, total_steps: int, guard: _Guard) -> tuple[torch.Tensor, dict]:
    """One forward/backward of `objective` on `batch` (x, y[, origins]) and, at the end of an accumulation window,
    one optimizer step (skipped on the device once `guard` has seen a non-finite loss).

    Returns the loss and its parts, both still on the device.
    """
    objective.schedule(step / total_steps)  # objectives that change over training (e.g. epsilon warm-up)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss, logs = objective(model, *batch)
        if not guard.check(loss):
            return loss.detach(), logs
        accelerator.backward(loss)
        if config.grad_clip and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss.detach(), logs


def train(
    model: nn.Module,
    objective: Objective | Callable,
    loader: DataLoader,
    accelerator: Accelerator,
    config: TrainConfig,
    on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Train `model` in place with `objective` (an `Objective`, or a plain `loss_fn(model, x, y) -> (loss, logs)`);
    returns the history and the training seconds.

    `on_epoch_end(epoch, model)` may evaluate; its time is not counted in `train_seconds`. A run that
    checkpoints (`config.output_dir`) and is resumed sees the same batches, schedule and random numbers as
    one that was never stopped.
    """
    objective = as_objective(objective)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    given, model = model, _trainable(model, accelerator)
    optimizer = make_optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    replays = objective.replays  # free-AT takes several optimizer steps on each minibatch
    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * replays  # per process
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process for each optimizer step, hence the factor
    scale = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup * total_steps) * scale,
                                                total_steps * scale)
    scheduler = accelerator.prepare(scheduler)

    root = Path(config.output_dir) / "checkpoints" if config.output_dir else None
    state = TrainState()
    if config.resume:
        if root is None:
            raise RRMError("--resume needs the run's --output-dir")
        path = checkpoints.resolve(config.resume, root)
        state = checkpoints.load(accelerator, path, objective)
        accelerator.print(f"resuming from {path} (step {state.step}, epoch {state.epoch + 1})")

    def save(position: TrainState, with_objective: bool = True) -> Path | None:
        """Checkpoint `position` unless its step is saved already; returns the latest checkpoint."""
        nonlocal state
        state = replace(position, sums={k: float(v) for k, v in position.sums.items()})
        if root is None:
            return None
        if not (saved and saved[-1] == state.step):
            checkpoints.save(accelerator, root, state, config.keep_checkpoints, objective if with_objective else None)
            saved.append(state.step)
        return checkpoints.checkpoints(root)[-1]

    def look(epoch: int) -> bool:
        """Read the guard: raise on a non-finite loss (after saving the last good state), else say whether to stop."""
        bad, value, stopping, last = guard.read(step)
        if bad is None:
            progress.set_postfix(loss=f"{last:.4f}", epoch=epoch + 1)
            return stopping
        guard.rewind(scheduler, bad)
        elapsed = train_seconds + time.perf_counter() - started
        last_good = TrainState(bad.step, epoch, bad.batches, sums, bad.count, history, elapsed)
        # the objective's own state (e.g. carried perturbations) moved on after the bad step: a resume restarts it
        path = save(last_good, with_objective=False) if _finite_weights(model, accelerator) else None
        path = path or (checkpoints.checkpoints(root)[-1] if root and checkpoints.checkpoints(root) else None)
        where = f"; the last good state is in {path} (--resume continues from it)" if path else ""
        _trained(model, given, accelerator)  # the caller's module holds the last good weights, as without FSDP
        raise RRMError(f"the loss became {value} at step {bad.step}{where}; lower --lr or use --mixed-precision no")

    def stopped(position: TrainState) -> KeyboardInterrupt:
        path = save(position)
        _trained(model, given, accelerator)
        return KeyboardInterrupt(_stopped(path, step))

    history, step, train_seconds = state.history, state.step, state.train_seconds
    saved: list[int] = [step] if config.resume else []
    progress = progress_bar(total=total_steps, initial=step, desc="train", leave=False,
                            disable=not accelerator.is_local_main_process)
    stopping = False
    with _StopRequest(root is not None) as stop, progress:  # the bar closes before any message
        guard = _Guard(optimizer, accelerator, stop)
        guard.read_at = step
        for epoch in range(state.epoch, epochs):
            model.train()
            loader.set_epoch(epoch)  # the shuffle of each epoch depends on the seed and the epoch only
            if hasattr(loader.dataset, "set_epoch"):  # and so may the augmentation (rrm_hub.data.PixelDataset)
                loader.dataset.set_epoch(epoch)
            batches, sums, count = state.batches, dict(state.sums), state.count
            batches_to_go = accelerator.skip_first_batches(loader, batches) if batches else loader
            started = time.perf_counter()
            for batch in batches_to_go:  # (x, y), or (x, y, origins) for an objective that keeps a memory
                if config.channels_last and batch[0].dim() == 4:
                    batch = [batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]]
                for _ in range(replays):
                    guard.mark(step, batches, count, scheduler)
                    loss, logs = _step(model, objective, batch, optimizer, scheduler, accelerator, config, step,
                                       total_steps, guard)
                    for key, value in {"loss": loss, **logs}.items():  # stays on the device: no sync per step
                        sums[key] = sums.get(key, 0.0) + guard.masked(value)
                    count += 1
                    if accelerator.sync_gradients:
                        step += 1
                        progress.update(1)
                    if guard.per_step:
                        stopping = look(epoch)
                    if step >= total_steps:
                        break
                batches += 1
                if step >= total_steps:
                    break
                if batches == len(loader) or not accelerator.sync_gradients:
                    continue  # the epoch end saves
                due = config.save_every and step - (saved[-1] if saved else 0) >= config.save_every
                if not guard.per_step and (due or guard.due(step)):
                    stopping = look(epoch)  # before any checkpoint
                if not (stopping or due):
                    continue
                paused = time.perf_counter()
                position = TrainState(step, epoch, batches, sums, count, history, train_seconds + paused - started)
                if stopping:
                    raise stopped(position)
                save(position)
                started += time.perf_counter() - paused  # saving is not training time
            stopping = look(epoch)  # before the epoch's checkpoint
            train_seconds += time.perf_counter() - started
            record = {"epoch": epoch + 1, "step": step, "seconds": round(train_seconds, 2)}
            record.update({key: round(value, 5) for key, value in _means(sums, count, accelerator).items()})
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch, _trained(model, given, accelerator)))
            history.append(record)
            accelerator.print(" ".join(f"{k}={v}" for k, v in record.items()))
            save(TrainState(step, epoch + 1, 0, {}, 0, history, train_seconds))
            if step >= total_steps:
                break
            if stopping:
                raise stopped(state)
    _trained(model, given, accelerator)
    return {"history": history, "train_seconds": train_seconds, "steps": step, "epochs": len(history)}


def enable_cpu_fsdp(accelerator: Accelerator) -> None:
    """Shard with FSDP on CPU processes when the launch asks for it (`ACCELERATE_USE_CPU=true accelerate launch
    --config_file recipes/configs/accelerate/fsdp.yaml ...`): accelerate turns FSDP on only for GPU backends and
    would silently fall back to DDP over gloo."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):  # AcceleratorState copies the first
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def _trainable(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The module to prepare: `model` itself, or under FSDP (which shards a module in place) a copy, so that
    `model` stays a plain module that `_trained` hands the weights back to."""
    enable_cpu_fsdp(accelerator)
    return copy.deepcopy(model) if accelerator.distributed_type == DistributedType.FSDP else model


def _trained(prepared: nn.Module, given: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The trained model as a plain module: unwrapped, or under FSDP `given` with the full weights gathered on
    every process (so evaluation and saving run as after DDP)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(prepared)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True))
    given.to(accelerator.device).load_state_dict(full)
    return given.train(prepared.training)


def _means(sums: dict, count: int, accelerator: Accelerator) -> dict[str, float]:
    """The epoch's mean of each logged value, over all processes (each saw its own share of the batches)."""
    keys = sorted(sums)
    if not keys:
        return {}
    means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).to(accelerator.device) for k in keys])
    means = means / max(count, 1)
    if accelerator.num_processes > 1:
        means = accelerator.reduce(means, "mean")
    return dict(zip(keys, means.tolist(), strict=True))


def _finite_weights(model: nn.Module, accelerator: Accelerator) -> bool:
    """Whether every parameter and buffer is finite on all processes (the local shards, under FSDP)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in model.state_dict().values()]
    bad = torch.tensor(float(not all(torch.isfinite(t).all() for t in local if t.is_floating_point())),
                       device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad > 0)


def _stopped(path, step: int) -> str:
    return f"stopped by Ctrl-C at step {step}; the checkpoint {path} holds it: run the same command with --resume"
