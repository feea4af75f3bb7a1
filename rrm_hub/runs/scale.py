"""The cost of RRM at natural resolution (`recipes/benchmark_scale.py`): a timm student at its own input size and a
timm teacher, a few optimizer steps of natural training, the paper's clean matching, the recipe's default matching
and clean matching with the teacher cached; seconds per step and their ratios to natural training, activation
memory, and the data loader's images/s (timm's training transforms, the default workers) against the training's.

Steps run on batches decoded once and held in memory, so a step's time is the models' alone; the loader is timed on
its own, on the same photos. The weights are random: a step costs the same whatever they hold.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..config.runs import RECIPE_RRM, RRMOptions, RunConfig
from ..config.sections import StudentConfig, TrainConfig
from ..data.images import load_image_data
from ..data.loaders import default_workers, make_loader
from ..hub.cards import hardware
from ..methods.registry import get, make_objective
from ..models.features import default_layer, feature_width
from ..models.names import resolve_model_name
from ..models.pixel import create_pixel_model, model_input
from ..models.student import RRMStudent
from ..settings import section, setting
from ..teachers.cache import TeacherCache
from ..training.loop import train

SCALE_METHODS = ("natural", "natural_pad0", "rrm_clean", "rrm", "rrm_cached")
"""natural_pad0 is natural training again, the reference of rrm_cached as in `recipes/benchmark.py` (here every
method trains on the same unaugmented batches, so the two natural runs also show the timing noise)."""


@dataclass
class ScaleConfig(RunConfig):
    """`recipes/benchmark_scale.py`: step costs and loader throughput at the student's own resolution."""

    student: StudentConfig = section(lambda: StudentConfig(name="vit_small"))
    teacher_arch: str = setting("resnet50", "timm architecture of the teacher (random weights)")
    dataset: str | None = setting(None, "photos for the loader (imagefolder or Hub dataset; default: synthetic "
                                  "500 x 375 JPEG photos written to a temporary folder)")
    photos: int = setting(256, "synthetic photos to write when no --dataset is given", ge=8)
    steps: int = setting(5, "timed optimizer steps of each method", ge=1)
    warmup_steps: int = setting(2, "untimed optimizer steps before them", ge=0)
    loader_batches: int = setting(8, "batches the loader is timed on (after its first)", ge=1)
    num_workers: int | None = setting(None, "loader workers (default: rrm_hub.data.default_workers)", ge=0)
    eps: float = setting(4 / 255, "L-inf budget of the matching attack of rrm", gt=0)
    output: str = setting("benchmark-scale.json", "where the results go")
    training: TrainConfig = section(lambda: TrainConfig(batch_size=16))


