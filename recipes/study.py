"""Which RRM variant makes which student robust? A study over `recipes/rrm.py` (and adversarial training) runs.

    python recipes/study.py --variants vit/noise vit/adversarial cnn/noise --jobs 2
    python recipes/study.py --list

A variant is `STUDENT/MATCHING` (an RRM run) or `STUDENT/BASELINE` (adversarial training of the same student, no
teacher), each read from YAML files under recipes/configs/study/: students/STUDENT.yaml, matching/MATCHING.yaml and
baselines/BASELINE.yaml. Its settings become the recipe's flags (add any with `--extra`). Runs go in parallel
(`--jobs`), each writes its folder under `--output-dir`; the study collects their metrics.json into study.json, a
markdown table (variant, seconds per step, clean, robust accuracy at each sweep epsilon, seconds; then each variant's
mean over --seeds and its difference from the same student's teacherless --twin), study.png (robust accuracy at
--eps versus training seconds) and contribution.png (that difference, a bar a variant).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rrm_hub import cli
from rrm_hub.attacks import Norm
from rrm_hub.cards import save_json
from rrm_hub.config import AdversarialTrainConfig, DistillConfig, RunConfig, StudentConfig
from rrm_hub.errors import RRMError, one_line_errors
from rrm_hub.methods import step_cost
from rrm_hub.settings import setting

RECIPES = Path(__file__).resolve().parent
VARIANTS = RECIPES / "configs" / "study"


@dataclass
class StudyConfig(RunConfig):
    variants: list[str] = setting(help="names from --list", nargs="*",
                                  factory=lambda: ["vit/clean", "vit/noise", "cnn/clean", "cnn/noise"])
    list_variants: bool = setting(False, "print the variants and their flags, then stop", flag="--list")
    extra: str = setting("", "flags added to every run, e.g. '--epochs 60 --batch-size 256'")
    jobs: int = setting(1, "runs at a time", ge=1)
    eps: float = setting(0.3, "attack budget of every run", ge=0)
    norm: Norm = setting("linf", "threat model of every run")
    teacher: str | None = setting(None, "teacher of the RRM / distillation runs (default: the recipe's; "
                                  "default-l2 for --norm l2)")
    seeds: list[int] = setting(help="each variant runs once per seed", nargs="+", factory=lambda: [0])
    twin: str = setting("atta_at", "the teacherless baseline each variant is compared with (STUDENT/TWIN)")
    budget: float = setting(0.0, "compute of every run, in natural-step epochs: each trains budget / (its step cost "
                            "in natural steps, rrm_hub.methods.step_cost) epochs (0: the variants' own epochs)", ge=0)
    eps_sweep: list[float] = setting(help="epsilons reported in the table (PGD-20)", nargs="+", ge=0,
                                     factory=lambda: [0.1, 0.2, 0.3])
    output_dir: str = setting("study", "output folder")

    def check_rules(self) -> None:
        if self.twin not in _names("baselines"):
            raise RRMError(f"--twin {self.twin} is not a baseline; choose one of {', '.join(_names('baselines'))}")


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


def step_cost_of(recipe: str, flags: list[str]) -> float:
    """The step cost of a variant's run, in natural steps (`rrm_hub.methods.step_cost`)."""
    if recipe == "rrm.py":
        run = cli.parse(DistillConfig, flags)
        return step_cost(run.method, rrm=run.rrm, cached=run.rrm.cache_teacher, ard_weight=run.robust.ard_weight)
    run = cli.parse(AdversarialTrainConfig, flags)
    return step_cost(run.method, attack_steps=run.attack_steps)


def command(recipe: str, flags: list[str], config: StudyConfig, folder: Path, seed: int = 0) -> list[str]:
    """The recipe run of one variant: its flags, its epochs under --budget, the study's threat model, teacher,
    seed and evaluation flags, --extra."""
    sweep = [f"{e:g}" for e in config.eps_sweep]
    epochs = ["--epochs", str(max(1, round(config.budget / step_cost_of(recipe, flags))))] if config.budget else []
    teacher = config.teacher or ("default-l2" if config.norm == "l2" else None)
    teacher_flags = ["--teacher", teacher] if teacher and recipe == "rrm.py" else []
    return [sys.executable, str(RECIPES / recipe), *flags, *epochs, *teacher_flags, "--norm", config.norm,
            "--eps", str(config.eps), "--seed", str(seed), "--eps-sweep", *sweep, "--sweep-steps", "20",
            "--no-checks", "--output-dir", str(folder), *shlex.split(config.extra)]


