"""The typed sections every recipe shares (data, teacher, student, representations, training, evaluation, hub):
each setting with its help, flag and bounds (`rrm_hub.settings.setting`). Run configs are built from them in
`rrm_hub.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from .. import settings
from ..attacks import Norm
from ..data.transforms import SMALL_IMAGES, Augment
from ..errors import RRMError
from ..evaluation.suites import SUITE_HELP, Suite
from ..models.align import MatchMode
from ..settings import parse_kwargs, setting

DEFAULT_STUDENT = "vit_tiny_patch16_224"
DEFAULT_STUDENT_KWARGS = ["img_size=28", "patch_size=7", "depth=4", "embed_dim=96", "num_heads=3"]
FULL_RUN_IMAGES = 40_000
"""A run training on this many images (all its steps) or more is evaluated in full (`EvalConfig.for_run`)."""
SMOKE_RUN_IMAGES = 5_000
MIN_EVAL_IMAGES = 16
MAX_EPOCH_CHECKS = 20


@dataclass
class DataConfig:
    TITLE: ClassVar[str] = "data"
    dataset: str | None = setting(None, "Hub dataset id, save_to_disk folder or imagefolder (default: the "
                                  "embedded 5,000 MNIST digits)")
    dataset_config: str | None = setting(None, "dataset configuration name, if it has several")
    image_column: str | None = setting(None, "image column (default: found from the features)")
    label_column: str | None = setting(None, "label column (default: found from the features)")
    train_split: str = setting("train", "training split, or a slice of it as datasets writes one: train[:1000], "
                                 "train[:10%]")
    test_split: str | None = setting(None, "default: test or validation, else 20% of train")
    image_size: int | None = setting(None, "train and evaluate at this size (default: the images' own size for "
                                     "--augment shift|none; the student's input size for --augment timm)", ge=1)
    augment: Augment = setting("auto", "training augmentation: timm (timm's random-resized crop, flip and color "
                               "jitter, or --auto-augment; evaluation resized by the student's crop_pct and center-"
                               "cropped), shift (zero-fill shifts of --pad pixels and --hflip, for digits and other "
                               f"small images), none; auto: shift for images up to {SMALL_IMAGES} px, else timm")
    auto_augment: str | None = setting(None, "timm AutoAugment / RandAugment policy for --augment timm, e.g. "
                                       "rand-m9-mstd0.5-inc1")
    pad: int = setting(2, "random-shift augmentation in pixels (0: none) of --augment shift", ge=0)
    hflip: bool = setting(False, "random horizontal flips of --augment shift (not for digits)")
    streaming: bool = setting(False, "read the training split as a stream (Hub datasets too large to download); "
                              "the test images are the first 1,000 of the test split")
    shuffle_buffer: int = setting(10_000, "images in the shuffle buffer of --streaming", ge=1)
    max_bad_images: float = setting(0.05, "the share of a split's images that may be unreadable (corrupt files are "
                                    "skipped and counted) before the run stops", ge=0, le=1)
    num_workers: int | None = setting(None, "data loader worker processes (default: for photos the CPU cores for "
                                      "each process, up to 8; none for small images; 0: load in the main "
                                      "process)", ge=0)


@dataclass
class ModelSource:
    """Where a model comes from, as `rrm_hub.load_teacher` takes it."""

    FLAGS: ClassVar[dict[str, str]] = {}
    name: str | None = setting(None, "Hub id (org/name), hf://org/repo/file, robustbench:[DATASET/THREAT/]NAME, "
                               "folder, weight file, timm architecture or a bundled teacher: default (MNIST, L-inf, "
                               "the default), default-l2, default-fashion-mnist")
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
        from ..teachers.load import load_teacher

        try:
            model = load_teacher(self.name, revision=self.revision, checkpoint=self.checkpoint, arch=self.arch,
                                 model_args=parse_kwargs(self.kwargs), num_classes=self.num_classes,
                                 trust_remote_code=self.trust_remote_code)
        except RRMError as err:  # the loaders speak of a teacher and its flags: say them as this section's
            message = str(err)
            if type(self) is not TeacherConfig:
                renames = {TeacherConfig.FLAGS[key]: flag for key, flag in self.flags().items()
                           if key in TeacherConfig.FLAGS}
                for old in sorted(renames, key=len, reverse=True):
                    message = message.replace(old, renames[old])
                message = message.replace("teacher '", f"{self.TITLE} '").replace("the teacher", f"the {self.TITLE}")
            raise type(err)(message) from None
        return model if device is None else model.to(device)

    @classmethod
    def flags(cls) -> dict[str, str]:
        """The flag of each setting, as this section spells them."""
        return {f.name: settings.flag_of(cls, f) for f in dataclasses.fields(cls)}


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
    FLAGS: ClassVar[dict[str, str]] = {"name": "--student", "kwargs": "--student-kwargs", "layer": "--student-layer",
                                       "pretrained": "--student-pretrained"}
    name: str | None = setting(None, f"timm architecture, as timm names it (vit_small, vit_small_patch16_224, "
                               "vit_small_patch16_224.augreg_in21k_ft_in1k, hf-hub:org/name; default: "
                               f"{DEFAULT_STUDENT} with {' '.join(DEFAULT_STUDENT_KWARGS)})")
    kwargs: list[str] | None = setting(None, "key=value for timm.create_model", nargs="*")
    layer: str | None = setting(None, "module of the student to match (default: its projected penultimate "
                                "representation)")
    pretrained: bool = setting(False, "start the backbone from the pretrained weights of its timm tag (from the "
                               "Hugging Face cache or the Hub)")

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
        from ..models.align import Match, parse_match

        if self.pairs and (self.teacher_layer or student_layer):
            raise RRMError("--match replaces --teacher-layer/--student-layer; give every pair with --match only")
        if self.pairs:
            return [parse_match(text) for text in self.pairs]
        if self.mode == "spatial":
            return [Match(self.teacher_layer, student_layer)]
        return None


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
    warmup: float = setting(0.05, "warm-up, as a fraction of all steps", ge=0, le=1)
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
    overwrite_output_dir: bool = setting(False, "start over in an --output-dir that holds an earlier run's "
                                         "checkpoints (removed once this run saves its first)")
    compile: bool = setting(False, "torch.compile the student (inductor)")
    channels_last: bool = setting(False, "channels-last memory format (CNN students)")

    def capped_images(self, processes: int = 1) -> int | None:
        """The training images `max_steps` optimizer steps go through over `processes` processes (None: no cap)."""
        return self.max_steps * self.batch_size * self.grad_accum * processes if self.max_steps else None


@dataclass
class EvalConfig:
    TITLE: ClassVar[str] = "threat model and evaluation"
    eps: float = setting(0.3, "attack budget in [0, 1] pixel space", ge=0)
    norm: Norm = setting("linf", "threat model")
    suite: Suite = setting("pgd", SUITE_HELP)
    eval_steps: int | None = setting(None, "steps of PGD for --suite pgd (default 20)", ge=1)
    no_checks: bool = setting(False, "skip the gradient-masking checks")
    eval_examples: int | None = setting(None, "test images for the final numbers and the gradient-masking checks "
                                        "(0: all; default: 500, scaled down for short runs)", ge=0)
    sweep_examples: int | None = setting(None, "test images for the epsilon sweep (0: no sweep; default: 250, "
                                         "scaled down for short runs, none for smoke runs)", ge=0)
    eps_sweep: list[float] | None = setting(None, "epsilons of the sweep, as in recipes/evaluate.py (default: 0.25, "
                                            "0.5, 0.75, 1 and 1.5 x --eps)", nargs="+", ge=0)
    sweep_steps: int = setting(10, "PGD steps of the epsilon sweep", ge=1)
    epoch_eval_examples: int | None = setting(None, "test images for the per-epoch check, run at most "
                                              f"{MAX_EPOCH_CHECKS} times a run (0: no per-epoch check; default: 256, "
                                              "scaled down for short runs, none for smoke runs; with --holdout "
                                              "the check runs on all held-out images)", ge=0)
    holdout: int = setting(0, "hold this many training images out of training (seeded); the per-epoch check then "
                           "runs on all of them instead of on test images", ge=0)
    keep_best: bool = setting(False, "end with the weights of the epoch whose per-epoch check had the highest robust "
                              "accuracy (against robust overfitting; needs --holdout)")

    def for_run(self, images_trained: int) -> EvalConfig:
        """These settings with the defaults left open scaled to a run that trains on `images_trained` images (the
        images of all its steps): full for runs of at least 40,000 images, proportionally fewer (at
        least 16) for shorter ones; a smoke run (under 5,000 images) skips the per-epoch check, the sweep and (unless
        --eval-examples is given) the gradient-masking checks. Values given are kept."""
        scale = min(1.0, images_trained / FULL_RUN_IMAGES)
        smoke = images_trained < SMOKE_RUN_IMAGES

        def scaled(value: int | None, default: int) -> int:
            return value if value is not None else max(MIN_EVAL_IMAGES, round(default * scale))

        return replace(self, eval_examples=scaled(self.eval_examples, 500),
                       sweep_examples=0 if smoke and self.sweep_examples is None else scaled(self.sweep_examples, 250),
                       epoch_eval_examples=(0 if smoke and self.epoch_eval_examples is None and not self.keep_best
                                            else scaled(self.epoch_eval_examples, 256)),
                       no_checks=self.no_checks or (smoke and self.eval_examples is None))

    @property
    def sweeps(self) -> bool:
        """Whether the run measures accuracy versus epsilon (not on a smoke run: `for_run`)."""
        return self.sweep_examples != 0


@dataclass
class HubConfig:
    TITLE: ClassVar[str] = "sharing on the Hub"
    FLAGS: ClassVar[dict[str, str]] = {"push": "--push-to-hub", "model_id": "--hub-model-id",
                                       "private": "--hub-private", "revision": "--hub-revision"}
    push: bool = setting(False, "upload the output folder when done")
    model_id: str | None = setting(None, "user/name of the model repo")
    private: bool = setting(False, "create the repo as private")
    revision: str | None = setting(None, "branch to push to (created if needed)")
