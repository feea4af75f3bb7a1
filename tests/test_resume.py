"""Checkpoint and resume: a run killed mid-epoch and resumed ends with the weights of one never stopped."""

import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from .conftest import ROOT, run_recipe

TINY = ["recipes/rrm.py", "--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)",
        "--train-split", "train[:2048]", "--batch-size", "128", "--max-steps", "20", "--save-every", "2",
        "--epoch-eval-examples", "0", "--eval-examples", "16", "--sweep-examples", "16", "--eval-steps", "2",
        "--no-checks"]


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process, folder, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir()):
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint appeared in {folder}: {process.communicate()[1][-2000:]}")


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    whole = run_recipe([*TINY, "--output-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    process = start([*TINY, "--output-dir", str(out)])
    wait_for_checkpoint(process, out / "checkpoints")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (out / "model.safetensors").exists()
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 16  # stopped mid-epoch (an epoch has 16 steps)

    resumed = run_recipe([*TINY, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'checkpoints'}" in resumed.stdout
    expected, got = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:  # on CPU the resumed run repeats the same arithmetic: exactly equal
        assert (expected[name] == got[name]).all(), name
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000018", "step-00000020"]  # --keep-checkpoints 2, no partial folder left
