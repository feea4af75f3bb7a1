"""The cost of RRM at natural resolution (`recipes/benchmark_scale.py`): a timm student at its own input size and a
timm teacher; a few optimizer steps each of natural training through rrm-hub's loop, of the anchor (a plain training
loop written with timm's own parts, stepping as timm's train.py does), of the paper's clean matching with the teacher
live, of the recipe's default matching, and of clean matching with the teacher's outputs cached. Seconds per step,
images per second and their ratios to natural training, each beside its FLOP bound (a teacher forward costs what it
costs), activation memory, optionally the profiler's top entries; and, apart, the data loader's images/s from a folder
of JPEGs (timm's training transforms, the default workers) against the training's.

Steps run on random batches made on the device, so a step's time is the models' alone; the weights are random: a
step costs the same whatever they hold. Only the loader needs `datasets` (imported there).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import timm.data
import timm.optim
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..config.runs import RECIPE_RRM, RunConfig
from ..config.sections import StudentConfig, TrainConfig
from ..hub.cards import hardware
from ..methods import RRMOptions
from ..methods.registry import get, make_objective
from ..models.features import default_layer, feature_width
from ..models.names import resolve_model_name
from ..models.pixel import create_pixel_model, model_input
from ..models.student import RRMStudent
from ..settings import section, setting
from ..teachers.cache import TeacherCache
from ..training.costs import step_memory
from ..training.loop import train

SCALE_METHODS = ("natural", "timm", "natural_pad0", "rrm_clean", "rrm", "rrm_cached")
"""timm: the anchor, a plain timm loop; natural_pad0 is natural training again, the reference of rrm_cached as in
`recipes/benchmark.py` (here every method trains on the same batches, so the two natural runs also show the noise)."""
OPTIONS = {"rrm_clean": RRMOptions(), "rrm_cached": RRMOptions(), "rrm": RRMOptions(**RECIPE_RRM)}


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
    loader_batches: int = setting(8, "batches the loader is timed on, after its first (0: no loader timing)", ge=0)
    num_workers: int | None = setting(None, "loader workers (default: rrm_hub.data.default_workers)", ge=0)
    eps: float = setting(4 / 255, "L-inf budget of the matching attack of rrm", gt=0)
    profile: bool = setting(False, "record the profiler's top entries of a step of each method")
    output: str = setting("benchmark-scale.json", "where the results go")
    training: TrainConfig = section(lambda: TrainConfig(batch_size=16))


def synthetic_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` random 500 x 375 JPEG photos in two classes, as an imagefolder under `folder`."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        label = folder / "train" / f"class{i % 2}"
        label.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(375, 500, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(label / f"{i}.jpg", quality=90)
    return folder


def loader_throughput(config: ScaleConfig, seen_as) -> dict:
    """Images per second of rrm-hub's training loader (timm's transforms, the default workers) over
    `config.loader_batches` batches after its first (which starts the workers)."""
    from ..data.images import load_image_data
    from ..data.loaders import default_workers, make_loader

    workers = default_workers() if config.num_workers is None else config.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        dataset = config.dataset or str(synthetic_photos(Path(tmp), config.photos, config.training.seed))
        images = load_image_data(dataset, model_input=seen_as, augment="timm")
        iterator = iter(make_loader(images, "train", config.training.batch_size, augment=True, num_workers=workers))
        next(iterator)
        count, started = 0, time.perf_counter()
        for _ in range(config.loader_batches):
            try:
                count += len(next(iterator)[0])
            except StopIteration:
                break
    return {"loader_workers": workers, "loader_images_per_second": round(count / (time.perf_counter() - started), 2)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(student, objective, batches: DataLoader, accelerator, training: TrainConfig, steps: int,
                     warmup: int) -> float:
    """Seconds per optimizer step of `objective` through the training loop, after `warmup` untimed steps."""
    if warmup:
        train(student, objective, batches, accelerator, replace(training, max_steps=warmup))
    _synchronize(accelerator.device)
    run = train(student, objective, batches, accelerator, replace(training, max_steps=steps))
    _synchronize(accelerator.device)
    return run["train_seconds"] / run["steps"]


def timm_anchor(name: str, args: dict, num_classes: int, x: torch.Tensor, y: torch.Tensor, training: TrainConfig,
                steps: int, warmup: int) -> float:
    """Seconds per step of a plain training loop written with timm's parts, as timm's train.py steps: the model
    (`timm.create_model`, channels-last if asked, compiled if asked), its optimizer (`create_optimizer_v2`, the same
    settings), cross-entropy under autocast at the run's precision (fp16 with a gradient scaler), the input
    normalized on the device as rrm-hub's models do inside."""
    device = x.device
    model = timm.create_model(name, num_classes=num_classes, **args).to(device)
    config = timm.data.resolve_data_config({}, model=model)
    mean = torch.tensor(config["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(config["std"], device=device).view(1, -1, 1, 1)
    if training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = timm.optim.create_optimizer_v2(model, opt=training.optimizer, lr=training.lr,
                                               weight_decay=training.weight_decay, momentum=training.momentum)
    model = torch.compile(model) if training.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training.mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    loss_fn, batch = nn.CrossEntropyLoss(), training.batch_size

    def step(i: int) -> None:
        rows = slice((i * batch) % len(x), (i * batch) % len(x) + batch)
        with autocast:
            loss = loss_fn(model((x[rows] - mean) / std), y[rows])
        optimizer.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()

    for i in range(warmup):
        step(i)
    _synchronize(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    _synchronize(device)
    return (time.perf_counter() - started) / steps


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """The FLOPs of one forward of `model` on `x` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def flop_bounds(student_flops: int, teacher_flops: int, options: RRMOptions) -> dict[str, float]:
    """Each method's images/s as a fraction of natural training's if only FLOPs counted: a backward costs two
    forwards, so a natural step is 3 student forwards; the teacher's forward adds its own; the default matching's
    attack adds a student forward and backward a step."""
    natural, teacher = 3.0 * student_flops, float(teacher_flops)
    attack = 3.0 * student_flops * options.steps
    return {"natural": 1.0, "timm": 1.0, "natural_pad0": 1.0, "rrm_cached": 1.0,
            "rrm_clean": round(natural / (natural + teacher), 3),
            "rrm": round(natural / (natural + attack + teacher), 3)}


def profile_step(student, objective, x: torch.Tensor, y: torch.Tensor, rows: int = 8) -> str:
    """The profiler's top entries (by self time on the device, else on the CPU) of one training step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        loss, _ = objective(student, x, y)
        loss.backward()
        _synchronize(x.device)
    student.zero_grad(set_to_none=True)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_scale(config: ScaleConfig, accelerator) -> dict:
    """benchmark-scale.json's content: per method seconds per step, images/s, ratios to natural and their FLOP
    bounds, activation memory, the profiler's top entries; the loader's images/s against the training's."""
    device = accelerator.device
    name, student_args = config.student.spec()
    name = resolve_model_name(name, "--student", accelerator.print)
    seen_as = model_input(name, student_args)
    size, batch, classes = (3, *seen_as.size), config.training.batch_size, 10
    generator = torch.Generator().manual_seed(config.training.seed)
    count = batch * max(config.steps, config.warmup_steps, 1)
    x = torch.rand(count, *size, generator=generator).to(device)  # made once, already on the device
    y = torch.randint(0, classes, (count,), generator=generator).to(device)
    batches = DataLoader(TensorDataset(x, y), batch_size=batch)
    teacher = create_pixel_model(resolve_model_name(config.teacher_arch, "--teacher-arch", accelerator.print),
                                 classes, size).eval().to(device)
    teacher.requires_grad_(False)
    layer = default_layer(teacher.network)
    width = feature_width(teacher, teacher.network, layer, x[:2])
    cache = TeacherCache.build(teacher, layer, batches).to(device)
    training = replace(config.training, epochs=10**6, output_dir=None, warmup=0.0)
    methods, student = {}, None
    for method in SCALE_METHODS:
        accelerator.print(f"--- {method}")
        torch.manual_seed(config.training.seed)
        if method == "timm":
            seconds = timm_anchor(name, student_args, classes, x, y, training, config.steps, config.warmup_steps)
            methods[method] = {"seconds_per_step": round(seconds, 4), "images_per_second": round(batch / seconds, 2)}
            continue
        student = RRMStudent.for_teacher(name, feature_dim=width, num_classes=classes, model_args=student_args,
                                         input_size=size)
        trained_by = "natural" if method.startswith("natural") else method
        objective = make_objective(trained_by, eps=config.eps, norm="linf", teacher=teacher, teacher_layer=layer,
                                   cache=cache if get(trained_by).cache != "no" else None,
                                   rrm_options=OPTIONS[method].objective_options() if method in OPTIONS else None)
        seconds = seconds_per_step(student, objective, batches, accelerator, training, config.steps,
                                   config.warmup_steps)
        student = accelerator.unwrap_model(student)
        methods[method] = {"seconds_per_step": round(seconds, 4), "images_per_second": round(batch / seconds, 2),
                           **step_memory(student, objective, x[:batch], y[:batch])}
        if config.profile:
            methods[method]["profile"] = profile_step(student, objective, x[:batch], y[:batch])
        getattr(objective, "remove", lambda: None)()  # the teacher's hooks
    return summarize(methods, config, accelerator, name, seen_as, student, teacher, x[:batch])


def summarize(methods: dict, config: ScaleConfig, accelerator, name: str, seen_as, student, teacher,
              sample: torch.Tensor) -> dict:
    """Ratios to natural training (rrm_cached's to natural_pad0's) beside their FLOP bounds; the loader apart."""
    bounds = flop_bounds(forward_flops(student, sample), forward_flops(teacher, sample), OPTIONS["rrm"])
    for method, result in methods.items():
        reference = methods["natural_pad0" if method == "rrm_cached" else "natural"]
        result["step_cost_vs_natural"] = round(result["seconds_per_step"] / reference["seconds_per_step"], 3)
        result["images_per_second_vs_natural"] = round(reference["seconds_per_step"] / result["seconds_per_step"], 3)
        result["flop_bound_vs_natural"] = bounds[method]
        if "saved_activation_bytes" in result:
            result["activation_memory_vs_natural"] = round(
                result["saved_activation_bytes"] / reference["saved_activation_bytes"], 3)
    natural = methods["natural"]["images_per_second"]
    summary = {"hardware": hardware(), "device": str(accelerator.device), "student": name,
               "teacher": config.teacher_arch, "image_size": list(seen_as.size),
               "batch_size": config.training.batch_size, "mixed_precision": config.training.mixed_precision,
               "channels_last": config.training.channels_last, "compile": config.training.compile,
               "steps": config.steps, "train_images_per_second": natural,
               "natural_over_timm": round(natural / methods["timm"]["images_per_second"], 3),
               "rrm_note": "rrm: the recipe's default matching; at this size timm's random-resized crops make the "
                           "recipe start its attack at random (no perturbation memory)", "methods": methods}
    if config.loader_batches:
        loader = loader_throughput(config, seen_as)
        summary.update(loader, loader_over_train=round(loader["loader_images_per_second"] / natural, 2))
    return summary


def markdown_table(summary: dict) -> str:
    """The results as a table (docs/natural-images.md)."""
    lines = ["| method | s/step | images/s | images/s vs natural | FLOP bound | activations vs natural |",
             "|---|---|---|---|---|---|"]
    for method, r in summary["methods"].items():
        memory = r.get("activation_memory_vs_natural")
        lines.append(f"| {method} | {r['seconds_per_step']:.4f} | {r['images_per_second']:.1f} | "
                     f"{r['images_per_second_vs_natural']:.2f} | {r['flop_bound_vs_natural']:.2f} | "
                     f"{'-' if memory is None else f'{memory:.2f}'} |")
    lines.append(f"\nrrm-hub's natural training at {summary['natural_over_timm']:.2f}x the plain timm loop's "
                 "images/s.")
    if "loader_images_per_second" in summary:
        lines.append(f"loader ({summary['loader_workers']} workers, timm training transforms): "
                     f"{summary['loader_images_per_second']:.1f} images/s, {summary['loader_over_train']:.1f}x "
                     f"natural training's {summary['train_images_per_second']:.1f} images/s")
    return "\n".join(lines) + "\n"
