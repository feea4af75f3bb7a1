"""rrm-hub: transfer adversarial robustness from any robust model on the Hub into a timm student."""

from .attacks import Attack, fgsm, nfgsm, pgd
from .checks import GradientMaskingWarning, MaskingChecks
from .config import AdversarialTrainConfig, DistillConfig, RRMOptions, TrainConfig
from .data import EMBEDDED_MNIST, ImageData, load_image_data, make_loader
from .errors import RRMError
from .evaluate import eps_sweep, evaluate, evaluate_suite
from .features import FeatureTap, default_layer, list_layers
from .models import PixelModel, PixelPreprocess, create_pixel_model
from .objectives import RRM, AdversarialTraining, Natural, Objective
from .pipeline import RunResult, adversarial_train, distill
from .student import RRMStudent
from .suites import AutoAttackPart, AutoAttackRun, attack_suite
from .teachers import DEFAULT_TEACHER, load_teacher
from .train import TrainState, train

__version__ = "0.1.0"

__all__ = [
    "Attack", "fgsm", "nfgsm", "pgd", "EMBEDDED_MNIST", "ImageData", "load_image_data", "make_loader", "RRMError",
    "eps_sweep", "evaluate", "evaluate_suite", "attack_suite", "AutoAttackRun", "AutoAttackPart", "MaskingChecks",
    "GradientMaskingWarning", "FeatureTap", "default_layer", "list_layers", "PixelModel", "PixelPreprocess",
    "create_pixel_model", "RRM", "AdversarialTraining", "Natural", "RRMStudent", "DEFAULT_TEACHER",
    "load_teacher", "TrainConfig", "TrainState", "train", "Objective", "DistillConfig", "AdversarialTrainConfig",
    "RRMOptions", "RunResult", "distill", "adversarial_train",
]
