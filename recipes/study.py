"""Which RRM variant makes which student robust? A study over `recipes/rrm.py` (and PGD-AT) runs.

    python recipes/study.py --variants vit/noise vit/adversarial cnn/noise --jobs 2
    python recipes/study.py --list

Each variant is one run of a recipe with its own flags (see VARIANTS, or name any recipe flags with
`--extra`). Runs go in parallel (`--jobs`), each writes its folder under `--output-dir`; the study
collects their metrics.json into study.json, a markdown table (variant, seconds per step, clean, robust
accuracy at each sweep epsilon, seconds) and study.png (robust accuracy at --eps versus training seconds).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rrm_hub.cards import save_json
from rrm_hub.errors import RRMError, cli
from rrm_hub.flags import DEFAULT_STUDENT, DEFAULT_STUDENT_KWARGS

RECIPES = Path(__file__).resolve().parent
STUDENTS = {
    "vit": [],  # the default student of recipes/rrm.py: ViT-Tiny family, 28 px, patch 7, depth 4, width 96
    "vit-p4": ["--student", "vit_tiny_patch16_224", "--student-kwargs", "img_size=28", "patch_size=4", "depth=4",
               "embed_dim=96", "num_heads=3"],
    "vit-wide": ["--student", "vit_tiny_patch16_224", "--student-kwargs", "img_size=28", "patch_size=7", "depth=4",
                 "embed_dim=192", "num_heads=3"],  # the default ViT at twice the width
    "vit-deep": ["--student", "vit_tiny_patch16_224", "--student-kwargs", "img_size=28", "patch_size=7", "depth=8",
                 "embed_dim=96", "num_heads=3"],  # the default ViT at twice the depth
    "vit-conv": ["--student", "vit_tiny_r_s16_p8_224", "--student-kwargs", "img_size=28", "patch_size=1",
                 "depth=4", "embed_dim=96", "num_heads=3"],  # ViT on a ResNet stem (conv, stride 4): 7x7 tokens
    "cnn": ["--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(24,48,96,128)",
            "stem_width=24", "output_stride=8", "--lr", "3e-3"],
}
ANCHORED = ["--match-on", "adversarial", "--match-attack-loss", "mismatch", "--match-start", "random",
            "--ce-weight", "0.005", "--teacher-input", "clean", "--clean-weight", "1", "--match-eps-warmup", "0.3"]
"""Adversarial matching with a clean anchor, as the H100 study ran it (then the step raised the mismatch, from a
random start, and CE had the reference weight)."""
MATCHING = {
    "default": [],  # recipes/rrm.py's defaults
    "clean": ["--match-on", "clean"],  # the paper's method
    "noise": ["--match-on", "noise"],
    "sign-noise": ["--match-on", "noise", "--noise", "sign"],
    "noise-kd": ["--match-on", "noise", "--kd-weight", "1"],
    "n-fgsm": ["--match-attack", "n-fgsm", "--match-start", "random"],  # the default's step made N-FGSM's
    "mismatch-attack": ["--match-attack-loss", "mismatch"],  # the default's step raising the feature mismatch
    "random-start": ["--match-start", "random"],  # the default's attack from a random start each time (FGSM-RS)
    "free": ["--match-attack", "free"],  # no attack pass: the training backward moves the carried perturbations
    "keep-best": ["--holdout", "500", "--keep-best"],  # end with the epoch most robust on 500 held-out images
    "adversarial": ANCHORED,
    "adversarial-kd": ANCHORED + ["--kd-weight", "1"],
    "adversarial-ce": ANCHORED + ["--ce-weight", "0.5"],
}
PGD_AT = ["--method", "pgd_at", "--attack-steps", "7", "--eps-warmup", "0.3"]
ATTA_AT = ["--method", "atta_at", "--epochs", "60", "--eps-warmup", "0.5", "--pad", "0"]
"""Adversarial training with the default's attack (carried over epochs), unaugmented, without a teacher: the control
of the CPU study (60 epochs, as the RRM runs it is compared with)."""


def variants() -> dict[str, tuple[str, list[str]]]:
    """Every named variant: `student/matching` for RRM and `student/pgd_at` for the PGD-AT baseline."""
    table = {}
    for student, student_flags in STUDENTS.items():
        for matching, matching_flags in MATCHING.items():
            table[f"{student}/{matching}"] = ("rrm.py", student_flags + matching_flags)
        model_flags = ([f.replace("--student-kwargs", "--model-kwargs").replace("--student", "--model")
                        for f in student_flags]
                       or ["--model", DEFAULT_STUDENT, "--model-kwargs", *DEFAULT_STUDENT_KWARGS])
        table[f"{student}/pgd_at"] = ("adversarial_train.py", model_flags + PGD_AT)
        table[f"{student}/atta_at"] = ("adversarial_train.py", model_flags + ATTA_AT)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["vit/clean", "vit/noise", "cnn/clean", "cnn/noise"],
                        help="names from --list")
    parser.add_argument("--list", action="store_true", help="print the variants and their flags, then stop")
    parser.add_argument("--extra", default="", help="flags added to every run, e.g. '--epochs 60 --batch-size 256'")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--eps-sweep", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                        help="epsilons reported in the table (PGD-20)")
    parser.add_argument("--output-dir", default="study")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise RRMError("--jobs must be >= 1")
    return args


def command(recipe: str, flags: list[str], args: argparse.Namespace, folder: Path) -> list[str]:
    """The recipe run of one variant: its flags, then the study's evaluation flags, then --extra."""
    sweep = [f"{e:g}" for e in args.eps_sweep]
    return [sys.executable, str(RECIPES / recipe), *flags, "--eps", str(args.eps), "--eps-sweep", *sweep,
            "--sweep-steps", "20", "--no-checks", "--output-dir", str(folder), *shlex.split(args.extra)]


