"""Run by tests/test_fsdp.py under FSDP on two CPU processes: a NaN loss on process 1 only, at step 5 (between two
reads of the loop's guard), stops both processes with the one-line error, and the only checkpoint is the
finite state of step 5, which the caller's module holds too."""

import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rrm_hub import RRMError, TrainConfig, train
from rrm_hub.training import enable_cpu_fsdp

accelerator = Accelerator()
enable_cpu_fsdp(accelerator)  # accelerate turns FSDP on for GPU backends only; rrm-hub's own accelerators do this
torch.manual_seed(0)
x = torch.rand(512, 1, 4, 4)
y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
calls = []


def objective(model, x, y):
    calls.append(1)
    loss = F.cross_entropy(model(x), y)
    return (loss * float("nan") if len(calls) == 6 and accelerator.process_index == 1 else loss), {}


out = sys.argv[1]
try:
    train(model, objective, loader, accelerator, TrainConfig(epochs=1, output_dir=out))
    raise AssertionError("no error")
except RRMError as err:
    message = str(err)
assert message.startswith("the loss became nan at step 5; the last good state is in ") and "\n" not in message, message
saved = torch.load(f"{out}/checkpoints/step-00000005/pytorch_model_fsdp.bin", weights_only=True)
assert all(torch.isfinite(v).all() for v in saved.values())
assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
print(f"process {accelerator.process_index}: stopped after {len(calls)} calls, step 5 kept")
accelerator.end_training()
