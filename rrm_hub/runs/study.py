"""What a study of runs found: each variant at its best learning rate and length, its seeds, and what a teacher adds
over the same student's teacherless twin. Rows are the runs (`variant`, `lr`, `length`: the share of the budget it
trained for, `seed`, `clean`, `robust`: PGD-20 screening; `final`: the final suite's {suite, clean, robust} where it
ran); `recipes/study.py` makes them."""

from __future__ import annotations

from pathlib import Path
from statistics import mean


def done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def setting(row: dict) -> tuple[float, float]:
    """The (learning rate, length) a run trained at; the length is its share of the study's budget (1 if unsaid)."""
    return row["lr"], row.get("length", 1.0)


def best_settings(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each variant's (learning rate, length) with the highest screening robust accuracy at the seed that ran every
    setting (the screening; ties: the smaller rate, then the longer run), so that the setting the other seeds ran at
    stays the best once they are in."""
    scores: dict[str, dict[int, dict[tuple[float, float], float]]] = {}
    for r in done(rows):
        scores.setdefault(r["variant"], {}).setdefault(r["seed"], {})[setting(r)] = r["robust"]
    best = {}
    for variant, by_seed in scores.items():
        screening = max(by_seed.values(), key=len)  # the first seed with the most settings
        best[variant] = max(sorted(screening, key=lambda s: (s[0], -s[1])), key=screening.get)
    return best


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Each variant's learning rate at its best setting (`best_settings`)."""
    return {variant: best[0] for variant, best in best_settings(rows).items()}


def rate_text(lr: float, length: float = 1.0) -> str:
    """A learning rate, and the share of the budget where a run trained for less than all of it."""
    return f"{lr:g}" if length == 1 else f"{lr:g} ({100 * length:g}% of budget)"


def measured(row: dict) -> tuple[float, float, str]:
    """(clean, robust, by what) of a run: the final suite's where it ran, else the screening's."""
    final = row.get("final")
    if final:
        return final["clean"], final["robust"], final["suite"]
    return row["clean"], row["robust"], "pgd20"


def contributions(rows: list[dict], twin: str) -> list[dict]:
    """Per variant, at its best learning rate: the mean, lowest and highest robust accuracy over its seeds (the final
    suite's where every seed has it, else the screening's), and the teacher's contribution: that mean minus the same
    student's teacherless `twin`'s (None where the twin did not run), by the suite both were measured by, else by
    both PGD-20 screenings (`contribution_by`)."""
    best = best_settings(rows)
    chosen = [r for r in done(rows) if setting(r) == best[r["variant"]]]
    names = list(dict.fromkeys(r["variant"] for r in chosen))
    stats = {}
    for name in names:
        runs = [r for r in chosen if r["variant"] == name]
        final = all(r.get("final") for r in runs)
        values = [measured(r) if final else (r["clean"], r["robust"], "pgd20") for r in runs]
        robust = [v[1] for v in values]
        stats[name] = {"variant": name, "lr": best[name][0], "length": best[name][1], "seeds": len(runs),
                       "by": values[0][2], "clean": mean(v[0] for v in values), "robust": mean(robust),
                       "lowest": min(robust), "highest": max(robust),
                       "screening_robust": mean(r["robust"] for r in runs)}
    for name, s in stats.items():
        baseline = stats.get(f"{name.split('/')[0]}/{twin}")
        if baseline is None or name.endswith(f"/{twin}"):
            s["teacher_contribution"] = s["contribution_by"] = None
        elif baseline["by"] == s["by"]:
            s["teacher_contribution"], s["contribution_by"] = s["robust"] - baseline["robust"], s["by"]
        else:  # one of the two had no final suite: compared by their screenings
            s["teacher_contribution"] = s["screening_robust"] - baseline["screening_robust"]
            s["contribution_by"] = "pgd20"
    return list(stats.values())


def table(rows: list[dict]) -> str:
    """Markdown: one line per run; robust columns are PGD-20 accuracy at each sweep epsilon, then the final suite."""
    runs = done(rows)
    epsilons = sorted({e for r in runs for e in r["sweep"]}, key=float)
    lines = ["| variant | lr | seed | step cost | epochs | natural-step epochs | ms/step | train s | clean | "
             + " | ".join(f"eps {e}" for e in epsilons) + " | final suite |", "|---" * (10 + len(epsilons)) + "|"]
    for r in runs:
        robust = " | ".join(f"{r['sweep'][e]:.1%}" if e in r["sweep"] else "-" for e in epsilons)
        cost = r.get("step_cost")
        units = "-" if cost is None else f"{cost * r['epochs']:.1f}"
        final = r.get("final")
        final_text = (f"{final['suite']}: {final['robust']:.1%} ({final['clean']:.1%} clean)" if final else
                      ", ".join(f"{name} {value:.1%}" for name, value in r["suite"].items()))
        lines.append(f"| {r['variant']} | {rate_text(*setting(r))} | {r['seed']} | "
                     f"{'-' if cost is None else f'{cost:.2f}'} | "
                     f"{r['epochs']} | {units} | {r['seconds_per_step'] * 1000:.1f} | {r['train_seconds']:.0f} | "
                     f"{r['clean']:.1%} | {robust} | {final_text} |")
    lines += [f"| {r['variant']} | {r.get('lr', '-')} | {r.get('seed', '-')} | failed: {r['error']} |"
              for r in rows if "error" in r]
    return "\n".join(lines) + "\n"


def summary_table(summary: list[dict], twin: str) -> str:
    """Markdown: each variant at its best learning rate (and length), its mean over seeds and its difference from the
    twin."""
    lines = [f"| variant | best lr (length) | seeds | measured by | clean (mean) | robust (mean) | lowest - highest | "
             f"minus {twin} |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        delta = "-" if s["teacher_contribution"] is None else f"{s['teacher_contribution'] * 100:+.1f} points"
        if s["teacher_contribution"] is not None and s["contribution_by"] != s["by"]:
            delta += f" ({s['contribution_by']})"
        lines.append(f"| {s['variant']} | {rate_text(s['lr'], s['length'])} | {s['seeds']} | {s['by']} | "
                     f"{s['clean']:.1%} | "
                     f"{s['robust']:.1%} | {s['lowest']:.1%} - {s['highest']:.1%} | {delta} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], path: Path, eps: float) -> None:
    """Robust accuracy (PGD-20) at `eps` versus training seconds, one labelled point per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in done(rows):
        ax.scatter(r["train_seconds"], r["robust"])
        ax.annotate(f"{r['variant']} lr {rate_text(*setting(r))}", (r["train_seconds"], r["robust"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training seconds")
    ax.set_ylabel(f"robust accuracy, PGD-20 at eps {eps:g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lengths(rows: list[dict], budget: float, path: Path, eps: float) -> None:
    """Robust accuracy (PGD-20) at `eps` versus the compute a run spent (its share of the study's `budget`, in
    natural-step epochs), a line per variant over its lengths at its best learning rate and the screening seed."""
    best, first, lines = best_settings(rows), {}, {}
    for r in done(rows):
        first[r["variant"]] = min(first.get(r["variant"], r["seed"]), r["seed"])
    for r in done(rows):
        lr, length = setting(r)
        if lr == best[r["variant"]][0] and r["seed"] == first[r["variant"]]:
            lines.setdefault(r["variant"], []).append((length * budget, r["robust"]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, points in lines.items():
        spent, robust = zip(*sorted(points), strict=True)
        ax.plot(spent, [100 * value for value in robust], marker="o", label=variant)
    spent_at = sorted({x for points in lines.values() for x, _ in points})
    _log_x(ax, spent_at, [f"{x:.0f}" for x in spent_at], base=2)
    ax.set_xlabel("compute spent (natural-step epochs of the training images)")
    ax.set_ylabel(f"robust accuracy (%), PGD-20 at eps {eps:g}")
    _save(plt, fig, ax, path, legend=8)


def _log_x(ax, ticks: list[float], labels: list[str], base: int = 10) -> None:
    """A log x axis ticked at the values studied, not at the powers of `base`."""
    ax.set_xscale("log", base=base)
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()


def _save(plt, fig, ax, path: Path, legend: int) -> None:
    """Grid, legend (font size `legend`), and the figure written to `path`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_contributions(summary: list[dict], twin: str, path: Path) -> None:
    """Each variant's mean robust accuracy minus its teacherless twin's, a bar each (nothing where no twin ran)."""
    bars = [s for s in summary if s["teacher_contribution"] is not None]
    if not bars:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(bars) + 1.2))
    values = [100 * s["teacher_contribution"] for s in bars]
    ax.barh([f"{s['variant']} ({s['contribution_by']})" for s in bars], values,
            color=["tab:green" if v > 0 else "tab:red" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"robust accuracy minus STUDENT/{twin}'s (points)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def data_gap(studies: list[dict]) -> list[dict]:
    """Each variant's teacher contribution by the student's number of training images, from studies that differ
    only in that (`images`: the runs' training images, read from their metrics)."""
    points = []
    for study in studies:
        for summary in study["summary"]:
            if summary["teacher_contribution"] is None:
                continue
            by = summary.get("contribution_by", summary["by"])
            points.append({"variant": summary["variant"], "images": study["images"], "by": by,
                           "robust": summary["robust"], "teacher_contribution": summary["teacher_contribution"],
                           "seeds": summary["seeds"]})
    return sorted(points, key=lambda p: (p["variant"], p["images"]))


def plot_data_gap(points: list[dict], twin: str, path: Path) -> None:
    """The teacher's contribution (points of robust accuracy over the twin's) against the student's images."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(p["variant"] for p in points):
        mine = [p for p in points if p["variant"] == variant]
        ax.plot([p["images"] for p in mine], [100 * p["teacher_contribution"] for p in mine], marker="o",
                label=f"{variant} ({', '.join(dict.fromkeys(p['by'] for p in mine))})")
    ax.axhline(0, color="black", lw=0.8)
    sizes = sorted({p["images"] for p in points})
    _log_x(ax, sizes, [f"{n:,}" for n in sizes])
    ax.set_xlabel("the student's training images")
    ax.set_ylabel(f"robust accuracy minus STUDENT/{twin}'s (points)")
    _save(plt, fig, ax, path, legend=7)
