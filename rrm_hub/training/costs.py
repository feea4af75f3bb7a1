"""What a training step takes in memory: the storages saved for backward (activations), and on CUDA the peak
allocated."""

from __future__ import annotations

import weakref

import torch
from torch import nn


def step_memory(model: nn.Module, objective, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor) -> dict:
    """Memory of one training step of `objective`: the bytes of the storages saved for backward during the step
    (activations, each storage counted once while it lives; a storage freed and then saved again at the same
    address, as an attack's next inner step does, counts again, whatever the allocator reuses), and on CUDA the
    peak allocated."""
    live: dict[int, int] = {}  # storage address -> saved tensors alive that use it
    total = 0

    def release(address: int) -> None:
        live[address] -= 1
        if not live[address]:
            del live[address]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in live:
            total += storage.nbytes()
            live[storage.data_ptr()] = 0
        live[storage.data_ptr()] += 1
        weakref.finalize(tensor, release, storage.data_ptr())
        return tensor

    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = objective(model, x, y, *rest)  # rest: the batch's origins, for an objective that keeps a memory
    loss.backward()
    model.zero_grad(set_to_none=True)
    result = {"saved_activation_bytes": total}
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result
