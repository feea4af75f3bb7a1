"""Shared fixtures: an offline Hugging Face setup, a per-session cache, small models and data."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

# Offline, with a private rrm-hub cache and an empty Hugging Face home for each test session. Set before
# anything imports huggingface_hub, which reads these variables once, at import.
CACHES = Path(tempfile.mkdtemp(prefix="rrm-hub-tests-"))
atexit.register(shutil.rmtree, CACHES, ignore_errors=True)
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(CACHES / "hf_home"),
                   "RRM_HUB_CACHE": str(CACHES / "rrm_hub"), "TOKENIZERS_PARALLELISM": "false"})
os.environ.pop("HF_TOKEN", None)


@pytest.fixture(scope="session")
def mnist():
    from rrm_hub import load_image_data

    return load_image_data()


def _bundled_channels() -> list[int]:
    import json

    from rrm_hub.teachers.load import DEFAULT_TEACHER

    return json.loads((DEFAULT_TEACHER / "config.json").read_text())["model_args"]["channels"]


_CHANNELS = _bundled_channels()
TEACHER_WIDTH, LAYER2_WIDTH = _CHANNELS[-1], _CHANNELS[1]
"""The bundled teacher's representation width (what a student projects to) and its layer2's channels."""


@pytest.fixture(scope="session")
def teacher():
    from rrm_hub import load_teacher

    return load_teacher()


@pytest.fixture(scope="session")
def undefended(mnist):
    """A small CNN trained naturally for two epochs: accurate, and not robust."""
    from rrm_hub import make_loader
    from rrm_hub.methods import Natural

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 5, 2), nn.ReLU(), nn.Conv2d(16, 32, 5, 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 10))
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(2):
        for x, y in make_loader(mnist, "train", 64):
            loss, _ = Natural()(model, x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def put_in_hub_cache(folder: Path, repo_id: str, hf_home: Path, revision: str = "0" * 40) -> Path:
    """Lay `folder` out as `huggingface_hub` caches model `repo_id` (refs/main + snapshots/<revision>)."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def run_recipe(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a recipe in a fresh process (offline, our caches), capturing its output."""
    command = (launcher or [sys.executable]) + args
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_batch(n: int = 8, channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def load_recipe(script: str):
    """`recipes/<script>` imported as a module (registered in sys.modules: its dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{Path(script).stem}", ROOT / "recipes" / script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`run_recipe` without the fresh process: `args[0]`'s main(args[1:]) in this one, its stdout and stderr
    captured. For tests about what a recipe does, not about how a new process starts it."""
    import contextlib
    import io

    module = load_recipe(Path(args[0]).relative_to("recipes").as_posix())
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            module.main(list(args[1:]))
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def call_recipe(script: str, args: list[str]) -> tuple[int, str]:
    """Run `recipes/<script>`'s main(args) in this process; returns its exit code and what it wrote to stderr."""
    result = run_here([f"recipes/{script}", *args])
    return result.returncode, result.stderr
