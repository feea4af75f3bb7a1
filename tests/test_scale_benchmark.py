"""recipes/benchmark_scale.py: step costs at the student's own resolution and the loader's throughput."""

import json

from .conftest import run_here


def test_scale_benchmark_writes_its_keys(tmp_path):
    out = tmp_path / "benchmark-scale.json"
    result = run_here(["recipes/benchmark_scale.py", "--student", "test_vit", "--teacher-arch", "test_resnet",
                         "--batch-size", "4", "--steps", "1", "--warmup-steps", "0", "--photos", "12",
                         "--loader-batches", "1", "--num-workers", "1", "--output", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert set(summary["methods"]) == {"natural", "timm", "natural_pad0", "rrm_clean", "rrm", "rrm_cached"}
    for name, method in summary["methods"].items():
        assert method["seconds_per_step"] > 0 and 0 < method["flop_bound_vs_natural"] <= 1, name
        assert name == "timm" or method["saved_activation_bytes"] > 0, name  # the anchor is timm's own loop
    bounds = {name: method["flop_bound_vs_natural"] for name, method in summary["methods"].items()}
    assert bounds["natural"] == bounds["timm"] == bounds["rrm_cached"] == 1 and bounds["rrm"] < bounds["rrm_clean"] < 1
    assert summary["natural_over_timm"] > 0
    assert summary["methods"]["natural"]["step_cost_vs_natural"] == 1.0
    # the recipe's default matching runs the student twice: about twice the activations saved of natural training
    assert 1.5 < summary["methods"]["rrm"]["activation_memory_vs_natural"] < 2.5
    assert summary["image_size"] == [160, 160] and summary["loader_workers"] == 1
    assert summary["loader_images_per_second"] > 0 and summary["train_images_per_second"] > 0
    assert "| rrm_cached |" in result.stdout
