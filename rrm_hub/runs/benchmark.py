"""Methods side by side under one budget: the same student, data, epochs and seed; cost per step, activation memory,
robustness over wall-clock time (`recipes/benchmark.py`)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from .. import settings
from ..attacks import pgd
from ..config.runs import (
    RECIPE_RRM,
    DataConfig,
    EvalConfig,
    RobustDistillOptions,
    RRMConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from ..data.images import ImageData
from ..errors import RRMError
from ..evaluation.evaluate import evaluate
from ..hub.cards import hardware, save_json
from ..methods.memory import PerturbationMemory
from ..methods.registry import cacheable, forward_ratio, make_objective, names
from ..models.features import default_layer, feature_width
from ..models.student import RRMStudent
from ..settings import section, setting
from ..teachers.cache import TeacherCache
from ..training.costs import step_memory
from ..training.loop import train
from . import builders, fit
from .report import test_loader

QUICK = {"epochs": 8, "epoch_eval_examples": 200, "eval_examples": 500}
CNN_STUDENT = ("resnet18", ["layers=(1,1,1,1)", "channels=(24,48,96,128)", "stem_width=24", "output_stride=8"])
"""The default student: a small CNN (narrower than the bundled teacher), where PGD-AT learns within a short
budget; the small default ViT of recipes/rrm.py does not (PGD-AT and fast-AT stay at chance for it)."""
REFERENCE = "natural_pad0"
"""Natural training on unaugmented images: what rrm_cached's cost per step is measured against."""
UNAUGMENTED = ("rrm_cached", REFERENCE)
CACHEABLE = cacheable()
"""The methods that --cache-teacher serves (their teacher sees the clean images only)."""
BenchmarkMethod = Literal[names("benchmark")]
FINISHED = "methods"
"""Under the output folder: each finished method's result with the settings it ran under (a rerun skips it)."""


@dataclass
class BenchmarkConfig(RunConfig):
    """`recipes/benchmark.py`: every method trains the same student under the same budget."""

    methods: list[BenchmarkMethod] = setting(help="methods to run, in order", nargs="+",
                                             factory=lambda: list(names("benchmark")))
    quick: bool = setting(False, f"a short run: {QUICK}")
    attack_steps: int = setting(7, "PGD steps of PGD-AT", ge=1)
    replays: int = setting(4, "minibatch replays of free-AT (epochs / replays)", ge=1)
    eps_warmup: float = setting(0.3, "epsilon ramp of PGD-AT and fast-AT, a fraction of training", ge=0, le=1)
    target_fraction: float = setting(0.9, "time-to-target: this fraction of PGD-AT's final robust accuracy", gt=0,
                                     le=1)
    save_students: bool = setting(False, "save each method's student in OUTPUT_DIR/students/METHOD (for "
                                  "recipes/evaluate.py --suite standard)")
    target: float | None = setting(None, "robust accuracy (PGD-10 per-epoch check) for time-to-target (default: "
                                   "--target-fraction of PGD-AT's final robust accuracy)", ge=0)
    teacher: TeacherConfig = section(TeacherConfig)
    student: StudentConfig = section(StudentConfig)
    rrm: RRMConfig = section(lambda: RRMConfig(**RECIPE_RRM, cache_teacher=False))  # rrm_cached is the cached one
    robust: RobustDistillOptions = section(RobustDistillOptions)
    data: DataConfig = section(DataConfig)
    training: TrainConfig = section(lambda: TrainConfig(epochs=10, lr=3e-3))
    eval: EvalConfig = section(EvalConfig)

    def check_rules(self) -> None:
        if self.robust.draws_unlabeled:
            raise RRMError("the benchmark trains every method on the same labelled images; --unlabeled-split and "
                           "--unlabeled-dataset are for recipes/rrm.py and recipes/study.py")
        for method in self.methods:  # --cache-teacher serves the methods that can use it
            rrm = self.rrm if method in CACHEABLE else replace(self.rrm, cache_teacher=False)
            rrm.check_run(self.data, 0, method)

    def resolved(self) -> BenchmarkConfig:
        """The settings the benchmark runs with: the CNN student by default, --quick's budget, a check each epoch."""
        config = self
        if config.student.name is None:
            config = replace(config, student=replace(config.student, name=CNN_STUDENT[0],
                                                     kwargs=config.student.kwargs or CNN_STUDENT[1]))
        if config.quick:
            config = replace(config, training=replace(config.training, epochs=QUICK["epochs"]),
                             eval=replace(config.eval, epoch_eval_examples=QUICK["epoch_eval_examples"],
                                          eval_examples=QUICK["eval_examples"]))
        if not config.eval.epoch_eval_examples:  # the curves need a check after every epoch
            config = replace(config, eval=replace(config.eval, epoch_eval_examples=200))
        return config


