"""Run configuration: typed sections (data, teacher, student, matching, training, evaluation, hub), each setting
with its help, flag and bounds; every rule across settings is written once, in `RunConfig.validate` (called by
`rrm_hub.cli.parse`, and by `rrm_hub.distill` for a config built in Python) and `RRMOptions.check` (which
`rrm_hub.RRM` calls too).

The recipes' flags are generated from these dataclasses (`rrm_hub.cli`); YAML files hold the same settings by
section (`training: {epochs: 40}`); every run writes its own as `run_config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from . import settings
from .align import MatchMode
from .attacks import Noise, Norm
from .errors import RRMError
from .memory import CARRIED_STEP
from .settings import parse_kwargs, section, setting
from .suites import SUITE_HELP, Suite, check_steps

DEFAULT_STUDENT = "vit_tiny_patch16_224"
DEFAULT_STUDENT_KWARGS = ["img_size=28", "patch_size=7", "depth=4", "embed_dim=96", "num_heads=3"]
NOT_WITH_NFGSM = ("--match-attack n-fgsm starts from fresh noise at every step; add --match-start random (or use "
                  "--match-attack fgsm)")
FREE_NEEDS_MEMORY = ("--match-attack free moves each image's perturbation for the next epoch: it needs --match-start "
                     "previous")
CLEAN_ONLY = ("--cache-teacher holds the teacher's outputs on clean images only, but --match-on {match_on} with "
              "--teacher-input matched shows it perturbed ones; use --match-on clean or --teacher-input clean, "
              "or drop --cache-teacher")
UNAUGMENTED_CACHE = ("--cache-teacher needs the training images unaugmented: add --pad 0 (and no --hflip), or drop "
                     "--cache-teacher")


# ---- sections
@dataclass
class DataConfig:
    TITLE: ClassVar[str] = "data"
    dataset: str | None = setting(None, "Hub dataset id, save_to_disk folder or imagefolder (default: the "
                                  "embedded 5,000 MNIST digits)")
    dataset_config: str | None = setting(None, "dataset configuration name, if it has several")
    image_column: str | None = setting(None, "image column (default: found from the features)")
    label_column: str | None = setting(None, "label column (default: found from the features)")
    train_split: str = setting("train", "training split")
    test_split: str | None = setting(None, "default: test or validation, else 20% of train")
    image_size: int | None = setting(None, "resize images to this size (default: as is)", ge=1)
    pad: int = setting(2, "random-shift augmentation in pixels (0: none)", ge=0)
    hflip: bool = setting(False, "random horizontal flips (not for digits)")
    num_workers: int = setting(0, "data loader worker processes", ge=0)


@dataclass
class ModelSource:
    """Where a model comes from, as `rrm_hub.load_teacher` takes it."""

    FLAGS: ClassVar[dict[str, str]] = {}
    name: str | None = setting(None, "Hub id (org/name), hf://org/repo/file, folder, weight file or timm "
                               "architecture (default: the bundled MNIST teacher)")
    revision: str | None = setting(None, "Hub revision")
    checkpoint: str | None = setting(None, "weights (.safetensors/.ckpt/.pt path or hf://org/repo/path/in/repo) "
                                     "for the architecture named by the model spec or its --arch")
    arch: str | None = setting(None, "architecture of a weight file: NAME, timm:NAME or torchvision:NAME (default: "
                               "guessed from the file name)")
    kwargs: list[str] | None = setting(None, "key=value to build the architecture", nargs="*")
    num_classes: int | None = setting(None, "classes of a weight file (default: rows of its classifier)", ge=1)
    trust_remote_code: bool = setting(False, "let transformers run the repo's own model code (only for repos "
                                      "you trust)")

    def load(self, device=None):
        """The model, frozen, taking [0, 1] pixels (on `device` if given)."""
        from .teachers import load_teacher

        model = load_teacher(self.name, revision=self.revision, checkpoint=self.checkpoint, arch=self.arch,
                             model_args=parse_kwargs(self.kwargs), num_classes=self.num_classes,
                             trust_remote_code=self.trust_remote_code)
        return model if device is None else model.to(device)


MODEL_FLAGS = {"name": "--model", "kwargs": "--model-kwargs"}


@dataclass
class TeacherConfig(ModelSource):
    TITLE: ClassVar[str] = "teacher"
    FLAGS: ClassVar[dict[str, str]] = {"name": "--teacher", "revision": "--teacher-revision",
                                       "checkpoint": "--teacher-checkpoint", "arch": "--teacher-arch",
                                       "kwargs": "--teacher-kwargs", "num_classes": "--teacher-num-classes"}


@dataclass
class EvaluatedModel(ModelSource):
    TITLE: ClassVar[str] = "model"
    FLAGS: ClassVar[dict[str, str]] = MODEL_FLAGS


@dataclass
class StudentConfig:
    TITLE: ClassVar[str] = "student"
    FLAGS: ClassVar[dict[str, str]] = {"name": "--student", "kwargs": "--student-kwargs", "layer": "--student-layer"}
    name: str | None = setting(None, f"timm architecture (default: {DEFAULT_STUDENT} with "
                               f"{' '.join(DEFAULT_STUDENT_KWARGS)})")
    kwargs: list[str] | None = setting(None, "key=value for timm.create_model", nargs="*")
    layer: str | None = setting(None, "module of the student to match (default: its projected penultimate "
                                "representation)")

    def resolved(self) -> tuple[str, list[str]]:
        """The architecture and its key=value kwargs; the default kwargs go with the default student only."""
        kwargs = self.kwargs
        if kwargs is None:
            kwargs = DEFAULT_STUDENT_KWARGS if self.name is None else []
        return self.name or DEFAULT_STUDENT, list(kwargs)

    def spec(self) -> tuple[str, dict]:
        """The architecture and its timm kwargs (parsed)."""
        name, kwargs = self.resolved()
        return name, parse_kwargs(kwargs)


@dataclass
class ModelConfig:
    TITLE: ClassVar[str] = "model"
    FLAGS: ClassVar[dict[str, str]] = MODEL_FLAGS
    name: str = setting("resnet18", "timm architecture")
    kwargs: list[str] = setting(help="key=value for timm.create_model", nargs="*", factory=list)


@dataclass
class LayersConfig:
    TITLE: ClassVar[str] = "representations"
    FLAGS: ClassVar[dict[str, str]] = {"pairs": "--match", "mode": "--match-mode"}
    teacher_layer: str | None = setting(None, "module name, or NAME@input for a module's input (default: the input "
                                        "of the teacher's classifier)")
    pairs: list[str] | None = setting(None, "match this pair of layers (repeatable; replaces --teacher-layer/"
                                      "--student-layer); student layer 'penultimate' (or empty) is the projected "
                                      "penultimate representation; weight default 1", action="append",
                                      metavar="TEACHER_LAYER:STUDENT_LAYER[:WEIGHT]")
    mode: MatchMode = setting("pooled", "pooled: one vector per image; spatial: maps and tokens "
                                                 "on a common grid, cosine per location (pairs of two vectors stay "
                                                 "vectors)")
    ignore_teacher_labels: bool = setting(False, "use a teacher trained on other classes for its representation "
                                          "only")

    def matches(self, student_layer: str | None) -> list | None:
        """The `rrm_hub.align.Match` pairs of --match; None when the run matches the one pair of --teacher-layer /
        --student-layer (with --match-mode spatial that pair becomes a match)."""
        from .align import Match, parse_match

        if self.pairs and (self.teacher_layer or student_layer):
            raise RRMError("--match replaces --teacher-layer/--student-layer; give every pair with --match only")
        if self.pairs:
            return [parse_match(text) for text in self.pairs]
        if self.mode == "spatial":
            return [Match(self.teacher_layer, student_layer)]
        return None


@dataclass
class RRMOptions:
    """The options of the `rrm_hub.RRM` objective (its keyword arguments); defaults are the paper's."""

    TITLE: ClassVar[str] = "RRM loss"
    ce_weight: float | None = setting(None, "weight of cross-entropy on the images matched on (default: 1 for "
                                      "--match-on adversarial, 0.005 as in the reference code otherwise)")
    feature_weight: float = setting(1.0, "weight of the feature mismatch")
    feature_loss: Literal["cosine", "l2"] = setting("cosine", "mismatch of two representations: 1 - cos, or mean "
                                                    "squared error")
    match_on: Literal["clean", "noise", "adversarial"] = setting(
        "clean", "adversarial: student inputs moved by --match-steps signed-gradient steps (--match-attack, "
        "--match-attack-loss), one more student forward/backward per step; clean: the paper's method; noise: "
        "inputs plus random noise (--noise) in the eps-ball")
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
    clean_weight: float = setting(0.0, "also match on the clean images with this weight (the student runs on both)",
                                  ge=0)
    eps_warmup: float = setting(0.0, "ramp --match-eps up from 0 over this fraction of training",
                                flag="--match-eps-warmup", ge=0)
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

    def check_run(self, data: DataConfig, pairs: int) -> None:
        self.check(carried=self.carried, cached=self.cache_teacher, pairs=pairs)
        if self.cache_teacher and (data.pad or data.hflip):
            raise RRMError(UNAUGMENTED_CACHE)


