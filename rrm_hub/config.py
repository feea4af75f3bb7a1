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
from typing import ClassVar, Literal

from . import settings
from .attacks import Noise
from .errors import RRMError
from .memory import CARRIED_STEP
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
from .settings import parse_kwargs, section, setting
from .suites import check_steps

__all__ = [
    "DEFAULT_STUDENT", "DEFAULT_STUDENT_KWARGS", "MODEL_FLAGS", "RECIPE_RRM", "AdversarialTrainConfig", "DataConfig",
    "DISTILL_METHODS", "DistillConfig", "EvalConfig", "EvaluatedModel", "HubConfig", "LayersConfig", "ModelConfig",
    "ModelSource", "RRMConfig", "RRMOptions", "RobustDistillOptions", "RunConfig", "StudentConfig", "TeacherConfig",
    "TrainConfig", "parse_kwargs",
]

NOT_WITH_NFGSM = ("--match-attack n-fgsm starts from fresh noise at every step; add --match-start random (or use "
                  "--match-attack fgsm)")
FREE_NEEDS_MEMORY = ("--match-attack free moves each image's perturbation for the next epoch: it needs --match-start "
                     "previous")
CLEAN_ONLY = ("--cache-teacher holds the teacher's outputs on clean images only, but --match-on {match_on} with "
              "--teacher-input matched shows it perturbed ones; use --match-on clean or --teacher-input clean, "
              "or drop --cache-teacher")
NOT_CACHED = ("--cache-teacher holds the teacher's outputs on clean images: it serves --method rrm, ard and rslad, "
              "not {method} (drop --cache-teacher)")
UNAUGMENTED_CACHE = ("--cache-teacher needs the training images unaugmented: add --pad 0 (and no --hflip), or drop "
                     "--cache-teacher")