def unaugmented_reference(results: dict) -> str:
    """The run rrm_cached's step cost is stated against: natural_pad0, or natural when that ran unaugmented."""
    return REFERENCE if REFERENCE in results else "natural"


def run_benchmark(config: BenchmarkConfig, accelerator) -> tuple[dict, ImageData, float]:
    """Train and measure every method of `config` (resolved); returns {method: result}, the data, and a teacher
    forward's seconds over a student forward's on a training batch (`forward_ratio`, measured first)."""
    images = builders.load_data(config.data, config.training.seed, config.eval.holdout)
    teacher = config.teacher.load(accelerator.device)
    teacher_layer = default_layer(teacher.network)
    sample = torch.zeros(2, images.channels, *images.image_size, device=accelerator.device)
    feature_dim = feature_width(teacher, teacher.network, teacher_layer, sample)
    batch = torch.rand(config.training.batch_size, *sample.shape[1:], device=accelerator.device)
    # rounded once, here, so benchmark.json and the table agree (e.g. 2.0149 -> 2.015, printed '2.02', not '2.01')
    teacher_ratio = round(forward_ratio(teacher, fresh_student(config, images, feature_dim).to(accelerator.device),
                                        batch), 3)
    methods = list(config.methods)
    augmented = config.data.pad or config.data.hflip
    if "rrm_cached" in methods and augmented and REFERENCE not in methods:  # just before it
        methods.insert(methods.index("rrm_cached"), REFERENCE)
    results, settings_now = {}, method_settings(config)
    for method in methods:
        record = output_folder(config) / FINISHED / f"{method}.json"
        if (earlier := finished(record, settings_now)) is not None:
            accelerator.print(f"--- {method}: finished earlier under the same settings ({record})")
            results[method] = earlier
            continue
        accelerator.print(f"--- {method}")
        cache, cache_seconds = None, 0.0
        if method == "rrm_cached" or (method in CACHEABLE and config.rrm.cache_teacher):
            started = time.perf_counter()
            loader = fit.train_loader(images, config.data, config.training, augment=False)
            cache = TeacherCache.build(teacher, teacher_layer, loader).to(accelerator.device)
            cache_seconds = time.perf_counter() - started
        results[method] = run_method(method, config, images, teacher, teacher_layer, feature_dim, accelerator,
                                     cache, cache_seconds)
        if accelerator.is_main_process:
            record.parent.mkdir(parents=True, exist_ok=True)
            save_json({"settings": settings_now, "result": results[method]}, record)
    return results, images, teacher_ratio


def output_folder(config: BenchmarkConfig) -> Path:
    """Where the benchmark writes: --output-dir, or ./benchmark."""
    return Path(config.training.output_dir or "benchmark")


def method_settings(config: BenchmarkConfig) -> dict:
    """What one method's result depends on: every setting but the list of methods and where the run writes."""
    data = json.loads(json.dumps(settings.to_dict(config), default=str))  # as the record stores it
    data.pop("methods")
    data["training"].update(output_dir=None, resume=None, overwrite_output_dir=False)
    return data


