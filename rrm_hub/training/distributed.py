"""Training across processes: the accelerator (made with FSDP on CPU processes when the launch asks for it), the
module to prepare (a copy under FSDP, which shards in place) and the trained weights handed back, and the values all
processes agree on."""

from __future__ import annotations

import copy
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    parse_flag_from_env,
    set_seed,
)
from torch import nn

from ..config.sections import TrainConfig
from ..errors import RRMError


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


def trainable(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The module to prepare: `model` itself, or under FSDP (which shards a module in place) a copy, so that
    `model` stays a plain module that `trained` hands the weights back to (FSDP on CPU processes is switched on where
    the accelerator is made: `enable_cpu_fsdp`)."""
    return copy.deepcopy(model) if accelerator.distributed_type == DistributedType.FSDP else model


def trained(prepared: nn.Module, given: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The trained model as a plain module: unwrapped, or under FSDP `given` with the full weights gathered on
    every process (so evaluation and saving run as after DDP)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(prepared)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True))
    given.to(accelerator.device).load_state_dict(full)
    return given.train(prepared.training)


def means(sums: dict, count: int, accelerator: Accelerator) -> dict[str, float]:
    """The epoch's mean of each logged value, over all processes (each saw its own share of the batches)."""
    keys = sorted(sums)
    if not keys:
        return {}
    means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).to(accelerator.device) for k in keys])
    means = means / max(count, 1)
    if accelerator.num_processes > 1:
        means = accelerator.reduce(means, "mean")
    return dict(zip(keys, means.tolist(), strict=True))


def finite_weights(model: nn.Module, accelerator: Accelerator) -> bool:
    """Whether every parameter and buffer is finite on all processes (the local shards, under FSDP)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in model.state_dict().values()]
    bad = torch.tensor(float(not all(torch.isfinite(t).all() for t in local if t.is_floating_point())),
                       device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad > 0)


def make_accelerator(training: TrainConfig) -> Accelerator:
    """An `Accelerator` for the training settings (FSDP on CPU processes when the launch asks for it); seeds every
    process identically. Refuses a launch that started several processes which would each train alone
    (accelerate's `--multi_gpu` on a machine without GPUs does that): duplicated work and two writers of one folder;
    and mixed precision the device cannot do."""
    if training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RRMError("--mixed-precision fp16 needs a GPU (on a CPU it would silently run in float32); use "
                       "--mixed-precision bf16 or no")
    accelerator = Accelerator(mixed_precision=training.mixed_precision,
                              gradient_accumulation_steps=training.grad_accum,
                              dynamo_backend="inductor" if training.compile else "no",
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise RRMError(f"{os.environ['WORLD_SIZE']} processes were started but each would train alone; on CPUs "
                       "launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...")
    enable_cpu_fsdp(accelerator)
    set_seed(training.seed)
    return accelerator
