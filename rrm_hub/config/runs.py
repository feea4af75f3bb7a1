"""Run configuration: the RRM options and the recipes' run configs, built from the shared sections of
`rrm_hub.sections`. Every rule across settings is written once, in `RunConfig.validate` (called by
`rrm_hub.cli.parse`, and by `rrm_hub.distill` for a config built in Python) and `RRMOptions.check` (which
`rrm_hub.RRM` calls too).

The recipes' flags are generated from these dataclasses (`rrm_hub.cli`); YAML files hold the same settings by
section (`training: {epochs: 40}`); every run writes its own as `run_config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from .. import methods, settings
from ..errors import RRMError
from ..evaluation.suites import check_steps
from ..methods.options import RobustDistillOptions, RRMOptions
from ..methods.robust_distillation import NAMES as DISTILLERS
from ..methods.robust_distillation import UNCACHED, UNLABELED
from ..settings import parse_kwargs, section, setting
from .sections import (
    DEFAULT_STUDENT,
    DEFAULT_STUDENT_KWARGS,
    MODEL_FLAGS,
    DataConfig,
    EvalConfig,
    EvaluatedModel,
    HubConfig,
    LayersConfig,
    ModelConfig,
    ModelSource,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_STUDENT", "DEFAULT_STUDENT_KWARGS", "MODEL_FLAGS", "RECIPE_RRM", "AdversarialTrainConfig", "DataConfig",
    "DistillConfig", "EvalConfig", "EvaluatedModel", "HubConfig", "LayersConfig", "ModelConfig",
    "ModelSource", "RRMConfig", "RRMOptions", "RobustDistillOptions", "RunConfig", "StudentConfig", "TeacherConfig",
    "TrainConfig", "parse_kwargs",
]

DistillMethod = Literal[methods.names("distill")]
AdversarialMethod = Literal[methods.names("adversarial")]
"""The --method choices of recipes/rrm.py and recipes/adversarial_train.py: the registry's (`rrm_hub.methods`)."""

UNAUGMENTED_CACHE = ("--cache-teacher needs the training images unaugmented: add --pad 0 (and no --hflip), or drop "
                     "--cache-teacher")
STORED_CACHE = ("--cache-teacher needs the training images on disk and unaugmented, not streamed or randomly "
                "cropped: drop --streaming, add --augment none, or drop --cache-teacher")


@dataclass
class RRMConfig(RRMOptions):
    """The RRM options and how a run provides for them: a perturbation memory, a teacher cache."""

    match_start: Literal["random", "previous"] = setting(
        "previous", "where each image's matching attack starts: where its attack ended the epoch before (previous: "
        "the steps add up over epochs, as in ATTA; keeps one perturbation per training image in CPU memory) or at "
        "random (FGSM-RS); the same compute")
    cache_teacher: bool | None = setting(
        None, "compute the teacher's outputs on the clean training images once, keep them on disk (reused while "
        "dataset, teacher and layer are the same) and look them up instead of running the teacher: the same targets "
        "for less compute. Default: on wherever it gives the same targets (a method whose targets are the teacher's "
        "on clean images, one teacher layer, training images on disk and unaugmented: --pad 0, no --hflip), off "
        "elsewhere; --no-cache-teacher runs the teacher live")

    @property
    def carried(self) -> bool:
        """Whether RRM keeps a perturbation memory (adversarial matching that starts where it ended)."""
        return self.carries("rrm")

    def carries(self, method: str) -> bool:
        """Whether `method` keeps a perturbation memory with these options."""
        return methods.get(method).carries(self, self.match_start)

    def cache_refusal(self, method: str, data: DataConfig, pairs: int = 0, augment: str | None = None) -> str | None:
        """Why a cache of the teacher's clean outputs would not give a run of `method` on `data` its targets (None
        where it would; `augment`: the training augmentation, once the images are known)."""
        if data.pad or data.hflip:
            return UNAUGMENTED_CACHE
        if data.streaming or "timm" in (data.augment, augment):
            return STORED_CACHE
        return methods.cache_refusal(method, self, pairs)

    def caches(self, method: str, data: DataConfig, pairs: int = 0, augment: str | None = None) -> bool:
        """Whether a run of `method` on `data` keeps a teacher cache: as --cache-teacher says (asked for where it
        would not give the same targets: refused in one line), else wherever it gives the same targets."""
        refusal = self.cache_refusal(method, data, pairs, augment)
        if self.cache_teacher and refusal:
            raise RRMError(refusal)
        return refusal is None if self.cache_teacher is None else self.cache_teacher

    def check_run(self, data: DataConfig, pairs: int, method: str = "rrm") -> None:
        """The rules of a run of `method` with these options (robust distillation takes its attack from them)."""
        self.caches(method, data, pairs)
        methods.check(method, self, pairs=pairs, match_start=self.match_start)


