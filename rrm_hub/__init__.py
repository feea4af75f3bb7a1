"""rrm-hub: transfer adversarial robustness from any robust model on the Hub into a timm student."""

import sys

from .attacks import Attack, fgsm, nfgsm, pgd
from .config import cli
from .config.runs import AdversarialTrainConfig, DistillConfig, RRMOptions, TrainConfig
from .data.images import ImageData, load_image_data
from .data.loaders import make_loader
from .data.sources import EMBEDDED_MNIST
from .errors import RRMError
from .evaluation.checks import GradientMaskingWarning, MaskingChecks
from .evaluation.evaluate import eps_sweep, evaluate, evaluate_suite
from .evaluation.suites import AutoAttackPart, AutoAttackRun, attack_suite
from .methods import RRM, AdversarialTraining, Natural, Objective
from .models.features import FeatureTap, default_layer, list_layers
from .models.pixel import PixelModel, PixelPreprocess, create_pixel_model
from .models.student import RRMStudent
from .runs.adversarial import adversarial_train
from .runs.distill import RunResult, distill
from .teachers.load import DEFAULT_TEACHER, load_teacher
from .training.loop import TrainState, train

__version__ = "0.1.0"

sys.modules[f"{__name__}.cli"] = cli  # `rrm_hub.cli`, as the README has used it; now `rrm_hub.config.cli`

__all__ = [
    "Attack", "fgsm", "nfgsm", "pgd", "EMBEDDED_MNIST", "ImageData", "load_image_data", "make_loader", "RRMError",
    "eps_sweep", "evaluate", "evaluate_suite", "attack_suite", "AutoAttackRun", "AutoAttackPart", "MaskingChecks",
    "GradientMaskingWarning", "FeatureTap", "default_layer", "list_layers", "PixelModel", "PixelPreprocess",
    "create_pixel_model", "RRM", "AdversarialTraining", "Natural", "RRMStudent", "DEFAULT_TEACHER",
    "load_teacher", "TrainConfig", "TrainState", "train", "Objective", "DistillConfig", "AdversarialTrainConfig",
    "RRMOptions", "RunResult", "distill", "adversarial_train",
]