def run_one(name: str, cmd: list[str], folder: Path, seed: int = 0) -> dict:
    """Run one variant, its output in `folder`/run.log; its metrics, or the error it ended with."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - started, 1)
    if code != 0 or not (folder / "metrics.json").exists():
        tail = (folder / "run.log").read_text().strip().splitlines()[-1:] or ["no output"]
        print(f"{name}: FAILED ({tail[0]})", flush=True)
        return {"variant": name, "seed": seed, "error": tail[0], "command": shlex.join(cmd)}
    metrics = json.loads((folder / "metrics.json").read_text())
    row = {"seed": seed, **summarize(name, metrics, seconds)}
    row["command"] = shlex.join(cmd)
    row["step_cost"] = round(step_cost_of(*variants()[name]), 3)
    print(f"{name} (seed {seed}): clean {row['clean']:.1%}, robust {row['robust']:.1%} at eps {metrics['eps']:g}, "
          f"{row['seconds_per_step'] * 1000:.1f} ms/step, {row['train_seconds']:.0f}s", flush=True)
    return row


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


def table(rows: list[dict], eps: float) -> str:
    """Markdown: one line per variant; robust columns are PGD-20 accuracy at each sweep epsilon."""
    done = [r for r in rows if "error" not in r]
    epsilons = sorted({e for r in done for e in r["sweep"]}, key=float)
    lines = ["| variant | step cost | epochs | natural-step epochs | ms/step | train s | clean | "
             + " | ".join(f"eps {e}" for e in epsilons) + " | final suite |", "|---" * (8 + len(epsilons)) + "|"]
    seeded = len({r.get("seed", 0) for r in done}) > 1
    for r in done:
        name = f"{r['variant']} (seed {r['seed']})" if seeded else r["variant"]
        robust = " | ".join(f"{r['sweep'][e]:.1%}" if e in r["sweep"] else "-" for e in epsilons)
        cost = r.get("step_cost")
        units = "-" if cost is None else f"{cost * r['epochs']:.1f}"
        final = ", ".join(f"{name} {value:.1%}" for name, value in r["suite"].items())
        lines.append(f"| {name} | {'-' if cost is None else f'{cost:.2f}'} | {r['epochs']} | {units} | "
                     f"{r['seconds_per_step'] * 1000:.1f} | {r['train_seconds']:.0f} | {r['clean']:.1%} | {robust} | "
                     f"{final} |")
    lines += [f"| {r['variant']} | failed: {r['error']} |" for r in rows if "error" in r]
    return "\n".join(lines) + "\n"


def contributions(rows: list[dict], twin: str) -> list[dict]:
    """Per variant: mean, lowest and highest final robust accuracy over its seeds, and the teacher's contribution,
    the mean minus that of the same student's teacherless `twin` (None where the twin was not run)."""
    done = [r for r in rows if "error" not in r]
    names = list(dict.fromkeys(r["variant"] for r in done))
    robust = {n: [r["robust"] for r in done if r["variant"] == n] for n in names}
    clean = {n: [r["clean"] for r in done if r["variant"] == n] for n in names}
    summary = []
    for name in names:
        mean = sum(robust[name]) / len(robust[name])
        baseline = robust.get(f"{name.split('/')[0]}/{twin}")
        summary.append({"variant": name, "seeds": len(robust[name]), "clean": sum(clean[name]) / len(clean[name]),
                        "robust": mean, "lowest": min(robust[name]), "highest": max(robust[name]),
                        "teacher_contribution": None if baseline is None or name.endswith(f"/{twin}")
                        else mean - sum(baseline) / len(baseline)})
    return summary


def summary_table(summary: list[dict], twin: str) -> str:
    """Markdown: each variant's mean over seeds and its difference from the teacherless twin."""
    lines = [f"| variant | seeds | clean (mean) | final robust (mean) | lowest - highest | minus {twin} |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        delta = "-" if s["teacher_contribution"] is None else f"{s['teacher_contribution'] * 100:+.1f} points"
        lines.append(f"| {s['variant']} | {s['seeds']} | {s['clean']:.1%} | {s['robust']:.1%} | "
                     f"{s['lowest']:.1%} - {s['highest']:.1%} | {delta} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, eps: float) -> None:
    """Robust accuracy at `eps` versus training seconds, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "error" not in r:
            ax.scatter(r["train_seconds"], r["robust"])
            ax.annotate(r["variant"], (r["train_seconds"], r["robust"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("training seconds")
    ax.set_ylabel(f"robust accuracy, PGD-20 at eps {eps:g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_contributions(summary: list[dict], twin: str, path: Path) -> None:
    """Each variant's mean robust accuracy minus its teacherless twin's, a bar each (nothing where no twin ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [s for s in summary if s["teacher_contribution"] is not None]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(bars) + 1.2))
    values = [100 * s["teacher_contribution"] for s in bars]
    ax.barh([s["variant"] for s in bars], values, color=["tab:green" if v > 0 else "tab:red" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"robust accuracy minus STUDENT/{twin}'s (points)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(StudyConfig, argv, description=__doc__)
    known = variants()
    if config.list_variants:
        for name, (recipe, flags) in known.items():
            print(f"{name:<24} {recipe} {shlex.join(flags)}")
        return {}
    unknown = [v for v in config.variants if v not in known]
    if unknown:
        raise RRMError(f"unknown variant(s) {', '.join(unknown)}; see --list")
    output_dir = Path(config.output_dir)
    runs = [(v, seed, output_dir / (v.replace("/", "__") + (f"-seed{seed}" if len(config.seeds) > 1 else "")))
            for v in config.variants for seed in config.seeds]
    with ThreadPoolExecutor(config.jobs) as pool:
        rows = list(pool.map(lambda r: run_one(r[0], command(*known[r[0]], config, r[2], r[1]), r[2], r[1]), runs))
    summary = contributions(rows, config.twin)
    result = {"eps": config.eps, "norm": config.norm, "jobs": config.jobs, "extra": config.extra, "budget":
              config.budget, "seeds": config.seeds, "twin": config.twin, "rows": rows, "summary": summary}
    save_json(result, output_dir / "study.json")
    text = table(rows, config.eps) + "\n" + summary_table(summary, config.twin)
    (output_dir / "study.md").write_text(text)
    plot(rows, output_dir / "study.png", config.eps)
    plot_contributions(summary, config.twin, output_dir / "contribution.png")
    print(text)
    return result


if __name__ == "__main__":
    main()
