"""Training checkpoints: `accelerator.save_state` written atomically into `<output-dir>/checkpoints/step-XXXXXXXX`.

A checkpoint is written into a `.partial-*` folder and renamed only once complete, so the latest checkpoint
(the highest `step-*` folder) is never half written, whatever kills the run. `trainer.json` beside the
accelerate files holds where the loop stood: step, epoch, batches done in the epoch, history;
`objective.safetensors` the objective's own state, where it has one (`checkpoint_state()`, e.g. a perturbation
memory).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RRMError

if TYPE_CHECKING:
    from .objectives.base import Objective
    from .train import TrainState

TRAINER_STATE = "trainer.json"
OBJECTIVE_STATE = "objective.safetensors"
PREFIX = "step-"


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(spec: str, root: Path) -> Path:
    """The checkpoint `--resume` names: `auto` (latest under `root`) or a checkpoint folder."""
    if spec == "auto":
        found = checkpoints(root)
        if not found:
            raise RRMError(f"--resume: no checkpoint in '{root}'; train without --resume, or give a checkpoint folder")
        return found[-1]
    path = Path(spec)
    if path.is_dir() and not (path / TRAINER_STATE).exists() and checkpoints(path / "checkpoints"):
        return checkpoints(path / "checkpoints")[-1]  # an output folder
    if not (path / TRAINER_STATE).exists():
        raise RRMError(f"--resume: '{spec}' is not a checkpoint (no {TRAINER_STATE}); give a checkpoints/step-* "
                       "folder, an output folder, or auto")
    return path


def save(accelerator: Accelerator, root: Path, state: TrainState, keep: int, objective: Objective | None) -> Path:
    """Save model, optimizer, scheduler and RNG states plus `state` (and `objective.checkpoint_state()`, unless
    `objective` is None) as `root/step-<state.step>`.

    Every process must call this. A full disk or an unwritable folder raises `RRMError`; earlier
    checkpoints stay as they were.
    """
    final = root / f"{PREFIX}{state.step:08d}"
    partial = root / f".partial-{final.name}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        # on every process: an objective may need them all to gather its state (a perturbation memory does)
        extra = objective.checkpoint_state() if objective is not None else None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / TRAINER_STATE).write_text(json.dumps(state.to_json(), indent=1))
            if extra:
                save_file({k: v.contiguous() for k, v in extra.items()}, str(partial / OBJECTIVE_STATE))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in checkpoints(root)[:-max(keep, 1)]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        full = " (the disk is full)" if getattr(err, "errno", None) == errno.ENOSPC else ""
        kept = checkpoints(root)
        before = f"; the checkpoint {kept[-1]} is kept" if kept else ""
        raise RRMError(f"could not save the checkpoint of step {state.step} in '{root}'{full}: "
                       f"{getattr(err, 'strerror', None) or err}{before}") from None
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path, objective: Objective) -> TrainState:
    """Restore the states saved in `path` into the prepared objects (and `objective`); returns its trainer state."""
    from .train import TrainState

    try:
        state = TrainState.from_json(json.loads((path / TRAINER_STATE).read_text()))
        accelerator.load_state(str(path))
        if (path / OBJECTIVE_STATE).exists():
            objective.load_checkpoint_state(load_file(str(path / OBJECTIVE_STATE)))
    except RRMError:
        raise
    except Exception as err:  # torch, safetensors and json raise many types for a bad file; all mean the same
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise RRMError(f"--resume: cannot load checkpoint '{path}' ({type(err).__name__}: {first}); it is damaged, "
                       "unsafe or from another model: resume from an earlier one or start afresh") from None
    return state
