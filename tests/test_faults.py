"""Faults during training: each ends with one clear line, and nothing already saved is lost."""

import errno
import json
import os
import signal

import pytest
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from rrm_hub import RRMError, TrainConfig, train

from .conftest import call_recipe, run_recipe
from .test_resume import TINY, start, wait_for_checkpoint
from .test_train import _model, _problem


def test_a_nan_loss_stops_after_saving_the_last_good_state(tmp_path):
    calls = []

    def objective(model, x, y):
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return (loss * float("nan") if len(calls) == 4 else loss), {}

    model = _model()
    with pytest.raises(RRMError, match=r"loss became nan at step 3; the last good state is in .*step-00000003"):
        train(model, objective, _problem(), Accelerator(cpu=True), TrainConfig(epochs=2, output_dir=str(tmp_path)))
    saved = load_file(tmp_path / "checkpoints" / "step-00000003" / "model.safetensors")
    assert all((saved[name] == value).all() for name, value in model.state_dict().items())
    state = json.loads((tmp_path / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["step"] == 3 and state["batches"] == 3


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    save_state, calls = accelerator.save_state, []

    def fill_the_disk(folder):
        calls.append(folder)
        save_state(folder)  # writes its files, then the disk fills up
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", fill_the_disk)
    with pytest.raises(RRMError, match=r"step 4 .* \(the disk is full\): No space left on device; the checkpoint "
                       r".*step-00000002 is kept"):
        train(_model(), _natural, _problem(), accelerator,
              TrainConfig(epochs=1, output_dir=str(tmp_path), save_every=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def _natural(model, x, y):
    return F.cross_entropy(model(x), y), {}


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")  # blocks writes for root too, unlike chmod
    code, stderr = call_recipe("rrm.py", ["--output-dir", str(blocker / "out"), "--max-steps", "1"])
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: cannot write to the output folder '{blocker / 'out'}'")
    if os.geteuid() != 0:  # chmod does not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, stderr = call_recipe("rrm.py", ["--output-dir", str(locked / "out"), "--max-steps", "1"])
        assert code == 2 and "Permission denied" in stderr


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = [a if a != "40" else "400" for a in TINY]
    process = start([*args, "--output-dir", str(out)])
    wait_for_checkpoint(process, out / "checkpoints")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by Ctrl-C at step ") and line.endswith("with --resume"), line
    step = int(line.split("at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{step:08d}" / "trainer.json").exists()
    resumed = run_recipe([*args, "--max-steps", str(step + 2), "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0 and f"(step {step}," in resumed.stdout, resumed.stderr[-2000:]
