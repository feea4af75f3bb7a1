"""Which method makes which student robust, and what does the teacher add? A study over `recipes/rrm.py` (and
adversarial training) runs, each variant against the same student's teacherless twin at equal compute.

    python recipes/study.py --variants vit/default vit/atta_at --budget 40 --lrs 1e-3 2e-3 --seeds 0 1 2 \
        --final-suite standard
    python recipes/study.py --list

A variant is `STUDENT/MATCHING` (an RRM or distillation run) or `STUDENT/BASELINE` (adversarial training of the
same student, no teacher), each read from YAML files under recipes/configs/study/: students/STUDENT.yaml,
matching/MATCHING.yaml and baselines/BASELINE.yaml. Its settings become the recipe's flags (add any with `--extra`).

Equal compute: with `--budget N` each run trains N natural-step epochs' worth, its epochs N / its step cost
(`rrm_hub.methods.step_cost`), a teacher forward counted at its measured cost relative to the student's
(`--teacher-ratio`, measured once per student). Equal tuning: every variant runs at each of `--lrs` and each
`--lengths` (shares of the budget; first seed), then at its best setting for the other `--seeds`; PGD-20 screens,
and `--final-suite` (AutoAttack) measures the best setting's runs (of `--final-variants`, default all) on
`--final-examples` test images. Runs go in parallel (`--jobs`); each writes its folder under `--output-dir`, and a
run whose folder already holds its result for the same command is not run again (a stopped study resumes). The
study writes study.json, study.md (every run, then each variant at its best setting: mean over seeds and
difference from the twin), study.png (robust accuracy versus training seconds), contribution.png and, with several
--lengths, lengths.png (robust accuracy versus the compute spent, a line per variant).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from rrm_hub import cli
from rrm_hub.config.runs import AdversarialTrainConfig, DistillConfig, StudentConfig
from rrm_hub.config.tools import StudyConfig
from rrm_hub.errors import RRMError, one_line_errors
from rrm_hub.hub.cards import save_json
from rrm_hub.methods import step_cost
from rrm_hub.methods.method import FORWARD
from rrm_hub.runs import study as report

RECIPES = Path(__file__).resolve().parent
VARIANTS = RECIPES / "configs" / "study"
DONE = "study_command.txt"
"""Beside a finished run's metrics.json: the command that made it (a resumed study skips the run when it matches)."""


def _names(folder: str) -> list[str]:
    return sorted(path.stem for path in (VARIANTS / folder).glob("*.yaml"))


def as_model(student: dict) -> dict:
    """A student file's settings for adversarial training: its student section becomes the model section."""
    settings = {key: value for key, value in student.items() if key != "student"}
    name, kwargs = StudentConfig(**student.get("student", {})).resolved()
    return {**settings, "model": {"name": name, "kwargs": kwargs}}


def variants() -> dict[str, tuple[str, list[str]]]:
    """Every named variant: (recipe, flags) for `student/matching` (RRM) and `student/baseline` (no teacher)."""
    table = {}
    for student in _names("students"):
        settings = cli.load_yaml(VARIANTS / "students" / f"{student}.yaml")
        for matching in _names("matching"):
            data = cli.merge(settings, cli.load_yaml(VARIANTS / "matching" / f"{matching}.yaml"))
            table[f"{student}/{matching}"] = ("rrm.py", cli.flags_of(DistillConfig, data))
        for baseline in _names("baselines"):
            data = cli.merge(as_model(settings), cli.load_yaml(VARIANTS / "baselines" / f"{baseline}.yaml"))
            table[f"{student}/{baseline}"] = ("adversarial_train.py", cli.flags_of(AdversarialTrainConfig, data))
    return table


def teacher_flags(recipe: str, config: StudyConfig) -> list[str]:
    teacher = config.teacher or ("default-l2" if config.norm == "l2" else None)
    return ["--teacher", teacher] if teacher and recipe == "rrm.py" else []


def step_cost_of(recipe: str, flags: list[str], teacher_ratio: float = 1.0) -> float:
    """The step cost of a variant's run, in natural steps (`rrm_hub.methods.step_cost`), a teacher forward costing
    `teacher_ratio` student forwards."""
    if recipe == "rrm.py":
        run = cli.parse(DistillConfig, flags)
        return step_cost(run.method, rrm=run.rrm, cached=run.caches_teacher(),
                         ard_weight=run.robust.ard_weight, teacher_ratio=teacher_ratio)
    run = cli.parse(AdversarialTrainConfig, flags)
    return step_cost(run.method, attack_steps=run.attack_steps)