@dataclass
class RRMOptions:
    """The options of the `rrm_hub.RRM` objective (its keyword arguments); defaults are the paper's."""

    TITLE: ClassVar[str] = "RRM loss"
    ce_weight: float | None = setting(None, "weight of cross-entropy on the images matched on (default: 1 for "
                                      "--match-on adversarial, 0.005 as in the reference code otherwise)")
    feature_weight: float = setting(1.0, "weight of the feature mismatch")
    feature_loss: Literal["cosine", "l2"] = setting("cosine", "mismatch of two representations: 1 - cos, or mean "
                                                    "squared error")
    match_on: Literal["clean", "noise", "adversarial", "mixup", "cutmix", "shift"] = setting(
        "clean", "adversarial: student inputs moved by --match-steps signed-gradient steps (--match-attack, "
        "--match-attack-loss), one more student forward/backward per step; clean: the paper's method; noise: "
        "inputs plus random noise (--noise) in the eps-ball; mixup / cutmix: mixes of two training images "
        "(--mix-alpha); shift: views shifted by up to --match-shift pixels; noise, mixup, cutmix and shift cost "
        "what clean does (add --clean-weight 1 to match the clean images too)")
    eps: float | None = setting(0.3, "size of the noise / step for --match-on noise|adversarial (null: --eps)",
                                flag="--match-eps", ge=0)
    noise: Noise = setting(
        "uniform", "noise of --match-on noise: uniform in the eps-ball, sign (its corners), gaussian (standard "
        "deviation --match-eps)", label="noise")
    teacher_input: Literal["auto", "matched", "clean"] = setting(
        "matched", "what the teacher sees: the same perturbed image as the student (matched), or the clean image "
        "(its clean representation is the target, as in adversarial distillation); auto: clean for --match-on "
        "adversarial, matched otherwise")
    steps: int = setting(1, "signed-gradient steps of --match-on adversarial (1: FGSM with random start; each step "
                         "costs one student forward/backward)", flag="--match-steps", ge=1)
    attack: Literal["fgsm", "n-fgsm", "free"] = setting(
        "fgsm", "the step of --match-on adversarial: fgsm (FGSM with a random start of eps, projected; PGD with "
        "--match-steps > 1), n-fgsm (random start of 2 eps, a step of eps, not projected) or free (no attack pass: "
        "the gradient of the training loss itself, from the step's own backward pass, moves each image's "
        "perturbation for the next epoch; needs --match-start previous; costs what --match-on clean does)",
        flag="--match-attack")
    attack_loss: Literal["mismatch", "ce"] = setting(
        "mismatch", "what the step of --match-on adversarial raises: the student's cross-entropy on the labels (as "
        "ARD crafts its examples) or the feature mismatch with the teacher; the same cost", flag="--match-attack-loss")
    step_size: float | None = setting(None, "step of the matching attack, as a multiple of --match-eps (default: "
                                      f"{CARRIED_STEP} with --match-start previous, else the attack's own: 1.25 for "
                                      "fgsm, 1 for n-fgsm, 2.5/steps for several steps)", flag="--match-step-size",
                                      gt=0)
    mix_alpha: float = setting(1.0, "--match-on mixup|cutmix: each mix's share of its own image is max(l, 1 - l), "
                               "l ~ Beta(alpha, alpha)", gt=0)
    shift: int = setting(2, "--match-on shift: the largest shift, in pixels", flag="--match-shift", ge=1)
    clean_weight: float = setting(0.0, "also match on the clean images with this weight (the student runs on both)",
                                  ge=0)
    eps_warmup: float = setting(0.0, "ramp --match-eps up from 0 over this fraction of training",
                                flag="--match-eps-warmup", ge=0, le=1)
    kd_weight: float = setting(0.0, "weight of logit distillation from the teacher", ge=0)
    temperature: float = setting(4.0, "temperature of the logit distillation", flag="--kd-temperature", gt=0)

    @property
    def resolved_ce_weight(self) -> float:
        """The CE weight: the reference code's 0.005; on moved images the CE term is adversarial training (1)."""
        if self.ce_weight is not None:
            return self.ce_weight
        return 1.0 if self.match_on == "adversarial" else 0.005

    @property
    def resolved_teacher_input(self) -> str:
        """`teacher_input`, with auto resolved: the clean image for adversarial matching, the matched one otherwise."""
        if self.teacher_input != "auto":
            return self.teacher_input
        return "clean" if self.match_on == "adversarial" else "matched"

    def check(self, *, carried: bool, cached: bool, pairs: int) -> None:
        """The rules across options: `carried` (a perturbation memory), `cached` (a teacher cache), `pairs` (layer
        pairs matched); each option's own type, choices and bounds are `rrm_hub.settings.check`'s."""
        if self.match_on == "adversarial":
            if self.attack in ("n-fgsm", "free") and self.steps > 1:
                raise RRMError(f"--match-attack {self.attack} takes one step; drop --match-steps or use "
                               "--match-attack fgsm")
            if carried and self.attack == "n-fgsm":
                raise RRMError(NOT_WITH_NFGSM)
            if not carried and self.attack == "free":
                raise RRMError(FREE_NEEDS_MEMORY)
        if cached and pairs:
            raise RRMError("--cache-teacher keeps one teacher layer; drop --match or --cache-teacher")
        if cached and self.match_on != "clean" and self.resolved_teacher_input == "matched":
            raise RRMError(CLEAN_ONLY.format(match_on=self.match_on))

    def objective_options(self) -> dict:
        """These options as `rrm_hub.RRM` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RRMOptions)}


@dataclass
class RRMConfig(RRMOptions):
    """The RRM options and how a run provides for them: a perturbation memory, a teacher cache."""

    match_start: Literal["random", "previous"] = setting(
        "previous", "where each image's matching attack starts: where its attack ended the epoch before (previous: "
        "the steps add up over epochs, as in ATTA; keeps one perturbation per training image in CPU memory) or at "
        "random (FGSM-RS); the same compute")
    cache_teacher: bool = setting(False, "compute the teacher's outputs on the clean training images once, keep "
                                  "them on disk (reused while dataset, teacher and layer are the same) and look them "
                                  "up instead of running the teacher; needs --pad 0 and --match-on clean (or "
                                  "--teacher-input clean)")

    @property
    def carried(self) -> bool:
        """Whether the run keeps a perturbation memory (adversarial matching that starts where it ended)."""
        return self.match_on == "adversarial" and self.match_start == "previous"

    def carries(self, method: str) -> bool:
        """Whether `method` (rrm, or a robust distillation method, whose attack always runs) keeps a memory."""
        return self.carried if method == "rrm" else method in ROBUST_DISTILLATION and self.match_start == "previous"

    def check_run(self, data: DataConfig, pairs: int, method: str = "rrm") -> None:
        """The rules of a run of `method` with these options (robust distillation takes its attack from them)."""
        if method == "rrm":
            self.check(carried=self.carried, cached=self.cache_teacher, pairs=pairs)
        else:
            if pairs:
                raise RRMError(f"--match pairs layers for RRM; --method {method} distills logits: drop --match")
            if self.cache_teacher and method not in ("ard", "rslad"):
                raise RRMError(NOT_CACHED.format(method=method))
            if method in ROBUST_DISTILLATION and self.attack == "free":
                raise RRMError(f"--method {method} runs its attack: use --match-attack fgsm or n-fgsm")
            if self.carries(method) and self.attack == "n-fgsm":
                raise RRMError(NOT_WITH_NFGSM)
        if self.cache_teacher and (data.pad or data.hflip):
            raise RRMError(UNAUGMENTED_CACHE)


ROBUST_DISTILLATION = ("ard", "rslad", "adaad")
DISTILL_METHODS = ("rrm", *ROBUST_DISTILLATION, "kd")


@dataclass
class RobustDistillOptions:
    """Options of the robust distillation methods that the RRM options do not give (their attack: --match-eps,
    --match-steps, --match-attack, --match-step-size, --match-eps-warmup, --match-start)."""

    TITLE: ClassVar[str] = "robust distillation (--method ard | rslad | adaad)"
    ard_weight: float = setting(1.0, "ARD's weight a of the distillation term (1 - a weighs CE on the clean images; "
                                "the authors' default 1)", ge=0)
    ard_temperature: float = setting(30.0, "ARD's temperature (the authors' default 30)", gt=0)


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
    method: Literal["rrm", "ard", "rslad", "adaad", "kd"] = setting(
        "rrm", "what the student learns from the teacher: rrm (its representation, the RRM options); ard, rslad, "
        "adaad (its logits on attacked images, the attack from the --match-* options; docs/toolbox.md); kd (its "
        "logits on the clean images)")
    rrm: RRMConfig = section(lambda: RRMConfig(**RECIPE_RRM))
    robust: RobustDistillOptions = section(RobustDistillOptions)
    training: TrainConfig = section(lambda: TrainConfig(epochs=40, lr=1e-3))
    eval: EvalConfig = section(EvalConfig)
    hub: HubConfig = section(HubConfig)
    preflight: bool = setting(False, "train briefly, report whether robustness moves into the student (robust "
                              "accuracy versus the teacher's), write preflight.json, stop")
    preflight_steps: int = setting(150, "training steps of --preflight", ge=1)
    list_layers: bool = setting(False, "print the layers of teacher and student with their output shapes, then stop")

    def check_rules(self) -> None:
        if self.preflight and self.list_layers:
            raise RRMError("--preflight and --list-layers each stop the run early; give one of them")
        matches = self.layers.matches(self.student.layer)
        self.rrm.check_run(self.data, len(matches or []), self.method)


@dataclass
class AdversarialTrainConfig(RunConfig):
    """`recipes/adversarial_train.py`: adversarial training of any timm model (a robust teacher, or a control)."""

    model: ModelConfig = section(ModelConfig)
    method: Literal["pgd_at", "fast_at", "nfgsm_at", "atta_at"] = setting(
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
