"""Checkpoint and resume: a run killed mid-epoch and resumed ends with the weights of one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
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


@pytest.mark.slow
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


def _train(out, **settings):
    import torch.nn.functional as F
    from accelerate import Accelerator

    from rrm_hub import TrainConfig, train

    from .test_train import _model, _problem

    def natural(model, x, y):
        return F.cross_entropy(model(x), y), {}

    config = TrainConfig(**{"epochs": 2, "output_dir": str(out), "save_every": 2, "keep_checkpoints": 2, **settings})
    return train(_model(), natural, _problem(), Accelerator(cpu=True), config)


def test_a_run_never_touches_another_runs_checkpoints(tmp_path):
    import pytest

    from rrm_hub import RRMError

    out = tmp_path / "run"
    _train(out, epochs=3)  # 24 steps: keeps step-22 and step-24
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert before == ["step-00000022", "step-00000024"]
    with pytest.raises(RRMError, match=r"holds checkpoints of an earlier run \(up to step-00000024\): add --resume to "
                                       r"continue it, --overwrite-output-dir to start over"):
        _train(out, epochs=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # untouched
    run = _train(out, epochs=1, overwrite_output_dir=True)  # 8 steps: the earlier run's go once this one saves
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    state = json.loads((out / "checkpoints" / "step-00000008" / "trainer.json").read_text())
    assert state["run_id"] == run["run_id"] and state["step"] == 8


def test_a_run_stopped_by_max_steps_resumes_to_more_steps(tmp_path):
    out = tmp_path / "run"
    first = _train(out, max_steps=3)
    assert first["steps"] == 3 and first["schedule_replanned"] == []
    state = json.loads((out / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert (state["epoch"], state["batches"], state["planned_steps"]) == (0, 3, 3)  # mid-epoch, not a finished one
    more = _train(out, max_steps=5, resume="auto")
    assert more["steps"] == 5 and more["run_id"] == first["run_id"]
    assert more["schedule_replanned"] == [{"at_step": 3, "from_steps": 3, "to_steps": 5}]
    assert [h["epoch"] for h in more["history"]] == [1]  # the epoch stopped at step 3 went on, one record
    whole = _train(tmp_path / "whole", max_steps=5)  # the same 5 steps in one go
    assert more["history"][0]["step"] == whole["history"][0]["step"] == 5


def test_a_random_state_that_cannot_be_loaded_safely_is_refused(tmp_path, capsys):
    import pickle

    import pytest

    from rrm_hub import RRMError

    from .test_teachers import _RunsCode

    out = tmp_path / "run"
    _train(out, max_steps=2)
    states = out / "checkpoints" / "step-00000002" / "random_states_0.pkl"
    marker = tmp_path / "ran"
    states.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(RRMError, match=r"random state .*random_states_0.pkl cannot be loaded safely .*delete that "
                                       r"file to resume without it"):
        _train(out, max_steps=4, resume="auto")
    assert not marker.exists()
    states.unlink()
    resumed = _train(out, max_steps=4, resume="auto")
    assert resumed["steps"] == 4 and "resuming without the random state" in capsys.readouterr().out


@pytest.mark.slow
def test_the_recipe_resumed_to_more_steps_trains_them_and_records_the_replan(tmp_path):
    from .conftest import run_here

    out = tmp_path / "run"
    first = run_here([*TINY[:TINY.index("--max-steps")], *TINY[TINY.index("--max-steps") + 2:], "--max-steps", "3",
                      "--output-dir", str(out)])
    assert first.returncode == 0, first.stderr[-2000:]
    more = run_here([*TINY[:TINY.index("--max-steps")], *TINY[TINY.index("--max-steps") + 2:], "--max-steps", "5",
                     "--resume", "--output-dir", str(out)])
    assert more.returncode == 0, more.stderr[-2000:]
    assert "the learning-rate schedule is re-planned for 5 steps (it was planned for 3)" in more.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["schedule_replanned"] == [{"at_step": 3, "from_steps": 3, "to_steps": 5}]
    again = run_here([*TINY[:TINY.index("--max-steps")], *TINY[TINY.index("--max-steps") + 2:], "--max-steps", "5",
                      "--output-dir", str(out)])  # a new run into the folder: refused, the checkpoints kept
    assert again.returncode == 2 and "holds checkpoints of an earlier run" in again.stderr
    assert (out / "checkpoints" / "step-00000005").exists()