RECIPE_RRM = {"match_on": "adversarial", "eps": None, "teacher_input": "auto", "attack_loss": "ce", "eps_warmup": 0.5}
"""The RRM recipe's defaults where they differ from the paper's: adversarial matching, CE-raising steps carried
over epochs (README: 'Making students robust')."""


@dataclass
class TrainConfig:
    """How long and how to optimize; `max_steps` (optimizer steps) caps `epochs` when set.

    With `output_dir`, checkpoints go to `<output_dir>/checkpoints/` at each epoch end and every `save_every`
    optimizer steps (0: epoch ends only), keeping the last `keep_checkpoints`; `resume` ("auto" or a
    checkpoint folder) continues a run from one.
    """

    TITLE: ClassVar[str] = "training"
    epochs: int = setting(10, "passes over the training images", ge=1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps", ge=1)
    batch_size: int = setting(128, "per process", ge=1)
    lr: float = setting(1e-3, "peak learning rate (cosine schedule with warm-up)", gt=0)
    weight_decay: float = setting(0.05, "weight decay", ge=0)
    optimizer: Literal["adamw", "sgd"] = setting("adamw", "optimizer")
    momentum: float = setting(0.9, "momentum of SGD (Nesterov)", ge=0)
    warmup: float = setting(0.05, "warm-up, as a fraction of all steps", ge=0)
    grad_clip: float | None = setting(None, "clip the gradient norm to this", gt=0)
    grad_accum: int = setting(1, "gradient accumulation steps", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "mixed precision")
    seed: int = setting(0, "seed of the data order, augmentation and random starts")
    output_dir: str | None = setting(None, "output folder")
    save_every: int = setting(0, "also checkpoint every N optimizer steps into OUTPUT_DIR/checkpoints/ (0: at each "
                              "epoch end only)", ge=0)
    keep_checkpoints: int = setting(2, "checkpoints to keep (the latest ones)", ge=1)
    resume: str | None = setting(None, "continue the run from the latest checkpoint in --output-dir, or from "
                                 "CHECKPOINT", nargs="?", const="auto", metavar="CHECKPOINT")
    compile: bool = setting(False, "torch.compile the student (inductor)")
    channels_last: bool = setting(False, "channels-last memory format (CNN students)")


@dataclass
class EvalConfig:
    TITLE: ClassVar[str] = "threat model and evaluation"
    eps: float = setting(0.3, "attack budget in [0, 1] pixel space", ge=0)
    norm: Norm = setting("linf", "threat model")
    suite: Suite = setting("pgd", SUITE_HELP)
    eval_steps: int | None = setting(None, "steps of PGD for --suite pgd (default 20)", ge=1)
    no_checks: bool = setting(False, "skip the gradient-masking checks")
    eval_examples: int = setting(500, "test images for the final numbers and the gradient-masking checks (0: all)",
                                 ge=0)
    sweep_examples: int = setting(500, "test images for the epsilon sweep", ge=0)
    eps_sweep: list[float] | None = setting(None, "epsilons of the sweep, as in recipes/evaluate.py (default: 0.25, "
                                            "0.5, 0.75, 1 and 1.5 x --eps)", nargs="+", ge=0)
    sweep_steps: int = setting(10, "PGD steps of the epsilon sweep", ge=1)
    epoch_eval_examples: int = setting(256, "test images for the per-epoch check (0: no per-epoch check; with "
                                       "--holdout the check runs on all held-out images)", ge=0)
    holdout: int = setting(0, "hold this many training images out of training (seeded); the per-epoch check then "
                           "runs on all of them instead of on test images", ge=0)
    keep_best: bool = setting(False, "end with the weights of the epoch whose per-epoch check had the highest robust "
                              "accuracy (against robust overfitting; needs --holdout)")


@dataclass
class HubConfig:
    TITLE: ClassVar[str] = "sharing on the Hub"
    FLAGS: ClassVar[dict[str, str]] = {"push": "--push-to-hub", "model_id": "--hub-model-id",
                                       "private": "--hub-private", "revision": "--hub-revision"}
    push: bool = setting(False, "upload the output folder when done")
    model_id: str | None = setting(None, "user/name of the model repo")
    private: bool = setting(False, "create the repo as private")
    revision: str | None = setting(None, "branch to push to (created if needed)")


# ---- run configs
@dataclass
class RunConfig:
    """A recipe's settings: sections and settings of its own. `validate` checks them all, once."""

    def validate(self) -> RunConfig:
        settings.check(self)
        hub, evaluation = getattr(self, "hub", None), getattr(self, "eval", None)
        if hub is not None and hub.push and not hub.model_id:
            raise RRMError("--push-to-hub needs --hub-model-id user/name")
        if evaluation is not None:
            check_steps(evaluation.suite, evaluation.eval_steps)
            if evaluation.keep_best and not (evaluation.holdout and evaluation.epoch_eval_examples):
                raise RRMError("--keep-best chooses an epoch by its robust accuracy on held-out training images: add "
                               "--holdout N (e.g. 500), and keep --epoch-eval-examples above 0")
            if evaluation.holdout and not evaluation.epoch_eval_examples:
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
    rrm: RRMConfig = section(lambda: RRMConfig(**RECIPE_RRM))
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
        self.rrm.check_run(self.data, len(matches or []))


@dataclass
class AdversarialTrainConfig(RunConfig):
    """`recipes/adversarial_train.py`: adversarial training of any timm model (a robust teacher, or a control)."""

    model: ModelConfig = section(ModelConfig)
    method: Literal["pgd_at", "fast_at", "nfgsm_at", "atta_at"] = setting(
        "pgd_at", "pgd_at: PGD with --attack-steps; fast_at: FGSM with a random start; nfgsm_at: N-FGSM (random "
        "start of 2 eps, a step of eps, not projected); atta_at: one step of 0.5 eps an epoch from where the "
        "image's attack ended the epoch before (ATTA)")
    attack_steps: int = setting(7, "PGD steps while training (pgd_at)", ge=1)
    eps_warmup: float = setting(0.3, "ramp epsilon up from 0 over this fraction of training (0: off)", ge=0)
    data: DataConfig = section(DataConfig)
    training: TrainConfig = section(lambda: TrainConfig(epochs=10, lr=2e-3))
    eval: EvalConfig = section(EvalConfig)
    hub: HubConfig = section(HubConfig)