def run_one(name: str, cmd: list[str], folder: Path) -> dict:
    """Run one variant, its output in `folder`/run.log; its metrics, or the error it ended with."""
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = round(time.perf_counter() - started, 1)
    if code != 0 or not (folder / "metrics.json").exists():
        tail = (folder / "run.log").read_text().strip().splitlines()[-1:] or ["no output"]
        print(f"{name}: FAILED ({tail[0]})", flush=True)
        return {"variant": name, "error": tail[0], "command": shlex.join(cmd)}
    metrics = json.loads((folder / "metrics.json").read_text())
    row = summarize(name, metrics, seconds)
    row["command"] = shlex.join(cmd)
    print(f"{name}: clean {row['clean']:.1%}, robust {row['robust']:.1%} at eps {metrics['eps']:g}, "
          f"{row['seconds_per_step'] * 1000:.1f} ms/step, {row['train_seconds']:.0f}s", flush=True)
    return row


def summarize(name: str, metrics: dict, wall_seconds: float) -> dict:
    """One table row from a run's metrics.json."""
    return {
        "variant": name, "clean": metrics["clean_accuracy"], "robust": metrics["robust_accuracy"]["worst_case"],
        "sweep": {f"{p['eps']:g}": p["accuracy"] for p in metrics["sweep"] if p["eps"] > 0},
        "train_seconds": metrics["train_seconds"], "steps": metrics["steps"], "epochs": metrics["epochs"],
        "seconds_per_step": metrics["train_seconds"] / max(metrics["steps"], 1), "wall_seconds": wall_seconds,
        "teacher_robust": (metrics.get("teacher_robust_accuracy") or {}).get("worst_case"),
    }


def table(rows: list[dict], eps: float) -> str:
    """Markdown: one line per variant; robust columns are PGD-20 accuracy at each sweep epsilon."""
    done = [r for r in rows if "error" not in r]
    epsilons = sorted({e for r in done for e in r["sweep"]}, key=float)
    lines = ["| variant | ms/step | epochs | train s | clean | " + " | ".join(f"eps {e}" for e in epsilons) + " |",
             "|---" * (5 + len(epsilons)) + "|"]
    for r in done:
        robust = " | ".join(f"{r['sweep'][e]:.1%}" if e in r["sweep"] else "-" for e in epsilons)
        lines.append(f"| {r['variant']} | {r['seconds_per_step'] * 1000:.1f} | {r['epochs']} | "
                     f"{r['train_seconds']:.0f} | {r['clean']:.1%} | {robust} |")
    lines += [f"| {r['variant']} | failed: {r['error']} |" for r in rows if "error" in r]
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


@cli
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    known = variants()
    if args.list:
        for name, (recipe, flags) in known.items():
            print(f"{name:<24} {recipe} {shlex.join(flags)}")
        return {}
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        raise RRMError(f"unknown variant(s) {', '.join(unknown)}; see --list")
    output_dir = Path(args.output_dir)
    runs = {v: command(*known[v], args, output_dir / v.replace("/", "__")) for v in args.variants}
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda v: run_one(v, runs[v], output_dir / v.replace("/", "__")), runs))
    result = {"eps": args.eps, "jobs": args.jobs, "extra": args.extra, "rows": rows}
    save_json(result, output_dir / "study.json")
    (output_dir / "study.md").write_text(table(rows, args.eps))
    plot(rows, output_dir / "study.png", args.eps)
    print(table(rows, args.eps))
    return result


if __name__ == "__main__":
    main()
