"""The settings of the recipes that look at models rather than train them: `recipes/evaluate.py` (any model, any
dataset, any attack suite), `recipes/inheritance.py` (a student and its teacher) and `recipes/study.py` (many runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..attacks import Norm
from ..errors import RRMError
from ..evaluation.suites import SUITE_HELP, Suite, check_steps
from ..hub.cards import is_hub_id
from ..settings import section, setting
from .runs import RunConfig
from .sections import DataConfig, EvaluatedModel, TeacherConfig

DEFAULT_EPS = {"linf": 0.3, "l2": 2.0}
"""The usual MNIST threat models."""
EPS_RULE = "--eps must be > 0 and --eps-sweep values >= 0"
COUNT_RULE = "--batch-size, --n-examples, --steps and --restarts must be >= 1"


@dataclass
class EvaluateConfig(RunConfig):
    """`recipes/evaluate.py`: the robustness of any model `load_teacher` loads, on any dataset."""

    model: EvaluatedModel = section(lambda: EvaluatedModel(name=None))
    norm: Norm = setting("linf", "threat model")
    eps: float | None = setting(None, "attack budget in [0, 1] pixels (default: 0.3 for linf, 2.0 for l2; the "
                                "largest --eps-sweep value if that is given)", gt=0, error=EPS_RULE)
    eps_sweep: list[float] | None = setting(None, "also run the suite at these epsilons, for the accuracy-versus-"
                                            "epsilon curve", nargs="+", ge=0, error=EPS_RULE)
    suite: Suite = setting("pgd", SUITE_HELP)
    steps: int | None = setting(None, "iterations of PGD (--suite pgd; default 20)", ge=1, error=COUNT_RULE)
    restarts: int = setting(1, "random starts of PGD (--suite pgd); an image counts as robust only if every start "
                            "failed", ge=1, error=COUNT_RULE)
    no_checks: bool = setting(False, "skip the gradient-masking checks")
    n_examples: int | None = setting(None, "first N test images (default: all)", ge=1, error=COUNT_RULE)
    batch_size: int = setting(256, "per process", ge=1, error=COUNT_RULE)
    seed: int = setting(0, "seed of the random starts and of any split")
    output_dir: str = setting("evaluation", "output folder")
    push_results: bool = setting(False, "write the measured robustness into the model repo's card as model-index "
                                 "results (a pull request unless --no-pr)")
    no_pr: bool = setting(False, "with --push-results: commit to the repo itself (a repo you can write to)")
    dry_run: bool = setting(False, "with --push-results: print the card that would be written, push nothing")
    data: DataConfig = section(DataConfig)

    def check_rules(self) -> None:
        if self.resolved_eps <= 0:
            raise RRMError(EPS_RULE)
        check_steps(self.suite, self.steps, self.restarts)
        if (self.no_pr or self.dry_run) and not self.push_results:
            raise RRMError("--no-pr and --dry-run go with --push-results; add it or drop them")
        if self.push_results and not self.dry_run and not is_hub_id(self.model.name):
            raise RRMError("--push-results writes to a Hub repo: give --model as org/name, or add --dry-run")

    @property
    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return max(self.eps_sweep) if self.eps_sweep else DEFAULT_EPS[self.norm]


@dataclass
class Teacher(TeacherConfig):
    FLAGS: ClassVar[dict[str, str]] = {**TeacherConfig.FLAGS, "trust_remote_code": "--teacher-trust-remote-code"}


@dataclass
class InheritanceConfig(RunConfig):
    """`recipes/inheritance.py`: a student and its teacher, each attacked and judged on the other's attacks."""

    model: EvaluatedModel = section(lambda: EvaluatedModel(name="rrm-student"))
    teacher: Teacher = section(Teacher)
    norm: Norm = setting("linf", "threat model")
    eps: float = setting(0.3, "attack budget in [0, 1] pixels", gt=0)
    steps: int = setting(20, "PGD iterations", ge=1)
    n_examples: int = setting(500, "first N test images", ge=1)
    batch_size: int = setting(250, "images a batch", ge=1)
    seed: int = setting(0, "seed of PGD's random starts")
    output_dir: str = setting("inheritance", "output folder")
    data: DataConfig = section(DataConfig)


@dataclass
class StudyConfig(RunConfig):
    """`recipes/study.py`: variants of the recipes, each against its teacherless twin at equal compute."""

    variants: list[str] = setting(help="names from --list", nargs="*",
                                  factory=lambda: ["vit/clean", "vit/noise", "cnn/clean", "cnn/noise"])
    list_variants: bool = setting(False, "print the variants and their flags, then stop", flag="--list")
    extra: str = setting("", "flags added to every run, e.g. '--epochs 60 --batch-size 256'")
    jobs: int = setting(1, "runs at a time", ge=1)
    eps: float = setting(0.3, "attack budget of every run", ge=0)
    norm: Norm = setting("linf", "threat model of every run")
    teacher: str | None = setting(None, "teacher of the RRM / distillation runs (default: the recipe's; "
                                  "default-l2 for --norm l2)")
    seeds: list[int] = setting(help="each variant runs once per seed (at its best learning rate)", nargs="+",
                               factory=lambda: [0])
    seeded: list[str] | None = setting(None, "the variants that run at every --seeds (default: all; the others at "
                                       "the first seed only)", nargs="+")
    lrs: list[float] | None = setting(None, "learning rates: every variant runs at each (with the first seed) and "
                                      "is reported at its best (default: each variant's own)", nargs="+", gt=0)
    lengths: list[float] = setting(help="shares of --budget: every variant trains for each (with the first seed) and "
                                   "is reported at its best, so that a method that overfits with the whole budget "
                                   "(robust overfitting) is compared at its best length", nargs="+", gt=0, le=1,
                                   factory=lambda: [1.0])
    twin: str = setting("atta_at", "the teacherless baseline each variant is compared with (STUDENT/TWIN)")
    budget: float = setting(0.0, "compute of every run, in natural-step epochs: each trains budget / (its step cost "
                            "in natural steps, rrm_hub.methods.step_cost) epochs (0: the variants' own epochs)", ge=0)
    teacher_ratio: float | None = setting(None, "a teacher forward's cost relative to a student forward, in the step "
                                          "costs (default: measured once per student on this machine)", gt=0)
    eps_sweep: list[float] = setting(help="epsilons reported in the table (PGD-20)", nargs="+", ge=0,
                                     factory=lambda: [0.1, 0.2, 0.3])
    final_suite: Literal["none", "standard", "plus", "rand"] = setting(
        "none", "after screening: attack the runs of each variant's best learning rate with this AutoAttack version "
        "(recipes/evaluate.py)")
    final_examples: int = setting(1000, "test images of --final-suite", ge=1)
    final_variants: list[str] | None = setting(None, "the variants --final-suite attacks (default: all; the others "
                                               "are reported by their PGD-20 screening)", nargs="+")
    combine: list[str] | None = setting(None, "instead of running: read these studies' study.json (one per number of "
                                        "student images, --train-split train[:N]) and plot each variant's teacher "
                                        "contribution against the student's images (data-gap.json, data-gap.png)",
                                        nargs="+")
    output_dir: str = setting("study", "output folder")
