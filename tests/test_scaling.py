"""Scaling out: the accelerate configs in recipes/configs/accelerate/, and two CPU processes training as one."""

import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file

from .conftest import ROOT, run_here, run_recipe

CONFIGS = {"single_gpu": ("NO", False, False), "multi_gpu": ("MULTI_GPU", False, False),
           "fsdp": ("FSDP", True, False), "deepspeed_zero2": ("DEEPSPEED", False, True)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_config_is_accepted_by_accelerate_launch(name):
    path = ROOT / "recipes" / "configs" / "accelerate" / f"{name}.yaml"
    kind, fsdp, deepspeed = CONFIGS[name]
    assert load_config_from_file(str(path)).distributed_type == kind
    args = launch_command_parser().parse_args(["--config_file", str(path), "recipes/rrm.py"])
    args, _, _ = _validate_launch_command(args)  # what `accelerate launch --config_file` does first
    assert (args.use_fsdp, args.use_deepspeed, args.mixed_precision) == (fsdp, deepspeed, "bf16")
    if fsdp:  # the environment the launcher gives each process builds a valid FSDP plugin
        with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_the_teacher_is_never_prepared(monkeypatch, tmp_path):
    """Frozen teachers stay plain modules under DDP / FSDP / DeepSpeed: a run prepares only what it trains."""
    from accelerate import Accelerator
    from torch import nn

    from rrm_hub import DistillConfig, cli, distill

    prepared, original = [], Accelerator.prepare

    def recording(self, *objects, **kwargs):
        prepared.extend(obj for obj in objects if isinstance(obj, nn.Module))
        return original(self, *objects, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", recording)
    config = cli.parse(DistillConfig, ["--max-steps", "1", "--batch-size", "16", "--eval-examples", "16",
                                       "--eval-steps", "1", "--no-checks", "--output-dir", str(tmp_path / "out")])
    distill(config)
    assert prepared and all(any(p.requires_grad for p in module.parameters()) for module in prepared)


CPU_DDP = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# --match-on clean: no random noise, whose draws differ between one process and two; the ViT student has no
# batch norm, whose statistics would be per process
SHORT = ["recipes/rrm.py", "--max-steps", "4", "--match-on", "clean", "--epoch-eval-examples", "0",
         "--eval-examples", "16", "--sweep-examples", "16", "--eval-steps", "1", "--no-checks"]


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # real 2-process gloo DDP on CPUs
    two = run_recipe([*SHORT, "--batch-size", "16", "--output-dir", str(tmp_path / "two")], launcher=CPU_DDP)
    assert two.returncode == 0, two.stderr[-3000:]
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    one = run_here([*SHORT, "--batch-size", "32", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    metrics = {n: json.loads(Path(tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")}
    assert metrics["two"]["num_processes"] == 2 and metrics["one"]["num_processes"] == 1
    # the same examples and augmentation at each step (seeded sampler, sharded by batch), gradients averaged
    # over the processes: only the order of float sums differs
    for key in ("loss", "ce", "feat"):
        assert metrics["two"]["history"][0][key] == pytest.approx(metrics["one"]["history"][0][key], abs=1e-4)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_each_process_keeps_the_perturbations_of_every_process(monkeypatch):
    """--match-start previous under DDP: an image's next batch may fall to another process."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    result = run_recipe(["tests/memory_ranks.py"], launcher=CPU_DDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0: both" in result.stdout and "process 1: both" in result.stdout


def test_channels_last_trains_a_cnn_and_saves_it(tmp_path):
    import torch
    from accelerate import Accelerator
    from torch import nn

    from rrm_hub import TrainConfig, train

    from .test_faults import _natural
    from .test_train import _problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    run = train(model, _natural, _problem(), Accelerator(cpu=True),
                TrainConfig(epochs=2, lr=0.05, channels_last=True, output_dir=str(tmp_path)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    saved = load_file(tmp_path / "checkpoints" / "step-00000016" / "model.safetensors")
    assert torch.equal(saved["0.weight"], model[0].weight.detach().contiguous())


def test_channels_last_through_the_recipe(tmp_path):
    from .conftest import call_recipe
    from .test_bad_input import QUICK

    code, stderr = call_recipe("rrm.py", [*QUICK, "--channels-last", "--output-dir", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists(), stderr[-2000:]


def test_compile_asks_accelerate_for_inductor():
    """--compile hands the student to torch.compile through accelerate's dynamo backend. Not run end to end here:
    compiling even a tiny CNN on CPU took 75 s (measured), too slow for the suite."""
    from accelerate.state import AcceleratorState

    from rrm_hub import TrainConfig
    from rrm_hub.runs import builders

    for compile_, backend in ((True, "INDUCTOR"), (False, "NO")):
        AcceleratorState._reset_state()  # one Accelerator per process in a real run; this test makes two
        assert builders.make_accelerator(TrainConfig(compile=compile_)).state.dynamo_plugin.backend.name == backend
    AcceleratorState._reset_state()
