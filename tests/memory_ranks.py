"""Run by tests/test_scaling.py under `accelerate launch` with two processes: each process stores its own
batch's perturbation; afterwards every process holds both."""

import torch
from accelerate import Accelerator

from rrm_hub.methods.memory import PerturbationMemory

accelerator = Accelerator()
rank = accelerator.process_index  # as the recipes start the processes
memory = PerturbationMemory(3, (1, 2, 2))
memory.remember(torch.tensor([[rank, 0, 0, 0]]), torch.full((1, 1, 2, 2), 0.1 * (rank + 1)))
assert memory.seen.tolist() == [True, True, False], memory.seen
assert torch.allclose(memory.deltas[:2].float(), torch.tensor([0.1, 0.2]).view(2, 1, 1, 1).expand(2, 1, 2, 2),
                      atol=1e-3)
print(f"process {rank}: both perturbations stored")
accelerator.end_training()  # tear the gloo group down before exit: a live one can abort the process as it ends
