"""The layout holds: subpackages in layers that import only downwards (import-linter's contract in pyproject.toml),
short modules, simple functions where the run is built and trained, and every subpackage installed."""

import ast
import shutil
import subprocess

import tomllib

from .conftest import ROOT

PACKAGE = ROOT / "rrm_hub"
MAX_LINES = 300
MAX_COMPLEXITY = 15


def test_the_layers_contract_is_kept():
    command = shutil.which("lint-imports") or "lint-imports"  # import-linter's command (the test extras)
    result = subprocess.run([command, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Contracts: 1 kept, 0 broken" in output, output[-3000:]


def test_every_subpackage_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_no_module_is_longer_than_300_lines():
    long = {str(path.relative_to(ROOT)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _complexity(paths):
    from radon.complexity import cc_visit

    return {f"{path.relative_to(ROOT)}:{block.name}": block.complexity for path in paths
            for block in cc_visit(path.read_text()) if block.complexity > MAX_COMPLEXITY}


def test_the_loop_and_the_builders_are_simple():
    paths = [*PACKAGE.glob("training/*.py"), *PACKAGE.glob("runs/builders*.py")]
    assert paths and not _complexity(paths)
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60