def cache_cost(recipe: str, flags: list[str], teacher_ratio: float = 1.0) -> float:
    """What a teacher cache (--cache-teacher) costs to build, in natural-step epochs: one teacher forward over the
    training images."""
    run = cli.parse(DistillConfig, flags) if recipe == "rrm.py" else None
    if run is None or not run.caches_teacher():
        return 0.0
    return teacher_ratio * FORWARD


def measured_teacher_ratio(flags: list[str], config: StudyConfig) -> float:
    """A teacher forward's seconds over a student forward's, for the student and data of an RRM variant's `flags`
    (with the study's teacher and --extra), on a training batch."""
    import torch

    from rrm_hub.methods.registry import forward_ratio
    from rrm_hub.runs import builders

    run = cli.parse(DistillConfig, [*flags, *teacher_flags("rrm.py", config), *shlex.split(config.extra)])
    run, runtime = builders.start(run, "rrm-student", "rrm.py", push=False)
    spec = builders.student_spec(run, runtime)
    images = builders.images_for(run, runtime, spec)
    teacher = builders.teacher_for(run, images, runtime)
    student = builders.student_for(run, teacher, images, runtime, spec).to(runtime.accelerator.device)
    sample = torch.rand(run.training.batch_size, images.channels, *images.image_size, device=runtime.accelerator.device)
    return forward_ratio(teacher.model, student, sample)


def teacher_ratios(names: list[str], known: dict, config: StudyConfig) -> dict[str, float]:
    """{student: teacher ratio} for the students of `names` that train with a teacher (--teacher-ratio, or
    measured once per student)."""
    ratios: dict[str, float] = {}
    for name in names:
        recipe, flags = known[name]
        student = name.split("/")[0]
        if recipe == "rrm.py" and student not in ratios:
            ratios[student] = config.teacher_ratio or measured_teacher_ratio(flags, config)
            print(f"{student}: a teacher forward costs {ratios[student]:.2f} student forwards"
                  f"{'' if config.teacher_ratio else ' (measured)'}", flush=True)
    return ratios


def command(recipe: str, flags: list[str], config: StudyConfig, folder: Path, seed: int = 0,
            lr: float | None = None, teacher_ratio: float = 1.0, length: float = 1.0) -> list[str]:
    """The recipe run of one variant: its flags, its epochs under `length` x --budget, the study's threat model,
    teacher, seed, learning rate and evaluation flags, --extra."""
    sweep = [f"{e:g}" for e in config.eps_sweep]
    given = [*flags, *shlex.split(config.extra)]
    spent = length * config.budget - cache_cost(recipe, given, teacher_ratio)  # a cache's pass is paid up front
    cost = step_cost_of(recipe, given, teacher_ratio)
    epochs = ["--epochs", str(max(1, round(spent / cost)))] if config.budget else []
    rate = ["--lr", repr(lr)] if lr is not None else []
    return [sys.executable, str(RECIPES / recipe), *flags, *epochs, *rate, *teacher_flags(recipe, config),
            "--norm", config.norm, "--eps", str(config.eps), "--seed", str(seed), "--eps-sweep", *sweep,
            "--sweep-steps", "20", "--no-checks", "--output-dir", str(folder), "--overwrite-output-dir",
            *shlex.split(config.extra)]  # the study owns its runs' folders: a run it starts again starts over


def finished(folder: Path, cmd: list[str]) -> bool:
    """Whether `folder` holds the result of `cmd` already (a resumed study does not run it again)."""
    marker = folder / DONE
    return marker.exists() and marker.read_text() == shlex.join(cmd) and (folder / "metrics.json").exists()


