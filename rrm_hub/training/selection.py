"""`BestEpoch`: end a run with the weights of its most robust epoch, judged on held-out training images.

Robust accuracy on unseen images can peak before the end of training and fall after (robust overfitting: Rice et
al., "Overfitting in adversarially robust deep learning", ICML 2020); keeping the best epoch is their remedy. The
judge must not be the test set, or the reported test numbers would be chosen on themselves: the recipes hold
images out of the training split for it (`--holdout`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import RRMError

FILENAME = "best-epoch.safetensors"


class BestEpoch:
    """A per-epoch callback for `train` that runs `check` (a dict with `metric` among its keys) and keeps the
    weights of the epoch with the highest `metric`: in memory, and in `folder`/best-epoch.safetensors where a folder
    is given (written by the main process). `previous`: the checkpoints folder of the run being resumed, whose best
    epoch so far counts if it is not after the epoch the run resumes at."""

    def __init__(self, check: Callable[[int, nn.Module], dict], metric: str, folder: Path | None,
                 previous: Path | None = None, main_process: bool = True):
        self.check, self.metric, self.main_process = check, metric, main_process
        self.path = Path(folder) / FILENAME if folder is not None else None
        self.best, self.epoch, self.state, self.on_disk = float("-inf"), 0, None, None
        earlier = Path(previous) / FILENAME if previous is not None else None
        if earlier is not None and earlier.exists():
            try:
                with safe_open(str(earlier), "pt") as file:
                    meta = file.metadata() or {}
                self.best, self.epoch, self.on_disk = float(meta["accuracy"]), int(meta["epoch"]), earlier
            except (SafetensorError, OSError, KeyError, ValueError):
                raise RRMError(f"{earlier} is damaged; delete it and resume again (the run's best epoch is then "
                               "chosen from the epochs still to come)") from None

    def __call__(self, epoch: int, model: nn.Module) -> dict:
        if self.epoch > epoch:  # the best so far came after the checkpoint resumed from: it no longer counts
            self.best, self.epoch, self.on_disk = float("-inf"), 0, None
        record = self.check(epoch, model)
        if record[self.metric] > self.best:
            self.best, self.epoch, self.on_disk = record[self.metric], epoch + 1, None
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if self.main_process and self.path is not None:
                self._save(model)
        return {**record, "best_epoch": self.epoch}

    def _save(self, model: nn.Module) -> None:
        """Write the weights atomically: a crash leaves the previous best file whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        try:
            save_model(model, str(partial), metadata={"epoch": str(self.epoch), "accuracy": repr(self.best),
                                                       "metric": self.metric})
            os.replace(partial, self.path)
        except (OSError, SafetensorError) as err:
            partial.unlink(missing_ok=True)
            raise RRMError(f"cannot save the best epoch's weights to {self.path} ({err}); free disk space or "
                           "choose another --output-dir") from None

    def restore(self, model: nn.Module) -> dict:
        """Load the best epoch's weights into `model`; returns which epoch that was and its accuracy."""
        if self.state is not None and self.on_disk is None:
            model.load_state_dict(self.state)
        elif self.on_disk is not None:  # resumed after the best epoch: its weights are only on disk
            try:
                load_model(model, str(self.on_disk), device=str(next(model.parameters()).device))
            except (RuntimeError, SafetensorError, OSError) as err:
                first = str(err).strip().splitlines()[0][:120]
                raise RRMError(f"{self.on_disk} does not hold this model's weights ({first}); delete it and train "
                               "again, or drop --keep-best") from None
        else:
            raise RRMError("no epoch was checked, so none can be kept: drop --keep-best or train for an epoch")
        return {"epoch": self.epoch, self.metric: self.best}


def late_fall(history: list[dict], metric: str = "pgd10", margin: float = 0.05) -> str | None:
    """A one-line note when the per-epoch check's `metric` ended more than `margin` below its best, else None."""
    values = [(record[metric], record["epoch"]) for record in history if record.get(metric) is not None]
    if not values:
        return None
    (best, epoch), last = max(values, key=lambda v: (v[0], -v[1])), values[-1][0]
    if best - last <= margin:
        return None
    return (f"note: the per-epoch check's {metric} peaked at {best:.1%} (epoch {epoch}) and ended at {last:.1%}; "
            "--holdout 500 --keep-best ends a run with its most robust epoch")