def finished(record: Path, settings_now: dict) -> dict | None:
    """A method's result from an earlier run of the benchmark with the same settings (`method_settings`; None: run
    it). Its timings
    are that run's: a benchmark stopped and rerun compares methods timed in different processes."""
    if not record.is_file():
        return None
    try:
        saved = json.loads(record.read_text())
    except json.JSONDecodeError:
        return None  # cut short while written: run the method again
    if not isinstance(saved, dict) or saved.get("settings") != settings_now:
        return None
    return saved.get("result")


def fresh_student(config: BenchmarkConfig, images: ImageData, feature_dim: int) -> RRMStudent:
    """The benchmark's student as every method starts it (the training seed's initial weights)."""
    torch.manual_seed(config.training.seed)
    name, student_args = config.student.spec()
    return RRMStudent.for_teacher(name, feature_dim=feature_dim, num_classes=images.num_classes,
                                  model_args=student_args, input_size=(images.channels, *images.image_size))


def run_method(method: str, config: BenchmarkConfig, images, teacher, teacher_layer, feature_dim, accelerator,
               cache: TeacherCache | None = None, cache_seconds: float = 0.0) -> dict:
    """Train a fresh student with `method` and measure it (`cache_seconds`: the cache's build, counted in
    total seconds and the curve)."""
    student = fresh_student(config, images, feature_dim)
    trained_by = "natural" if method == REFERENCE else method
    memory = PerturbationMemory.for_training_images(images) if config.rrm.carries(trained_by) else None
    objective = make_objective(trained_by, eps=config.eval.eps,
                               norm=config.eval.norm, teacher=teacher, teacher_layer=teacher_layer,
                               attack_steps=config.attack_steps, replays=config.replays,
                               eps_warmup=config.eps_warmup, rrm_options=config.rrm.objective_options(), cache=cache,
                               memory=memory, robust_options=dataclasses.asdict(config.robust))
    training = replace(config.training, output_dir=None)  # timed runs: no checkpoints
    if method == "free_at":  # the same number of passes over the data as the others
        training = replace(training, epochs=max(1, math.ceil(training.epochs / config.replays)))
    augment = method not in UNAUGMENTED
    check = fit.epoch_check(images, config.eval, training, accelerator, save_best=False)
    loader = fit.train_loader(images, config.data, training, augment, objective)
    run = train(student, objective, loader, accelerator, training, check)
    student, selected = fit.finish_training(student, run, check, config.eval, accelerator)
    batch = next(iter(fit.train_loader(images, config.data, training, augment, objective)))  # after training
    step_bytes = step_memory(student, objective, *(t.to(accelerator.device) for t in batch))
    if hasattr(objective, "remove"):  # the hooks on the teacher, which the next method's objective shares
        objective.remove()
    if config.save_students and accelerator.is_main_process:
        student.save_pretrained(output_folder(config) / "students" / method)
    final = evaluate(student, test_loader(images, training.batch_size, config.eval.eval_examples),
                     {"pgd20": pgd(config.eval.eps, config.eval.norm, 20)}, accelerator, desc=f"{method} pgd20")
    curve = [{"seconds": round(h["seconds"] + cache_seconds, 2), "robust": h["pgd10"], "clean": h["clean"]}
             for h in run["history"] if "pgd10" in h]  # the epochs the per-epoch check ran
    extra = {"cache_build_seconds": round(cache_seconds, 2)} if cache is not None else {}
    return {"epochs": run["epochs"], "steps": run["steps"], "selected_epoch": selected,
            "pad": config.data.pad if augment else 0,
            "total_seconds": round(run["train_seconds"] + cache_seconds, 2), **extra,
            "seconds_per_epoch": round(run["train_seconds"] / run["epochs"], 3),
            "seconds_per_step": round(run["train_seconds"] / run["steps"], 5),
            "clean_accuracy": final["clean_accuracy"], "robust_accuracy": final["robust_accuracy"]["pgd20"],
            "curve": curve, **step_bytes}


