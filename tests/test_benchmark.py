import json

import pytest
import torch

from rrm_hub import RRMStudent
from rrm_hub.methods.registry import make_objective
from rrm_hub.runs.benchmark import time_to_target
from rrm_hub.training.costs import step_memory

from .conftest import TEACHER_WIDTH
from .test_hub import _recipe


def test_time_to_target_is_the_first_crossing():
    curve = [{"seconds": 1.0, "robust": 0.1}, {"seconds": 2.0, "robust": 0.5}, {"seconds": 3.0, "robust": 0.4}]
    assert time_to_target(curve, 0.45) == 2.0
    assert time_to_target(curve, 0.6) is None


def test_rrm_step_keeps_the_memory_of_a_natural_step(teacher):
    """The teacher runs without a graph, so an RRM step saves no more activations than a natural one."""
    student = RRMStudent.for_teacher("vit_tiny_patch16_224", feature_dim=TEACHER_WIDTH, num_classes=10,
                                     input_size=(1, 28, 28),
                                     model_args={"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 48,
                                                 "num_heads": 2})
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    natural = step_memory(student, make_objective("natural", eps=0.3, norm="linf"), x, y)
    rrm = step_memory(student, make_objective("rrm", eps=0.3, norm="linf", teacher=teacher), x, y)
    pgd_at = step_memory(student, make_objective("pgd_at", eps=0.3, norm="linf", attack_steps=3), x, y)
    assert natural["saved_activation_bytes"] > 0
    assert rrm["saved_activation_bytes"] <= 1.05 * natural["saved_activation_bytes"]
    assert pgd_at["saved_activation_bytes"] > 1.5 * natural["saved_activation_bytes"]  # the attack graphs count


@pytest.mark.slow
def test_benchmark_recipe_writes_stable_keys(tmp_path):
    report = _recipe("benchmark").main([
        "--methods", "natural", "pgd_at", "atta_at", "free_at", "rrm", "rrm_cached", "--epochs", "1", "--max-steps",
        "2",
        "--replays", "2", "--epoch-eval-examples", "32", "--eval-examples", "32", "--student", "resnet18",
        "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--target", "0", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["ratios"] == report["ratios"]
    assert saved["target"] == 0 and saved["methods"]["natural"]["time_to_target_seconds"] is not None  # reached at once
    for method in ("natural", "pgd_at", "atta_at", "free_at", "rrm"):
        entry = saved["methods"][method]
        for key in ("seconds_per_step", "time_to_target_seconds", "robust_accuracy", "clean_accuracy",
                    "step_cost_vs_natural", "saved_activation_bytes", "curve"):
            assert key in entry
        assert entry["steps"] == 2 and 0 <= entry["robust_accuracy"] <= 1
    assert saved["methods"]["natural"]["step_cost_vs_natural"] == 1.0
    # the cache needs unaugmented images: its cost is measured against natural training on those
    cached, reference = saved["methods"]["rrm_cached"], saved["methods"]["natural_pad0"]
    assert cached["pad"] == reference["pad"] == 0 and saved["methods"]["natural"]["pad"] == 2
    assert reference["step_cost_vs_natural"] == 1.0 and cached["cache_build_seconds"] > 0
    assert cached["total_seconds"] >= cached["cache_build_seconds"] and reference["steps"] == cached["steps"] == 2
    assert saved["ratios"]["rrm_cached_step_over_natural_step"] == cached["step_cost_vs_natural"]
    assert "| rrm |" in (tmp_path / "benchmark.md").read_text() and (tmp_path / "benchmark.png").exists()
    teacher_ratio = saved["teacher_forward_over_student_forward"]  # measured on this machine: a value, not a bound
    table = (tmp_path / "benchmark.md").read_text()
    assert teacher_ratio > 0 and f"costs {teacher_ratio:.2f} of the student's" in table


@pytest.mark.slow
def test_benchmark_rrm_with_a_cached_teacher_counts_the_cache(tmp_path):
    report = _recipe("benchmark").main([
        "--methods", "natural", "rrm", "--cache-teacher", "--pad", "0", "--epochs", "1", "--max-steps", "2",
        "--epoch-eval-examples", "16", "--eval-examples", "16", "--student", "resnet18", "--student-kwargs",
        "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--output-dir", str(tmp_path)])
    rrm = report["methods"]["rrm"]
    assert rrm["cache_build_seconds"] > 0 and rrm["total_seconds"] >= rrm["cache_build_seconds"]
    assert "cache_build_seconds" not in report["methods"]["natural"]
    # run again, as after a stop: the finished methods are read back, not retrained; other settings retrain
    args = ["--epochs", "1", "--max-steps", "2", "--epoch-eval-examples", "16", "--eval-examples", "16", "--student",
            "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--output-dir", str(tmp_path)]
    again = _recipe("benchmark").main(["--methods", "rrm", "natural", "--cache-teacher", "--pad", "0", *args])
    assert again["methods"]["rrm"] == report["methods"]["rrm"] and list(again["methods"]) == ["rrm", "natural"]
    other = _recipe("benchmark").main(["--methods", "natural", "--pad", "0", "--lr", "1e-4", *args])
    assert other["methods"]["natural"]["curve"] != report["methods"]["natural"]["curve"]
    saved = json.loads((tmp_path / "methods" / "natural.json").read_text())
    assert saved["settings"]["training"]["lr"] == 1e-4 and "methods" not in saved["settings"]


def test_unknown_method_is_refused():
    from rrm_hub import RRMError

    with pytest.raises(RRMError, match="unknown method 'sat'"):
        make_objective("sat", eps=0.3, norm="linf")
    with pytest.raises(RRMError, match="needs a teacher"):
        make_objective("rrm", eps=0.3, norm="linf")
    with pytest.raises(RRMError, match="needs a teacher cache"):
        make_objective("rrm_cached", eps=0.3, norm="linf", teacher=torch.nn.Linear(1, 1))
