"""Training objectives for the one loop in `rrm_hub.train`, built from small parts: input makers (`inputs`), the
teacher's targets (`targets`) and losses (`losses`).

- `Natural`: cross-entropy on clean images.
- `AdversarialTraining`: cross-entropy on attacked images (PGD-AT, fast-AT, N-FGSM-AT, ATTA with a memory).
- `FreeAdversarialTraining`: free-AT, minibatch replays with a persistent perturbation.
- `Distillation`: logit distillation from the teacher (KD).
- `ARD`, `RSLAD`, `AdaAD`: robust distillation of the teacher's logits on attacked images.
- `RRM`: Robust Representation Matching, `w_ce * CE + w_feat * (1 - cos(z_S, z_T))`, at one or several pairs of
  layers, on clean, noisy or attacked images.
"""

from .base import Objective, ObjectiveBase, as_objective, unwrap, warmup_scale
from .inputs import AttackedInputs, CleanInputs, FreeInputs, NoisyInputs
from .losses import Mismatch, distillation_loss, feature_loss, kl_divergence
from .robust_distillation import ARD, RSLAD, AdaAD, RobustDistillation
from .rrm import RRM
from .targets import TeacherTargets
from .training import AdversarialTraining, Distillation, FreeAdversarialTraining, Natural

__all__ = ["Objective", "ObjectiveBase", "as_objective", "unwrap", "warmup_scale", "AttackedInputs", "CleanInputs",
           "FreeInputs", "NoisyInputs", "Mismatch", "distillation_loss", "feature_loss", "kl_divergence", "ARD",
           "RSLAD", "AdaAD", "RobustDistillation", "RRM", "TeacherTargets", "AdversarialTraining", "Distillation",
           "FreeAdversarialTraining", "Natural"]