def summarize(results: dict, target: float | None, target_fraction: float, num_classes: int) -> float | None:
    """Time-to-target for every method and each method's cost per step relative to natural training; returns the
    target (given, or `target_fraction` of PGD-AT's final robust accuracy)."""
    reference = results.get("pgd_at", {}).get("robust_accuracy")
    # a PGD-AT student no better than twice chance (a constant guess is "robust") gives no meaningful target
    if target is None and reference and reference > 2 / num_classes:
        target = round(target_fraction * reference, 4)
    natural = results.get("natural", {}).get("seconds_per_step")
    unaugmented = results.get(unaugmented_reference(results), {}).get("seconds_per_step")
    for method, result in results.items():
        result["time_to_target_seconds"] = None if target is None else time_to_target(result["curve"], target)
        base = unaugmented if method in UNAUGMENTED else natural
        result["step_cost_vs_natural"] = None if not base else round(result["seconds_per_step"] / base, 3)
    return target


def report(results: dict, config: BenchmarkConfig, target: float | None, command: str, dataset: str,
           teacher_ratio: float) -> dict:
    """benchmark.json: the settings, the ratios the project's targets are stated in, and every method's numbers."""
    return {"command": command, "hardware": hardware(), "eps": config.eval.eps, "norm": config.eval.norm,
            "student": config.student.spec(), "dataset": dataset, "target": target, "ratios": ratios(results),
            "teacher_forward_over_student_forward": teacher_ratio, "methods": results}


def ratios(results: dict) -> dict:
    """The ratios the project's targets are stated in (None where a method was not run or never got there)."""
    def ratio(a, b, key):
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    reference = unaugmented_reference(results)
    return {
        "rrm_step_over_natural_step": ratio("rrm", "natural", "seconds_per_step"),
        "rrm_clean_step_over_natural_step": ratio("rrm_clean", "natural", "seconds_per_step"),
        "rrm_cached_step_over_natural_step": ratio("rrm_cached", reference, "seconds_per_step"),
        "rrm_activation_memory_over_natural": ratio("rrm", "natural", "saved_activation_bytes"),
        "rrm_clean_activation_memory_over_natural": ratio("rrm_clean", "natural", "saved_activation_bytes"),
        "rrm_time_to_target_over_pgd_at": ratio("rrm", "pgd_at", "time_to_target_seconds"),
        "rrm_time_to_target_over_free_at": ratio("rrm", "free_at", "time_to_target_seconds"),
    }


def markdown_table(results: dict, config: BenchmarkConfig, target: float | None, teacher_ratio: float) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "never" if v is None else f"{v:.1f}"

    lines = [f"| method | epochs | s/epoch | step cost vs natural | total s | clean | PGD-20 ({config.eval.norm} "
             f"{config.eval.eps:g}) | time to target ({pct(target)}) |", "|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        step_cost = "-" if r["step_cost_vs_natural"] is None else f"{r['step_cost_vs_natural']:.2f}"  # no natural run
        cells = [method, r["epochs"], f"{r['seconds_per_epoch']:.2f}", step_cost, f"{r['total_seconds']:.1f}",
                 pct(r["clean_accuracy"]), pct(r["robust_accuracy"]), num(r["time_to_target_seconds"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for method in CACHEABLE:
        if "cache_build_seconds" in results.get(method, {}):
            seconds = results[method]["cache_build_seconds"]
            lines.append(f"\n{method}: the teacher's outputs cached (built in {seconds:.1f}s, counted in its total "
                         "and its time to target).")
    lines.append(f"\nThe teacher's forward costs {teacher_ratio:.2f} of the student's (seconds, on a training batch).")
    if "rrm_cached" in results:
        reference = unaugmented_reference(results)
        lines.append(f"\nrrm_cached: clean matching with the teacher's outputs cached (built in "
                     f"{results['rrm_cached']['cache_build_seconds']:.1f}s, counted in its total); it trains without "
                     f"augmentation, so its step cost is against {reference} (natural training on the same "
                     "unaugmented images).")
    return "\n".join(lines) + "\n"


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds until robust accuracy first reaches `target` on a curve of {"seconds", "robust"}."""
    for point in curve:
        if point["robust"] >= target:
            return point["seconds"]
    return None