def run_logged(cmd: list[str], folder: Path, log_name: str) -> tuple[bool, str]:
    """Run `cmd` with its output in `folder`/`log_name`; whether it succeeded, and its last line."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / log_name, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    tail = (folder / log_name).read_text().strip().splitlines()[-1:] or ["no output"]
    return code == 0, tail[0]


def run_one(name: str, cmd: list[str], folder: Path, seed: int, lr: float | None, cost: float,
            length: float = 1.0) -> dict:
    """Run one variant (unless its folder holds its result already); its row, or the error it ended with."""
    started = time.perf_counter()
    if not finished(folder, cmd):
        (folder / DONE).unlink(missing_ok=True)
        ok, tail = run_logged(cmd, folder, "run.log")
        if not ok or not (folder / "metrics.json").exists():
            print(f"{name} (lr {lr}, length {length:g}, seed {seed}): FAILED ({tail})", flush=True)
            return {"variant": name, "seed": seed, "lr": lr, "length": length, "error": tail,
                    "command": shlex.join(cmd)}
        (folder / DONE).write_text(shlex.join(cmd))
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"seed": seed, "lr": lr if lr is not None else metrics_lr(folder), "length": length,
           **summarize(name, metrics, round(time.perf_counter() - started, 1)),
           "command": shlex.join(cmd), "step_cost": round(cost, 3), "folder": str(folder)}
    print(f"{name} (lr {report.rate_text(row['lr'], length)}, seed {seed}): clean {row['clean']:.1%}, robust "
          f"{row['robust']:.1%} at eps "
          f"{metrics['eps']:g}, {row['seconds_per_step'] * 1000:.1f} ms/step, {row['train_seconds']:.0f}s", flush=True)
    return row


def metrics_lr(folder: Path) -> float:
    """The learning rate a run trained at (its run_config.yaml)."""
    return float(yaml.safe_load((folder / cli.CONFIG_FILE).read_text())["training"]["lr"])


def summarize(name: str, metrics: dict, wall_seconds: float) -> dict:
    """One table row from a run's metrics.json."""
    return {
        "variant": name, "clean": metrics["clean_accuracy"], "robust": metrics["robust_accuracy"]["worst_case"],
        "suite": metrics["robust_accuracy"],
        "sweep": {f"{p['eps']:g}": p["accuracy"] for p in metrics["sweep"] if p["eps"] > 0},
        "train_seconds": metrics["train_seconds"], "steps": metrics["steps"], "epochs": metrics["epochs"],
        "seconds_per_step": metrics["train_seconds"] / max(metrics["steps"], 1), "wall_seconds": wall_seconds,
        "teacher_robust": (metrics.get("teacher_robust_accuracy") or {}).get("worst_case"),
    }


def final_command(row: dict, config: StudyConfig) -> list[str]:
    """recipes/evaluate.py on a run's student: --final-suite on --final-examples images of the run's test data."""
    folder = Path(row["folder"])
    data = yaml.safe_load((folder / cli.CONFIG_FILE).read_text()).get("data", {})
    flags = [flag for key, option in (("dataset", "--dataset"), ("dataset_config", "--dataset-config"),
                                      ("test_split", "--test-split"), ("image_column", "--image-column"),
                                      ("label_column", "--label-column"))
             if data.get(key) is not None for flag in (option, str(data[key]))]
    return [sys.executable, str(RECIPES / "evaluate.py"), "--model", str(folder), *flags, "--suite",
            config.final_suite, "--n-examples", str(config.final_examples), "--norm", config.norm, "--eps",
            str(config.eps), "--no-checks", "--seed", str(row["seed"]), "--output-dir",
            str(folder / f"final-{config.final_suite}")]


def run_final(row: dict, config: StudyConfig) -> dict:
    """`row` with its final suite's clean and robust accuracy (evaluated unless already there)."""
    cmd = final_command(row, config)
    folder = Path(row["folder"]) / f"final-{config.final_suite}"
    if not finished(folder, cmd):
        ok, tail = run_logged(cmd, folder, "evaluate.log")
        if not ok:
            print(f"{row['variant']} (seed {row['seed']}): final suite FAILED ({tail})", flush=True)
            return row
        (folder / DONE).write_text(shlex.join(cmd))
    metrics = json.loads((folder / "metrics.json").read_text())
    final = {"suite": f"autoattack-{config.final_suite}", "clean": metrics["clean_accuracy"],
             "robust": metrics["robust_accuracy"]["worst_case"], "num_examples": metrics["num_examples"]}
    print(f"{row['variant']} (lr {report.rate_text(*report.setting(row))}, seed {row['seed']}): {final['suite']} "
          f"{final['robust']:.1%} on "
          f"{final['num_examples']} images", flush=True)
    return {**row, "final": final}


def combine(config: StudyConfig) -> dict:
    """data-gap.json and data-gap.png: each variant's teacher contribution by the student's number of images, from
    the studies --combine names."""
    studies = []
    for folder in config.combine:
        path = Path(folder) / "study.json"
        if not path.exists():
            raise RRMError(f"--combine {folder}: no study.json there; run the study first")
        study = json.loads(path.read_text())
        done = [r for r in study["rows"] if "error" not in r]
        if not done:
            raise RRMError(f"--combine {folder}: its study has no finished run")
        studies.append({**study, "images": train_images(Path(done[0]["folder"]))})
    points = report.data_gap(studies)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"studies": config.combine, "twin": config.twin, "points": points}
    save_json(result, output_dir / "data-gap.json")
    report.plot_data_gap(points, config.twin, output_dir / "data-gap.png")
    for p in points:
        print(f"{p['variant']:<20} {p['images']:>6} images: {p['robust']:.1%} ({p['by']}), "
              f"{p['teacher_contribution'] * 100:+.1f} points over the twin")
    return result


