"""Run by tests/test_fsdp.py under `accelerate launch` (FSDP, two CPU processes): runs recipes/rrm.py with the
given flags and records, on each process, how the model that `accelerator.prepare` returned holds its
parameters: `$FSDP_PROBE-<rank>.json` with each parameter's full and local (this process's shard) numel and
placement, and the names of the modules that are FSDP units."""

import json
import os
import runpy
import sys

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

prepare = Accelerator.prepare


def recording_prepare(self, *args, **kwargs):
    result = prepare(self, *args, **kwargs)
    for prepared in result if isinstance(result, tuple | list) else (result,):
        if isinstance(prepared, torch.nn.Module):
            params = {name: {"full": p.numel(), "local": p.to_local().numel() if isinstance(p, DTensor) else p.numel(),
                             "placements": [str(s) for s in p.placements] if isinstance(p, DTensor) else None}
                      for name, p in prepared.named_parameters()}
            units = [name for name, m in prepared.named_modules() if isinstance(m, FSDPModule)]
            record = {"rank": self.process_index, "world": self.num_processes, "class": type(prepared).__name__,
                      "params": params, "fsdp_units": units}
            with open(f"{os.environ['FSDP_PROBE']}-{self.process_index}.json", "w") as file:
                json.dump(record, file)
    return result


Accelerator.prepare = recording_prepare
sys.argv = ["recipes/rrm.py", *sys.argv[1:]]
runpy.run_path("recipes/rrm.py", run_name="__main__")