def synthetic_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` random 500 x 375 JPEG photos in two classes, as an imagefolder under `folder`."""
    generator = torch.Generator().manual_seed(seed)
    from PIL import Image

    for i in range(count):
        label = folder / "train" / f"class{i % 2}"
        label.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(375, 500, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(label / f"{i}.jpg", quality=90)
    return folder


def loader_throughput(loader: DataLoader, batches: int) -> float:
    """Images per second of `loader` over `batches` batches after its first (which starts the workers)."""
    iterator = iter(loader)
    next(iterator)
    count, started = 0, time.perf_counter()
    for _ in range(batches):
        try:
            count += len(next(iterator)[0])
        except StopIteration:
            break
    return count / (time.perf_counter() - started)


def seconds_per_step(student, objective, batches: DataLoader, accelerator, training: TrainConfig, steps: int,
                     warmup: int) -> float:
    """Seconds per optimizer step of `objective` through the training loop, after `warmup` untimed steps."""
    if warmup:
        train(student, objective, batches, accelerator, replace(training, max_steps=warmup))
    run = train(student, objective, batches, accelerator, replace(training, max_steps=steps))
    return run["train_seconds"] / run["steps"]


def run_scale(config: ScaleConfig, accelerator) -> dict:
    """benchmark-scale.json's content: per method seconds per step, ratios to natural, activation memory; the
    loader's images/s against the training's."""
    from .benchmark import step_memory

    name, student_args = config.student.spec()
    name = resolve_model_name(name, "--student", accelerator.print)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = config.dataset or str(synthetic_photos(Path(tmp), config.photos, config.training.seed))
        images = load_image_data(dataset, model_input=model_input(name, student_args), augment="timm")
        workers = default_workers() if config.num_workers is None else config.num_workers
        loader = make_loader(images, "train", config.training.batch_size, augment=True, num_workers=workers)
        loader_images_per_second = loader_throughput(loader, config.loader_batches)
        clean = iter(make_loader(images, "train", config.training.batch_size))
        decoded = [next(clean) for _ in range(min(len(images.train) // config.training.batch_size,
                                                  max(config.steps, config.warmup_steps)))]
        x, y = (torch.cat(part) for part in zip(*decoded, strict=True))
    batches = DataLoader(TensorDataset(x, y), batch_size=config.training.batch_size)
    teacher = create_pixel_model(resolve_model_name(config.teacher_arch, "--teacher-arch", accelerator.print),
                                 images.num_classes, (3, *images.image_size)).eval().to(accelerator.device)
    teacher.requires_grad_(False)
    layer = default_layer(teacher.network)
    width = feature_width(teacher, teacher.network, layer, x[:2].to(accelerator.device))
    cache = TeacherCache.build(teacher, layer, batches).to(accelerator.device)
    training = replace(config.training, epochs=10**6, output_dir=None, warmup=0.0)
    options = {"rrm_clean": RRMOptions().objective_options(), "rrm_cached": RRMOptions().objective_options(),
               "rrm": RRMOptions(**RECIPE_RRM).objective_options()}
    methods = {}
    for method in SCALE_METHODS:
        accelerator.print(f"--- {method}")
        torch.manual_seed(config.training.seed)
        student = RRMStudent.for_teacher(name, feature_dim=width, num_classes=images.num_classes,
                                         model_args=student_args, input_size=(3, *images.image_size))
        trained_by = "natural" if method.startswith("natural") else method
        objective = make_objective(trained_by, eps=config.eps, norm="linf", teacher=teacher, teacher_layer=layer,
                                   cache=cache if get(trained_by).cache != "no" else None,
                                   rrm_options=options.get(method))
        seconds = seconds_per_step(student, objective, batches, accelerator, training, config.steps,
                                   config.warmup_steps)
        student = accelerator.unwrap_model(student)
        memory = step_memory(student, objective, x[: config.training.batch_size].to(accelerator.device),
                             y[: config.training.batch_size].to(accelerator.device))
        getattr(objective, "remove", lambda: None)()  # the teacher's hooks
        methods[method] = {"seconds_per_step": round(seconds, 4),
                           "images_per_second": round(config.training.batch_size / seconds, 2), **memory}
    for method, result in methods.items():
        reference = methods["natural_pad0" if method == "rrm_cached" else "natural"]
        result["step_cost_vs_natural"] = round(result["seconds_per_step"] / reference["seconds_per_step"], 3)
        result["activation_memory_vs_natural"] = round(
            result["saved_activation_bytes"] / reference["saved_activation_bytes"], 3)
    train_images_per_second = methods["natural"]["images_per_second"]
    return {"hardware": hardware(), "device": str(accelerator.device), "student": name, "teacher": config.teacher_arch,
            "image_size": list(images.image_size), "batch_size": config.training.batch_size,
            "mixed_precision": config.training.mixed_precision, "steps": config.steps,
            "loader_workers": workers, "loader_images_per_second": round(loader_images_per_second, 2),
            "train_images_per_second": train_images_per_second,
            "loader_over_train": round(loader_images_per_second / train_images_per_second, 2),
            "rrm_note": "rrm: the recipe's default matching; at this size timm's random-resized crops make the "
                        "recipe start its attack at random (no perturbation memory)",
            "methods": methods}


def markdown_table(summary: dict) -> str:
    """The results as a table (docs/scaling.md)."""
    lines = ["| method | s/step | images/s | step cost vs natural | activations vs natural |", "|---|---|---|---|---|"]
    for method, r in summary["methods"].items():
        lines.append(f"| {method} | {r['seconds_per_step']:.3f} | {r['images_per_second']:.1f} | "
                     f"{r['step_cost_vs_natural']:.2f} | {r['activation_memory_vs_natural']:.2f} |")
    lines.append(f"\nloader ({summary['loader_workers']} workers, timm training transforms): "
                 f"{summary['loader_images_per_second']:.1f} images/s, {summary['loader_over_train']:.1f}x natural "
                 f"training's {summary['train_images_per_second']:.1f} images/s")
    return "\n".join(lines) + "\n"
