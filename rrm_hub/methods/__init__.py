"""Training methods, one object each (`Method`, in `registry`), and the objectives they build for the one loop in
`rrm_hub.training`, from small parts: input makers (`inputs`), the teacher's targets (`targets`) and losses (`losses`).

- `natural`: cross-entropy on clean images.
- `adversarial`: PGD-AT, fast-AT, N-FGSM-AT, ATTA-AT (a carried attack, `memory`) and free-AT.
- `kd`: logit distillation from the teacher.
- `robust_distillation`: ARD, RSLAD, AdaAD, the teacher's logits on attacked images.
- `rrm`: Robust Representation Matching, `w_ce * CE + w_feat * (1 - cos(z_S, z_T))`, at one or several pairs of
  layers, on clean, noisy, mixed, shifted or attacked images.
"""

from .adversarial import AdversarialTraining, FreeAdversarialTraining
from .base import Objective, ObjectiveBase, as_objective, unwrap, warmup_scale
from .inputs import AttackedInputs, CleanInputs, FreeInputs, NoisyInputs
from .kd import Distillation
from .losses import Mismatch, distillation_loss, feature_loss, kl_divergence
from .method import Cost, Method, Parts
from .natural import Natural
from .options import RobustDistillOptions, RRMOptions
from .registry import build, cache_refusal, cacheable, check, get, make_objective, names, step_cost
from .robust_distillation import ARD, RSLAD, AdaAD, RobustDistillation
from .rrm import RRM
from .targets import TeacherTargets

__all__ = ["Objective", "ObjectiveBase", "as_objective", "unwrap", "warmup_scale", "AttackedInputs", "CleanInputs",
           "FreeInputs", "NoisyInputs", "Mismatch", "distillation_loss", "feature_loss", "kl_divergence", "ARD",
           "RSLAD", "AdaAD", "RobustDistillation", "RRM", "TeacherTargets", "AdversarialTraining", "Distillation",
           "FreeAdversarialTraining", "Natural", "Method", "Parts", "Cost", "RRMOptions", "RobustDistillOptions",
           "build", "cache_refusal", "cacheable", "check", "get", "make_objective", "names", "step_cost"]
