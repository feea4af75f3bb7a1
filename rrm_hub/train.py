"""The one training loop: accelerate, AdamW / SGD, cosine schedule with warm-up, any objective."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import checkpoints
from .config import TrainConfig
from .errors import RRMError
from .objectives.base import Objective, as_objective


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
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True)
    raise RRMError(f"unknown optimizer '{config.optimizer}'; use adamw or sgd")


class _StopRequest:
    """Ctrl-C during training asks the loop to stop at the next optimizer step, after a checkpoint.

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


def _step(model, objective: Objective, batch: list, optimizer, scheduler, accelerator: Accelerator, config: TrainConfig,
          step: int, total_steps: int, stop: _StopRequest) -> tuple[torch.Tensor, dict, bool, bool]:
    """One forward/backward of `objective` on `batch` (x, y[, origins]) and, at the end of an accumulation window,
    one optimizer step.

    Returns the loss, its parts, whether the loss was finite and whether any process asked to stop; the
    last two are agreed by all processes, so they stop together.
    """
    objective.schedule(step / total_steps)  # objectives that change over training (e.g. epsilon warm-up)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss, logs = objective(model, *batch)
        status = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=loss.device)
        if accelerator.num_processes > 1:
            status = accelerator.reduce(status, "sum")
        bad, stopping = bool(status[0] > 0), bool(status[1] > 0)
        if bad:
            return loss.detach(), logs, False, stopping
        accelerator.backward(loss)
        if config.grad_clip and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss.detach(), logs, True, stopping


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

    def save(position: TrainState) -> Path | None:
        """Checkpoint `position` unless its step is saved already; returns the latest checkpoint."""
        nonlocal state
        state = replace(position, sums={k: float(v) for k, v in position.sums.items()})
        if root is None:
            return None
        if not (saved and saved[-1] == state.step):
            checkpoints.save(accelerator, root, state, config.keep_checkpoints, objective)
            saved.append(state.step)
        return checkpoints.checkpoints(root)[-1]

    history, step, train_seconds = state.history, state.step, state.train_seconds
    saved: list[int] = [step] if config.resume else []
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process,
                    leave=False)
    stopping = False
    with _StopRequest(root is not None) as stop, progress:  # the bar closes before any message
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
                    loss, logs, finite, stopping = _step(model, objective, batch, optimizer, scheduler, accelerator,
                                                         config, step, total_steps, stop)
                    if not finite:  # the weights are still those of the last step: keep them
                        elapsed = train_seconds + time.perf_counter() - started
                        path = save(TrainState(step, epoch, batches, sums, count, history, elapsed))
                        where = f"; the last good state is in {path} (--resume continues from it)" if path else ""
                        raise RRMError(f"the loss became {loss.item()} at step {step}{where}; lower --lr or use "
                                       "--mixed-precision no")
                    for key, value in {"loss": loss, **logs}.items():  # stays on the device: no sync per step
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                    if accelerator.sync_gradients:
                        step += 1
                        progress.update(1)
                        if step % 10 == 0:
                            progress.set_postfix(loss=f"{float(loss):.4f}", epoch=epoch + 1)
                    if step >= total_steps:
                        break
                batches += 1
                if step >= total_steps:
                    break
                if batches == len(loader) or not accelerator.sync_gradients:
                    continue  # the epoch end saves
                due = config.save_every and step - (saved[-1] if saved else 0) >= config.save_every
                if not (stopping or due):
                    continue
                paused = time.perf_counter()
                position = TrainState(step, epoch, batches, sums, count, history, train_seconds + paused - started)
                if stopping:
                    raise KeyboardInterrupt(_stopped(save(position), step))
                save(position)
                started += time.perf_counter() - paused  # saving is not training time
            train_seconds += time.perf_counter() - started
            record = {"epoch": epoch + 1, "step": step, "seconds": round(train_seconds, 2)}
            record.update({key: round(value, 5) for key, value in _means(sums, count, accelerator).items()})
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch, accelerator.unwrap_model(model)))
            history.append(record)
            accelerator.print(" ".join(f"{k}={v}" for k, v in record.items()))
            save(TrainState(step, epoch + 1, 0, {}, 0, history, train_seconds))
            if step >= total_steps:
                break
            if stopping:
                raise KeyboardInterrupt(_stopped(save(state), step))
    return {"history": history, "train_seconds": train_seconds, "steps": step, "epochs": len(history)}


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


def _stopped(path, step: int) -> str:
    return f"stopped by Ctrl-C at step {step}; the checkpoint {path} holds it: run the same command with --resume"