RECIPE_RRM = {"match_on": "adversarial", "eps": None, "teacher_input": "auto", "attack_loss": "ce", "eps_warmup": 0.5}
"""The RRM recipe's defaults where they differ from the paper's: adversarial matching, CE-raising steps carried
over epochs (README: 'Making students robust')."""


def check_repo_id(repo_id: str, flag: str = "--hub-model-id") -> None:
    """Refuse a Hub model id the Hub would refuse (before any work)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise RRMError(f"{flag} '{repo_id}' is not a Hub repo id; write user/name (letters, digits, '-', '_', '.')"
                       ) from None
    if repo_id.count("/") != 1:
        raise RRMError(f"{flag} '{repo_id}' is not a Hub repo id; write user/name") from None


# ---- run configs
BUDGETS = ("eps", "eps_sweep")
"""The settings that are attack budgets (in any section): under L-inf, each is at most 1 ([0, 1] pixels)."""


def _budgets(config):
    """(norm, flag, value) of every attack budget set in `config` and its sections."""
    norm = getattr(config, "norm", None) or getattr(getattr(config, "eval", None), "norm", None)
    for owner in [config, *(v for v in vars(config).values() if settings.is_section(v))]:
        for field in dataclasses.fields(owner):
            values = getattr(owner, field.name) if field.name in BUDGETS else None
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, (int, float)):
                    yield norm, settings.label_of(type(owner), field), value


def check_budgets(config) -> None:
    """Refuse an L-inf budget above 1: no pixel can move further, so an attack 'at eps 300' measures nothing."""
    for norm, flag, value in _budgets(config):
        if norm == "linf" and value > 1:
            raise RRMError(f"{flag} {value:g} is more than an L-inf budget can be (pixels are in [0, 1]: at most 1, "
                           "e.g. 0.3 or 8/255 = 0.0314); for an L2 budget add --norm l2")


def check_l2_budgets(config, channels: int, size: tuple[int, int]) -> None:
    """Refuse an L2 budget above the largest possible perturbation of the input, sqrt(channels x height x width)
    (every pixel from 0 to 1), once the input size is known."""
    largest = math.sqrt(channels * size[0] * size[1])
    for norm, flag, value in _budgets(config):
        if norm == "l2" and value > largest:
            raise RRMError(f"{flag} {value:g} is more than any L2 perturbation of a {channels}x{size[0]}x{size[1]} "
                           f"image can be ({largest:.4g}, every pixel moved from 0 to 1); choose a smaller budget")


@dataclass
class RunConfig:
    """A recipe's settings: sections and settings of its own. `validate` checks them all, once."""

    def validate(self) -> RunConfig:
        settings.check(self)
        check_budgets(self)
        hub, evaluation = getattr(self, "hub", None), getattr(self, "eval", None)
        if hub is not None and hub.push and not hub.model_id:
            raise RRMError("--push-to-hub needs --hub-model-id user/name")
        if hub is not None and hub.model_id:
            check_repo_id(hub.model_id)
        if evaluation is not None:
            check_steps(evaluation.suite, evaluation.eval_steps)
            if evaluation.keep_best and not (evaluation.holdout and evaluation.epoch_eval_examples != 0):
                raise RRMError("--keep-best chooses an epoch by its robust accuracy on held-out training images: add "
                               "--holdout N (e.g. 500), and keep --epoch-eval-examples above 0")
            if evaluation.holdout and evaluation.epoch_eval_examples == 0:
                raise RRMError("--holdout keeps images out of training for the per-epoch check, which "
                               "--epoch-eval-examples 0 turns off: drop one of them")
        student = getattr(self, "student", None)
        if student is not None:
            student.spec()  # refuses kwargs that are not key=value
        self.check_rules()
        return self

    def check_rules(self) -> None:
        """Rules of this recipe's own (none by default)."""


