"""The builders every run is made of, each from its config section, in the order a run uses them: where it runs
(`start`), the data (`images_for`), the teacher (`teacher_for`), the student (`student_for`) and the objective
(`objective_for`). recipes/rrm.py calls them top to bottom; so do `rrm_hub.distill`, preflight, the benchmarks and the
study, so that a rule lives in one place."""

from __future__ import annotations

import dataclasses
import errno
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from .. import methods
from ..config.runs import DistillConfig, check_l2_budgets
from ..config.sections import DataConfig
from ..data.images import ImageData, load_image_data
from ..data.transforms import ModelInput
from ..errors import RRMError
from ..hub.push import check_can_push
from ..methods.memory import PerturbationMemory
from ..models.align import Match, MatchedPair, teacher_pairs
from ..models.features import default_layer, feature_width
from ..models.names import resolve_model_name
from ..models.pixel import model_input
from ..models.student import RRMStudent
from ..teachers.cache import load_or_build
from ..training.distributed import make_accelerator
from .fit import unlabeled_loader


@dataclass
class Runtime:
    """Where a run runs: its accelerator, its output folder, and the recipe script that reproduces it (its card
    names the command)."""

    accelerator: Accelerator
    output_dir: Path
    script: str

    def print(self, *args) -> None:
        self.accelerator.print(*args)


def output_folder(path: str | Path) -> Path:
    """`path`, checked to be writable before any work starts."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RRMError(f"cannot write to the output folder '{path}' ({err.strerror or err} at '{existing}'); "
                       "choose another --output-dir") from None
    return path


def start(config, default_output: str, script: str, push: bool = True):
    """The run's settings (validated, the output folder resolved) and where it runs; a push asked for is checked
    before any work (the Hub reachable, a token there)."""
    config = config.validate()
    training = dataclasses.replace(config.training, output_dir=config.training.output_dir or default_output)
    config = dataclasses.replace(config, training=training)
    runtime = Runtime(make_accelerator(config.training), output_folder(training.output_dir), script)
    hub = getattr(config, "hub", None)
    if push and hub is not None and hub.push:
        check_can_push(hub.model_id)
    return config, runtime


def load_data(data: DataConfig, seed: int, holdout: int = 0, seen_as: ModelInput | None = None,
              unlabeled_split: str | None = None, unlabeled_dataset: str | None = None) -> ImageData:
    """The dataset the data settings name, seen as `seen_as` says (the model's own size and crop, for natural
    images), with `holdout` seeded training images moved out of its training split and the images of
    `unlabeled_split` (of `unlabeled_dataset`, if given) beside it."""
    images = load_image_data(data.dataset, config=data.dataset_config, image_column=data.image_column,
                             label_column=data.label_column, train_split=data.train_split,
                             test_split=data.test_split, image_size=data.image_size, seed=seed,
                             augment=data.augment, model_input=seen_as, streaming=data.streaming,
                             max_bad_images=data.max_bad_images, unlabeled_split=unlabeled_split,
                             unlabeled_dataset=unlabeled_dataset)
    return images.hold_out(holdout, seed) if holdout else images


def images_for(config, runtime: Runtime, model: tuple[str, dict] | None = None) -> ImageData:
    """The run's data: [0, 1] pixels, at the size of `model` (timm name, kwargs) for natural images; normalization
    lives inside each model. Its attack budgets are checked against the input size."""
    seen_as = model_input(*model) if model else None
    robust = getattr(config, "robust", None)  # --unlabeled-split: distillation's images the teacher labels
    images = load_data(config.data, config.training.seed, config.eval.holdout, seen_as,
                       *((robust.unlabeled_split, robust.unlabeled_dataset) if robust else ()))
    check_l2_budgets(config, images.channels, images.image_size)
    return images


def student_spec(config: DistillConfig, runtime: Runtime) -> tuple[str, dict]:
    """The student's timm name (as timm spells it, with one line where it was completed) and its kwargs."""
    name, args = config.student.spec()
    return resolve_model_name(name, "--student", runtime.print), args


def sample_batch(images: ImageData) -> torch.Tensor:
    """Two blank images of the run's size: what layers are probed with."""
    return torch.zeros(2, images.channels, *images.image_size)


@dataclass
class Teacher:
    """A frozen teacher and what the run matches of it: the layer the student's projection matches (and its
    width), the pairs of layers (`--match`), and whether its classes are the dataset's."""

    model: nn.Module
    layer: str
    width: int
    pairs: list[MatchedPair]
    labels_match: bool

    @property
    def source(self) -> str:
        return self.model.source


