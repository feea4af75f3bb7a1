"""rrm-hub: transfer adversarial robustness from any robust model on the Hub into a timm student.

The public names below are loaded on first use, so that a program importing one part (a benchmark on a machine
without `datasets`, say) pays for that part only.
"""

import importlib
import sys

from .config import cli

__version__ = "0.1.0"

sys.modules[f"{__name__}.cli"] = cli  # `rrm_hub.cli`, as the README has used it; now `rrm_hub.config.cli`

_WHERE = {
    ".attacks": ["Attack", "fgsm", "nfgsm", "pgd"],
    ".config.runs": ["AdversarialTrainConfig", "DistillConfig", "RRMOptions", "TrainConfig"],
    ".data.images": ["ImageData", "load_image_data"],
    ".data.loaders": ["make_loader"],
    ".data.sources": ["EMBEDDED_MNIST"],
    ".errors": ["RRMError"],
    ".evaluation.checks": ["GradientMaskingWarning", "MaskingChecks"],
    ".evaluation.evaluate": ["eps_sweep", "evaluate", "evaluate_suite"],
    ".evaluation.suites": ["AutoAttackPart", "AutoAttackRun", "attack_suite"],
    ".methods": ["RRM", "AdversarialTraining", "Natural", "Objective"],
    ".models.features": ["FeatureTap", "default_layer", "list_layers"],
    ".models.pixel": ["PixelModel", "PixelPreprocess", "create_pixel_model"],
    ".models.student": ["RRMStudent"],
    ".runs.adversarial": ["adversarial_train"],
    ".runs.distill": ["RunResult", "distill"],
    ".teachers.load": ["DEFAULT_TEACHER", "load_teacher"],
    ".training.loop": ["TrainState", "train"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [name for names in _WHERE.values() for name in names]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