@dataclass
class DistillConfig(RunConfig):
    """`recipes/rrm.py` and `rrm_hub.distill`: a student trained to match a robust teacher."""

    data: DataConfig = section(lambda: DataConfig(pad=0))
    teacher: TeacherConfig = section(TeacherConfig)
    student: StudentConfig = section(StudentConfig)
    layers: LayersConfig = section(LayersConfig)
    method: DistillMethod = setting(
        "rrm", "what the student learns from the teacher: rrm (its representation, the RRM options); ard, rslad, "
        "adaad (its logits on attacked images, the attack from the --match-* options; docs/toolbox.md); kd (its "
        "logits on the clean images)")
    rrm: RRMConfig = section(lambda: RRMConfig(**RECIPE_RRM))
    robust: RobustDistillOptions = section(RobustDistillOptions)
    training: TrainConfig = section(lambda: TrainConfig(epochs=40, lr=2e-3))
    eval: EvalConfig = section(EvalConfig)
    hub: HubConfig = section(HubConfig)
    preflight: bool = setting(False, "train briefly, report whether robustness moves into the student (robust "
                              "accuracy versus the teacher's), write preflight.json, stop")
    preflight_steps: int = setting(150, "training steps of --preflight", ge=1)
    list_layers: bool = setting(False, "print the layers of teacher and student with their output shapes, then stop")

    def caches_teacher(self, pairs: int = 0, augment: str | None = None) -> bool:
        """Whether the run keeps a teacher cache (`RRMConfig.caches`; never for mixes, --distill-on, or unlabeled
        images, --unlabeled-split / --unlabeled-dataset)."""
        return (self.robust.distill_on == "training" and not self.robust.draws_unlabeled
                and self.rrm.caches(self.method, self.data, pairs, augment))

    def check_rules(self) -> None:
        if self.preflight and self.list_layers:
            raise RRMError("--preflight and --list-layers each stop the run early; give one of them")
        matches = self.layers.matches(self.student.layer)
        self.rrm.check_run(self.data, len(matches or []), self.method)
        on, unlabeled = self.robust.distill_on, self.robust.draws_unlabeled
        if on != "training":
            if self.method not in DISTILLERS:
                raise RRMError(f"--distill-on {on} is for --method {', '.join(DISTILLERS)}; for rrm use "
                               f"--match-on {on}")
            if self.rrm.cache_teacher:
                raise RRMError(UNCACHED.format(kind=f"--distill-on {on}"))
        if unlabeled:
            if self.method not in DISTILLERS:
                raise RRMError(f"--unlabeled-split and --unlabeled-dataset give images for --method "
                               f"{', '.join(DISTILLERS)} to distill on, not for {self.method}: drop them or change "
                               "--method")
            if self.rrm.cache_teacher:
                raise RRMError(UNCACHED.format(kind=UNLABELED))


@dataclass
class AdversarialTrainConfig(RunConfig):
    """`recipes/adversarial_train.py`: adversarial training of any timm model (a robust teacher, or a control)."""

    model: ModelConfig = section(ModelConfig)
    method: AdversarialMethod = setting(
        "pgd_at", "pgd_at: PGD with --attack-steps; fast_at: FGSM with a random start; nfgsm_at: N-FGSM (random "
        "start of 2 eps, a step of eps, not projected); atta_at: one step of 0.5 eps an epoch from where the "
        "image's attack ended the epoch before (ATTA)")
    attack_steps: int = setting(7, "PGD steps while training (pgd_at)", ge=1)
    eps_warmup: float = setting(0.3, "ramp epsilon up from 0 over this fraction of training (0: off)", ge=0,
                                le=1)
    disjoint_from: str | None = setting(None, "refuse to train when a training image (by pixel hash) is also in "
                                        "this dataset, any split (e.g. mnist-5k, the students' data); writes the "
                                        "training images' hashes beside the model (train_hashes.safetensors)")
    data: DataConfig = section(DataConfig)
    training: TrainConfig = section(lambda: TrainConfig(epochs=10, lr=2e-3))
    eval: EvalConfig = section(EvalConfig)
    hub: HubConfig = section(HubConfig)
