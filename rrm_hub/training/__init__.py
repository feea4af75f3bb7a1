"""The one training loop (`train`, read as timm's `train_one_epoch`), its checkpoints (`Checkpointer`, run ownership
and resume), its guard (`NonFiniteGuard`, Ctrl-C) and the epoch kept (`BestEpoch`)."""

from .checkpoints import Checkpointer, TrainState
from .distributed import enable_cpu_fsdp
from .guard import NonFiniteGuard, StopRequest
from .loop import make_optimizer, train, train_one_epoch
from .selection import BestEpoch

__all__ = ["Checkpointer", "TrainState", "enable_cpu_fsdp", "NonFiniteGuard", "StopRequest", "make_optimizer", "train",
           "train_one_epoch", "BestEpoch"]