def teacher_for(config: DistillConfig, images: ImageData, runtime: Runtime) -> Teacher:
    """Any robust model, frozen, taking [0, 1] pixels; its layers probed for the representation matched."""
    model = config.teacher.load(runtime.accelerator.device)
    labels_match = model.num_classes == images.num_classes
    if not model.num_classes and config.rrm.kd_weight:  # an image encoder (CLIP): a representation, no logits
        raise RRMError(f"the teacher {model.source} has no classes, so no logits to distill: drop --kd-weight")
    if not labels_match and model.num_classes and not config.layers.ignore_teacher_labels:
        raise RRMError(f"the teacher predicts {model.num_classes} classes but the dataset has "
                       f"{images.num_classes}; pass --ignore-teacher-labels to use its representation only")
    sample = sample_batch(images).to(runtime.accelerator.device)
    matches = config.layers.matches(config.student.layer)  # None: one pair, --teacher-layer / --student-layer
    pairs = []
    if matches:
        matches = [m if m.teacher_layer else Match(default_layer(model.network), m.student_layer, m.weight)
                   for m in matches]
        pairs = teacher_pairs(model, model.network, matches, config.layers.mode, sample)
    # the projection the classifier reads has the width of the teacher layer matched to the penultimate one
    penultimate = [m.teacher_layer for m in matches or [] if m.student_layer is None]
    layer = (penultimate[0] if penultimate else None) or config.layers.teacher_layer or default_layer(model.network)
    width = feature_width(model, model.network, layer, sample)
    runtime.print(f"teacher {model.source}: layer '{layer}', width {width}")
    return Teacher(model, layer, width, pairs, labels_match)


def student_for(config: DistillConfig, teacher: Teacher, images: ImageData, runtime: Runtime,
                spec: tuple[str, dict]) -> RRMStudent:
    """A timm backbone (`spec`: `student_spec`), a projection to the teacher's width and a classifier on the
    projection; the teacher's layer pairs (`--match`) are then the student's, resolved on their common grid."""
    name, args = spec
    student = RRMStudent.for_teacher(
        name, feature_dim=teacher.width, num_classes=images.num_classes, model_args=args,
        input_size=(images.channels, *images.image_size),
        student_layer=None if teacher.pairs else config.student.layer, pairs=teacher.pairs,
        label_names=images.class_names, teacher=teacher.source, teacher_layer=teacher.layer,
        pretrained_backbone=config.student.pretrained, crop_pct=images.crop_pct)
    teacher.pairs[:] = student.pairs  # as the student resolved them: on their common grid
    for pair in student.pairs:
        grid = f"on a {pair.grid[0]}x{pair.grid[1]} grid" if pair.grid else "as vectors"
        runtime.print(f"match {pair.name} (weight {pair.weight:g}, teacher {tuple(pair.teacher_shape)}, {grid})")
    return student


def perturbation_memory(method: str, images: ImageData, options: methods.RRMOptions | None = None,
                        log=print) -> PerturbationMemory | None:
    """The `PerturbationMemory` that `method` carries over epochs for the training images (with the matching
    `options`, an `RRMConfig` whose --match-start says), or None. Where a distillation method's cannot be kept (too
    large, a stream, random-resized crops), its attacks start at random instead, and `log` says why in one line;
    ATTA-AT, chosen for its memory, refuses."""
    options = options or methods.RRMOptions()
    if not methods.get(method).carries(options, getattr(options, "match_start", "previous")):
        return None
    reason = PerturbationMemory.unavailable(images)
    if method != "atta_at" and reason and options.attack != "free":
        log(f"--match-start random instead of previous: {reason}")
        return None
    return PerturbationMemory.for_training_images(images)


def teacher_cache(teacher: nn.Module, layer: str, images: ImageData, batch_size: int, revision: str | None,
                  num_workers: int | None, accelerator: Accelerator):
    """The `TeacherCache` of the teacher's outputs on the clean training images, on the training device. The main
    process reads or builds and saves it first; the other processes then read its file."""
    with accelerator.main_process_first():
        cache = load_or_build(teacher, layer, images, batch_size, revision=revision, num_workers=num_workers,
                              log=accelerator.print)
    return cache.to(accelerator.device)


def objective_for(config: DistillConfig, teacher: Teacher, images: ImageData, runtime: Runtime):
    """The run's objective (`--method`; RRM by default): built by the method from the parts the run provides, a
    perturbation memory (`--match-start previous`), a teacher cache (`--cache-teacher`) and the unlabeled images
    (`--unlabeled-split`) among them."""
    memory = perturbation_memory(config.method, images, config.rrm, runtime.print)
    share, process = config.robust.unlabeled_share, runtime.accelerator.process_index
    unlabeled = (None if images.unlabeled is None
                 else unlabeled_loader(images, config.data, config.training, share, process))
    cached = config.caches_teacher(len(teacher.pairs), images.augment)
    cache = (teacher_cache(teacher.model, teacher.layer, images, config.training.batch_size, config.teacher.revision,
                           config.data.num_workers, runtime.accelerator) if cached else None)
    parts = methods.Parts(eps=config.eval.eps, norm=config.eval.norm, teacher=teacher.model,
                          teacher_layer=teacher.layer, pairs=tuple(teacher.pairs), options=config.rrm,
                          robust=config.robust, cache=cache, memory=memory, unlabeled=unlabeled)
    return methods.build(config.method, parts)
