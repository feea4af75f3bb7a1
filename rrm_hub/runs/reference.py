"""The command-line reference (docs/cli.md), generated from the recipes' config dataclasses so that it cannot drift.

    python -m rrm_hub.runs.reference > docs/cli.md
"""

from __future__ import annotations

from pathlib import Path

from ..config import cli
from ..config.runs import AdversarialTrainConfig, DistillConfig
from ..config.tools import EvaluateConfig, InheritanceConfig, StudyConfig
from .benchmark import BenchmarkConfig

ROOT = Path(__file__).resolve().parents[2]


def recipe_configs() -> dict[str, type]:
    """recipe script -> its config dataclass."""
    return {"rrm.py": DistillConfig, "adversarial_train.py": AdversarialTrainConfig, "benchmark.py": BenchmarkConfig,
            "evaluate.py": EvaluateConfig, "study.py": StudyConfig, "inheritance.py": InheritanceConfig}


def _default(value) -> str:
    if value is None:
        return "-"
    return f"`{cli._shown(value) if value != [] else '[]'}`"


def recipe_table(script: str, cls: type) -> list[str]:
    config = cls()
    lines = [f"## `recipes/{script}`", "", (cls.__doc__ or "").strip().splitlines()[0], "",
             "| flag | YAML key | default | what |", "|---|---|---|---|"]
    for name, owner, field in cli.fields_of(config):
        key = f"{name}.{field.name}" if name else field.name
        help_text = field.metadata.get("help", "").replace("|", "\\|")
        choices = cli._argparse_options(owner, field).get("choices")
        if choices:
            help_text += f" (one of: {', '.join(str(c) for c in choices)})"
        lines.append(f"| `{cli.flag(owner, field)}` | `{key}` | {_default(getattr(owner, field.name))} | "
                     f"{help_text} |")
    return [*lines, ""]


def reference() -> str:
    lines = ["# Command-line reference", "",
             "Generated from the config dataclasses (`python -m rrm_hub.runs.reference > docs/cli.md`; the test suite "
             "checks that this page is current). Every flag is also a YAML key: `--config FILE.yaml` reads settings "
             "by section (`training: {epochs: 40}`), flags given after it override them, several files are laid "
             "over each other in order, and a file may start from another with `base: OTHER.yaml`. Every run writes "
             "its settings to `run_config.yaml` in its output folder; `--config OUTPUT/run_config.yaml` runs them "
             "again. A `-` default is resolved by the run (see the flag's text).", ""]
    for script, cls in recipe_configs().items():
        lines += recipe_table(script, cls)
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