def train_images(folder: Path) -> int:
    """How many training images a run had (its dataset and --train-split, as its run_config.yaml says)."""
    from rrm_hub.config.sections import DataConfig
    from rrm_hub.runs.builders import load_data
    from rrm_hub.settings import from_dict

    run = yaml.safe_load((folder / cli.CONFIG_FILE).read_text())
    return load_data(from_dict(DataConfig, run.get("data", {})), run["training"]["seed"]).train_size


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(StudyConfig, argv, description=__doc__)
    if config.twin not in _names("baselines"):
        raise RRMError(f"--twin {config.twin} is not a baseline; choose one of {', '.join(_names('baselines'))}")
    if config.combine:
        return combine(config)
    known = variants()
    if config.list_variants:
        for name, (recipe, flags) in known.items():
            print(f"{name:<24} {recipe} {shlex.join(flags)}")
        return {}
    unknown = [v for v in config.variants if v not in known]
    if unknown:
        raise RRMError(f"unknown variant(s) {', '.join(unknown)}; see --list")
    unstudied = [v for v in config.final_variants or [] if v not in config.variants]
    if unstudied:
        raise RRMError(f"--final-variants {' '.join(unstudied)}: not in --variants; add it there or drop it")
    output_dir = Path(config.output_dir)
    ratios = teacher_ratios(config.variants, known, config) if config.budget else {}

    def launch(name: str, seed: int, lr: float | None, length: float) -> dict:
        recipe, flags = known[name]
        folder = output_dir / (name.replace("/", "__") + (f"-lr{lr:g}" if lr is not None else "")
                               + (f"-len{length:g}" if length != 1 else "") + f"-seed{seed}")
        ratio = ratios.get(name.split("/")[0], 1.0) if recipe == "rrm.py" else 1.0
        cmd = command(recipe, flags, config, folder, seed, lr, ratio, length)
        cost = step_cost_of(recipe, [*flags, *shlex.split(config.extra)], ratio)
        return run_one(name, cmd, folder, seed, lr, cost, length)

    with ThreadPoolExecutor(config.jobs) as pool:
        first, rest = config.seeds[0], config.seeds[1:]
        # 1. every variant at every learning rate and length, first seed; 2. the other seeds at its best setting
        screening = [(v, first, lr, length) for v in config.variants for lr in (config.lrs or [None])
                     for length in config.lengths]
        rows = list(pool.map(lambda job: launch(*job), screening))
        best = report.best_settings(rows)
        rows += list(pool.map(lambda job: launch(*job), [(v, seed, best[v][0] if config.lrs else None, best[v][1])
                                                          for v in config.variants if v in best
                                                          and (config.seeded is None or v in config.seeded)
                                                          for seed in rest]))
        if config.final_suite != "none":  # 3. the final suite on the best setting's runs
            best = report.best_settings(rows)
            chosen = [i for i, r in enumerate(rows) if "error" not in r and report.setting(r) == best[r["variant"]]
                      and (config.final_variants is None or r["variant"] in config.final_variants)]
            for i, row in zip(chosen, pool.map(lambda i: run_final(rows[i], config), chosen), strict=True):
                rows[i] = row
    summary = report.contributions(rows, config.twin)
    result = {"eps": config.eps, "norm": config.norm, "jobs": config.jobs, "extra": config.extra, "budget":
              config.budget, "seeds": config.seeds, "lrs": config.lrs, "lengths": config.lengths, "twin": config.twin,
              "teacher_ratios": ratios, "final_suite": config.final_suite, "rows": rows, "summary": summary}
    save_json(result, output_dir / "study.json")
    text = report.table(rows) + "\n" + report.summary_table(summary, config.twin)
    (output_dir / "study.md").write_text(text)
    report.plot(rows, output_dir / "study.png", config.eps)
    if len(config.lengths) > 1 and config.budget:
        report.plot_lengths(rows, config.budget, output_dir / "lengths.png", config.eps)
    report.plot_contributions(summary, config.twin, output_dir / "contribution.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
