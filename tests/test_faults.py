"""Faults during training: each ends with one clear line, and nothing already saved is lost."""

import errno
import importlib
import json
import os
import re
import signal

import pytest
import torch
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


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = [a if a != "20" else "400" for a in TINY]
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


def _nan_at(call: int):
    """Cross-entropy whose loss is NaN at objective call `call` (0-based) and finite otherwise."""
    calls = []

    def objective(model, x, y):
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        return (loss * float("nan") if len(calls) == call + 1 else loss), {}

    return objective, calls


def _states_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("save_every,fused", [(None, True), (2, True), (None, False)])
def test_a_nan_between_reads_leaves_only_the_last_good_state(tmp_path, monkeypatch, save_every, fused):
    """The loss is read every READ_EVERY steps (and before each checkpoint), not at each step: steps after the NaN
    run with their updates skipped, and the checkpoint written is exactly the one of the step before the NaN.
    An optimizer that cannot skip a step on the device is read at each step instead."""
    loop = importlib.import_module("rrm_hub.training.loop")  # the module, which the package's `train` function hides
    if not fused:
        monkeypatch.setattr(loop, "make_optimizer", lambda model, config: torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False))
    objective, calls = _nan_at(5)  # step 5: not a multiple of READ_EVERY, nor of save_every
    model, out = _model(), tmp_path / "nan"
    config = TrainConfig(epochs=1, output_dir=str(out), save_every=save_every)
    with pytest.raises(RRMError) as raised:
        train(model, objective, _problem(256), Accelerator(cpu=True), config)
    message = str(raised.value)
    assert "\n" not in message and re.fullmatch(
        r"the loss became nan at step 5; the last good state is in .*step-00000005 \(--resume continues from it\); "
        r"lower --lr or use --mixed-precision no", message), message
    # read at the NaN (per step), at the next checkpoint, or after READ_EVERY steps
    assert len(calls) == (6 if save_every or not fused else loop.READ_EVERY)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == (["step-00000004", "step-00000005"] if save_every else ["step-00000005"])
    for name in kept:
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values()), name
    last = out / "checkpoints" / "step-00000005"
    assert all(torch.equal(load_file(last / "model.safetensors")[k], v) for k, v in model.state_dict().items())
    state = json.loads((last / "trainer.json").read_text())
    assert (state["step"], state["batches"], state["count"]) == (5, 5, 5)

    # the same files as a run that never saw a NaN, checkpointed at step 5: weights, optimizer and schedule
    clean = tmp_path / "clean"
    train(_model(), _natural, _problem(256), Accelerator(cpu=True),
          TrainConfig(epochs=1, output_dir=str(clean), save_every=5, keep_checkpoints=9))
    good = clean / "checkpoints" / "step-00000005"
    assert _states_equal(load_file(last / "model.safetensors"), load_file(good / "model.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin"):
        assert _states_equal(torch.load(last / name, weights_only=True), torch.load(good / name, weights_only=True))
    assert json.loads((good / "trainer.json").read_text())["sums"] == pytest.approx(state["sums"])


class _HostReads(torch.Tensor):
    """A loss that counts the host reads of itself and of every tensor computed from it."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                    torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs)


def test_the_loop_reads_the_loss_on_the_host_only_every_few_steps():
    from rrm_hub.training.loop import READ_EVERY

    def counted(model, x, y):
        loss = F.cross_entropy(model(x), y)
        return loss.as_subclass(_HostReads), {"ce": loss.detach().as_subclass(_HostReads)}

    _HostReads.reads = 0
    run = train(_model(), counted, _problem(512), Accelerator(cpu=True), TrainConfig(epochs=1))
    assert run["steps"] == 64 and run["history"][0]["loss"] > 0
    # steps 16, 32 and 48, then at the epoch end the guard, the means and the two sums (7); a read per step: 64+
    assert 0 < _HostReads.reads <= 64 // READ_EVERY + 3, _HostReads.reads


def test_a_full_disk_at_the_final_save_keeps_the_checkpoint(tmp_path, monkeypatch):
    from rrm_hub import RRMStudent

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RRMStudent, "save_pretrained", full)
    out = tmp_path / "out"
    code, stderr = call_recipe("rrm.py", [*TINY[1:], "--max-steps", "2", "--output-dir", str(out)])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1, stderr[-2000:]
    assert re.search(r"could not write the outputs to .* \(the disk is full\): No space left on device; the checkpoint "
                     r".*step-00000002 is kept: make room and run the same command with --resume", errors[0])
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").exists()
