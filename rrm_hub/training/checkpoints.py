"""Training checkpoints, owned by the run that wrote them: `accelerator.save_state` written atomically into
`<output-dir>/checkpoints/step-XXXXXXXX`, with `trainer.json` (a `TrainState`: where the loop stood, and which run it
is) and `objective.safetensors` (the objective's own state, e.g. a perturbation memory) beside the accelerate files.

A checkpoint is written into a `.partial-*` folder and renamed only once complete, so the latest checkpoint is never
half written, whatever kills the run. Every checkpoint records its run's id: a new run refuses a folder that holds
another run's checkpoints (unless it resumes that run, or was told to start over), rotation removes only the
run's own, and `--resume` continues the run it names. (accelerate's `ProjectConfiguration(total_limit=...)` rotates
too, but names and counts every checkpoint folder of the directory, whoever wrote it, and writes in place.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import RRMError

if TYPE_CHECKING:
    from ..config.runs import TrainConfig
    from ..methods.base import Objective

TRAINER_STATE = "trainer.json"
OBJECTIVE_STATE = "objective.safetensors"
PREFIX = "step-"


@dataclass
class TrainState:
    """Where the loop stands: optimizer steps taken, the epoch and the batches done in it, the epoch's sums of the
    logged values so far (over `count` steps), the history of finished epochs and the training seconds; the run's id,
    the steps its schedule was planned for and the re-plans of a resumed run that goes on for longer. Every
    checkpoint keeps it (`trainer.json`)."""

    step: int = 0
    epoch: int = 0
    batches: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    run_id: str = ""
    planned_steps: int = 0
    replanned: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def run_of(path: Path) -> str:
    """The id of the run that wrote checkpoint `path` ('' for checkpoints of rrm-hub versions before run ids)."""
    try:
        return json.loads((path / TRAINER_STATE).read_text()).get("run_id", "")
    except (OSError, ValueError):
        return ""


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
    `objective` is None) as `root/step-<state.step>`; then remove the run's own checkpoints beyond the last `keep`.

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
            own = [p for p in checkpoints(root) if run_of(p) == state.run_id]
            for old in own[:-max(keep, 1)]:
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
    """Restore the states saved in `path` into the prepared objects (and `objective`); returns its trainer state.
    A random state that cannot be read safely is refused (accelerate would go on without it, silently)."""
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
    check_random_state(path, accelerator)
    return state


def check_random_state(path: Path, accelerator: Accelerator) -> None:
    """A checkpoint's random state must load weights-only; a missing one is a stated choice to go on without it."""
    from accelerate.utils.other import load as safe_load

    name = f"random_states_{accelerator.process_index}.pkl"
    if not (path / name).exists():
        accelerator.print(f"resuming without the random state ({path / name} is not there): the run continues on "
                          "fresh randomness, not the stopped run's")
        return
    try:
        safe_load(path / name)  # weights-only, with accelerate's own allowed types
    except Exception as err:  # pickle, torch and numpy raise many types for a file that is not safe to load
        raise RRMError(f"--resume: the random state {path / name} cannot be loaded safely ({type(err).__name__}), so "
                       "the run would go on with different randomness; delete that file to resume without it, or "
                       "resume from another checkpoint") from None


class Checkpointer:
    """The checkpoints of one run in `<output_dir>/checkpoints` (none without an output folder): where the run
    starts (`start`: fresh, or the checkpoint `--resume` names), `save`, and the run's latest checkpoint."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, objective: Objective):
        self.config, self.accelerator, self.objective = config, accelerator, objective
        self.root = Path(config.output_dir) / "checkpoints" if config.output_dir else None
        self.run_id, self.saved_step = "", None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def start(self, total_steps: int) -> TrainState:
        """A fresh state with a new run id, or the resumed one (its schedule re-planned, and said so, when the run now
        goes on for a different number of steps). A folder holding another run's checkpoints is refused unless
        --overwrite-output-dir says to start over."""
        if self.config.resume:
            state = self._resume(total_steps)
        else:
            found = checkpoints(self.root) if self.root else []
            if found and not self.config.overwrite_output_dir:
                raise RRMError(f"'{self.root.parent}' holds checkpoints of an earlier run (up to {found[-1].name}): "
                               "add --resume to continue it, --overwrite-output-dir to start over (they are removed "
                               "once this run saves its first), or choose another --output-dir")
            state = TrainState(run_id=self._new_run_id(), planned_steps=total_steps)
        self.run_id = state.run_id
        return state

    def _new_run_id(self) -> str:
        """A new run's id, the main process's on every process."""
        from accelerate.utils import broadcast_object_list

        run_id = [uuid.uuid4().hex[:12]]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(run_id, from_process=0)
        return run_id[0]

    def _resume(self, total_steps: int) -> TrainState:
        if self.root is None:
            raise RRMError("--resume needs the run's --output-dir")
        path = resolve(self.config.resume, self.root)
        state = load(self.accelerator, path, self.objective)
        self.saved_step = state.step
        if state.batches and state.history and state.history[-1]["epoch"] == state.epoch + 1:
            state.history.pop()  # the record of an epoch stopped by --max-steps: the epoch now goes on
        if state.planned_steps and state.planned_steps != total_steps:
            state.replanned.append({"at_step": state.step, "from_steps": state.planned_steps, "to_steps": total_steps})
            self.accelerator.print(f"the learning-rate schedule is re-planned for {total_steps} steps (it was planned "
                                   f"for {state.planned_steps}): the same warm-up and cosine over the new length, "
                                   f"continued from step {state.step}")
        state.planned_steps = total_steps
        self.accelerator.print(f"resuming from {path} (step {state.step}, epoch {state.epoch + 1})")
        return state

    def save(self, state: TrainState, with_objective: bool = True) -> Path | None:
        """Checkpoint `state` unless its step is saved already (then remove the checkpoints of a run this one
        overwrites); returns the run's latest checkpoint (None without an output folder)."""
        if self.root is None:
            return None
        if self.saved_step != state.step:
            save(self.accelerator, self.root, state, self.config.keep_checkpoints,
                 self.objective if with_objective else None)
            self.saved_step = state.step
            if self.accelerator.is_main_process:
                for other in checkpoints(self.root):
                    if run_of(other) != self.run_id:
                        shutil.rmtree(other, ignore_errors=True)
        return self.latest()

    def latest(self) -> Path | None:
        """This run's latest checkpoint, or None."""
        own = [p for p in checkpoints(self.root) if run_of(p) == self.run_id] if self.root else []
        return own[-1] if own else None
