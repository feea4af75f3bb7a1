"""The one training loop: accelerate, AdamW / SGD, cosine schedule with warm-up, any objective."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .errors import RRMError

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainConfig:
    """How long and how to optimize; `max_steps` (optimizer steps) caps `epochs` when set."""

    epochs: int = 10
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_fraction: float = 0.05
    grad_clip: float | None = None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=True)
    raise RRMError(f"unknown optimizer '{config.optimizer}'; use adamw or sgd")


def _step(model, objective, x, y, optimizer, scheduler, accelerator: Accelerator, config: TrainConfig,
          step: int, total_steps: int) -> tuple[torch.Tensor, dict]:
    """One forward/backward of `objective` and, at the end of an accumulation window, one optimizer step."""
    if hasattr(objective, "schedule"):  # objectives that change over training (e.g. epsilon warm-up)
        objective.schedule(step / total_steps)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss, logs = objective(model, x, y)
        if not torch.isfinite(loss):
            raise RRMError(f"the loss became {loss.item()} at step {step}; lower --lr or use "
                           "--mixed-precision no")
        accelerator.backward(loss)
        if config.grad_clip and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss.detach(), logs


def train(
    model: nn.Module,
    objective: Objective,
    loader: DataLoader,
    accelerator: Accelerator,
    config: TrainConfig,
    on_epoch_end: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Train `model` in place with `objective`; returns the history and the training seconds.

    `on_epoch_end(epoch, model)` may evaluate; its time is not counted in `train_seconds`.
    """
    optimizer = make_optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    replays = getattr(objective, "replays", 1)  # free-AT takes several optimizer steps on each minibatch
    steps_per_epoch = math.ceil(len(loader) / accelerator.gradient_accumulation_steps) * replays  # per process
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process for each optimizer step, hence the factor
    scale = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps) * scale,
                                                total_steps * scale)
    scheduler = accelerator.prepare(scheduler)

    history: list[dict] = []
    step, train_seconds = 0, 0.0
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process, leave=False)
    for epoch in range(epochs):
        model.train()
        started, sums, count = time.perf_counter(), {}, 0
        for x, y in loader:
            for _ in range(replays):
                loss, logs = _step(model, objective, x, y, optimizer, scheduler, accelerator, config, step, total_steps)
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
            if step >= total_steps:
                break
        train_seconds += time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": step, "seconds": round(train_seconds, 2)}
        record.update({key: round(float(value) / max(count, 1), 5) for key, value in sums.items()})
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch, accelerator.unwrap_model(model)))
        history.append(record)
        accelerator.print(" ".join(f"{k}={v}" for k, v in record.items()))
        if step >= total_steps:
            break
    progress.close()
    return {"history": history, "train_seconds": train_seconds, "steps": step, "epochs": len(history)}
