"""FSDP2 as recipes/configs/accelerate/fsdp.yaml launches it, on two CPU processes (gloo): the student is sharded,
the output folder is the one a single process writes, and --resume continues from a sharded checkpoint."""

import json
import os
import shutil
from unittest import mock

import datasets
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rrm_hub import RRMStudent

from .conftest import ROOT, run_here, run_recipe

CONFIG = ROOT / "recipes" / "configs" / "accelerate" / "fsdp.yaml"
# --match-on clean: no random noise, whose draws differ between one process and two (as in test_scaling.py)
FLAGS = ["--epochs", "2", "--match-on", "clean", "--epoch-eval-examples", "0", "--eval-examples", "16",
         "--sweep-examples", "16", "--eval-steps", "1", "--no-checks"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist):
    """Epoch 1 of 2 under FSDP (2 processes, --batch-size 16), then resumed to epoch 2; and the same epoch in one
    process (--batch-size 32). Each FSDP process records its prepared student (tests/fsdp_probe.py)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    digits = tmp / "digits"  # 160 training digits: 5 steps an epoch at 32 images a step
    datasets.DatasetDict({"train": mnist.train.select(range(160)), "test": mnist.test.select(range(32))}
                         ).save_to_disk(str(digits))
    text = CONFIG.read_text()
    assert "fsdp_min_num_params: 1000000" in text
    config = tmp / "fsdp.yaml"  # the tiny ViT student has 0.47M parameters: wrap its blocks and layers too
    config.write_text(text.replace("fsdp_min_num_params: 1000000", "fsdp_min_num_params: 1000"))
    launcher = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", str(config),
                "--num_processes", "2", "--mixed_precision", "no"]
    flags = [*FLAGS, "--dataset", str(digits)]
    result = {"tmp": tmp, "launcher": launcher}
    with mock.patch.dict(os.environ, {"ACCELERATE_USE_CPU": "true", "FSDP_PROBE": str(tmp / "probe-first")}):
        result["first"] = run_recipe(["tests/fsdp_probe.py", *flags, "--max-steps", "5", "--batch-size", "16",
                                      "--output-dir", str(tmp / "two")], launcher=launcher)
    assert result["first"].returncode == 0, result["first"].stderr[-3000:]
    shutil.copytree(tmp / "two", tmp / "resumed")
    with mock.patch.dict(os.environ, {"ACCELERATE_USE_CPU": "true", "FSDP_PROBE": str(tmp / "probe-resumed")}):
        result["resumed"] = run_recipe(["tests/fsdp_probe.py", *flags, "--batch-size", "16", "--output-dir",
                                        str(tmp / "resumed"), "--resume"], launcher=launcher)
    assert result["resumed"].returncode == 0, result["resumed"].stderr[-3000:]
    result["one"] = run_here(["recipes/rrm.py", *flags, "--max-steps", "5", "--batch-size", "32", "--output-dir",
                                str(tmp / "one")])
    assert result["one"].returncode == 0, result["one"].stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("run", ["first", "resumed"])
def test_the_student_is_sharded_over_the_two_processes(runs, run):
    records = [json.loads((runs["tmp"] / f"probe-{run}-{rank}.json").read_text()) for rank in (0, 1)]
    full = sum(p["full"] for p in records[0]["params"].values())
    assert full > 400_000  # the whole student, not a piece of it
    for rank, record in enumerate(records):
        assert (record["rank"], record["world"]) == (rank, 2) and record["class"] == "FSDPRRMStudent"
        assert all(p["placements"] == ["S(0)"] for p in record["params"].values())  # DTensors sharded on dim 0
        local = sum(p["local"] for p in record["params"].values())
        assert 0.45 < local / full < 0.55, (rank, local, full)
        # size-based wrapping made the transformer blocks FSDP units of their own, beside the root
        assert {"", "backbone.blocks.0", "backbone.blocks.3"} <= set(record["fsdp_units"])
    assert sum(p["local"] for r in records for p in r["params"].values()) == full  # the two shards make the whole


def _layout(path):
    with safe_open(str(path), "pt") as file:
        return {k: (tuple(file.get_slice(k).get_shape()), file.get_slice(k).get_dtype()) for k in file.keys()}


@pytest.mark.slow  # its fixture trains
def test_the_sharded_run_writes_what_one_process_writes(runs):
    two, one = runs["tmp"] / "two", runs["tmp"] / "one"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("model.safetensors", "rrm_head.safetensors"):
        assert _layout(two / name) == _layout(one / name), name
    metrics = {n: json.loads((runs["tmp"] / n / "metrics.json").read_text()) for n in ("one", "two")}
    assert metrics["two"]["num_processes"] == 2 and metrics["one"]["num_processes"] == 1
    # the same examples at each step, gradients reduce-scattered over the shards: the same training
    for key in ("loss", "ce", "feat"):
        assert metrics["two"]["history"][0][key] == pytest.approx(metrics["one"]["history"][0][key], abs=1e-4)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    student = RRMStudent.from_pretrained(two)
    plain = timm.create_model(f"local-dir:{two}", pretrained=True).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # the timm folder takes normalized pixels, with the head folded in
        assert torch.allclose(student(x), plain(student.preprocess(x)), atol=1e-4)


@pytest.mark.slow  # its fixture trains
def test_resume_continues_from_a_sharded_checkpoint(runs):
    out, first = runs["tmp"] / "resumed", runs["tmp"] / "two"
    assert f"resuming from {first.parent / 'resumed' / 'checkpoints' / 'step-00000005'} (step 5, epoch 2)" in \
        runs["resumed"].stdout
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == json.loads((first / "metrics.json").read_text())["history"][0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert json.loads((out / "checkpoints" / "step-00000010" / "trainer.json").read_text())["step"] == 10
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())
    before, after = load_file(first / "model.safetensors"), load_file(out / "model.safetensors")
    assert _layout(out / "model.safetensors") == _layout(first / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # epoch 2 trained on
    RRMStudent.from_pretrained(out)


@pytest.mark.slow
def test_a_nan_on_one_process_stops_both_and_keeps_the_last_good_shards(runs, tmp_path):
    """The finite-loss flag is agreed on the device by all processes, and read every READ_EVERY (16) steps."""
    out = tmp_path / "nan"
    with mock.patch.dict(os.environ, {"ACCELERATE_USE_CPU": "true"}):
        result = run_recipe(["tests/fsdp_nan.py", str(out)], launcher=runs["launcher"])
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"process {rank}: stopped after 16 calls, step 5 kept" in result.stdout, result.stdout[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]
