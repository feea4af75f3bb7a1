"""Sharing: one saved folder loads three ways from the Hub cache (offline), with a card that holds the numbers."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModelForImageClassification

from rrm_hub import DEFAULT_TEACHER, RRMError, RRMStudent
from rrm_hub.hub.push import push_folder, upload_plan

from .conftest import load_recipe, put_in_hub_cache, run_here


def _recipe(name):
    return load_recipe(f"{name}.py")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A tiny student trained by recipes/rrm.py (in this process) and its output folder."""
    out = tmp_path_factory.mktemp("run") / "robust-vit"
    _recipe("rrm").main(["--max-steps", "4", "--epoch-eval-examples", "0", "--eval-examples", "48",
                         "--sweep-examples", "32", "--eval-steps", "2", "--hub-model-id", "user/robust-vit",
                         "--student-kwargs", "img_size=28", "patch_size=7", "depth=2", "embed_dim=48",
                         "num_heads=2", "--output-dir", str(out)])
    return out


@pytest.mark.slow
def test_loads_three_ways_from_the_hub_cache_with_the_same_logits(trained_folder, mnist):
    put_in_hub_cache(trained_folder, "user/robust-vit", os.environ["HF_HOME"])
    images = [mnist.test[i]["image"] for i in range(6)]
    pixels = torch.stack([torch.from_numpy(np.array(im)).float().div(255)[None] for im in images])

    student = RRMStudent.from_pretrained("user/robust-vit")
    with torch.no_grad():
        reference = student(pixels)

        model = timm.create_model("hf-hub:user/robust-vit", pretrained=True).eval()
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        timm_logits = model(torch.stack([transform(im) for im in images]))

        hf_model = AutoModelForImageClassification.from_pretrained("user/robust-vit").eval()
        processor = AutoImageProcessor.from_pretrained("user/robust-vit")
        hf_logits = hf_model(**processor(images, return_tensors="pt")).logits

    assert torch.allclose(timm_logits, reference, atol=1e-5)
    assert torch.allclose(hf_logits, reference, atol=1e-5)
    assert hf_model.config.id2label[3] == "3"


@pytest.mark.slow  # its fixture trains
def test_card_metadata_holds_the_measured_numbers(trained_folder):
    metrics = json.loads((trained_folder / "metrics.json").read_text())
    card = ModelCard.load(trained_folder / "README.md")
    assert card.data.library_name == "timm"
    assert {"adversarial-robustness", "image-classification", "timm"} <= set(card.data.tags)
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["clean accuracy"] == round(metrics["clean_accuracy"], 4)  # as measured, rounded
    assert values["pgd2 accuracy (linf, eps=0.3)"] == round(metrics["robust_accuracy"]["pgd2"], 4)
    assert card.data.model_name == "robust-vit"  # the --hub-model-id's name
    assert "github.com/rrm-hub" not in card.text and "(https://huggingface.co/user/robust-vit)" in card.text
    assert all("48 images" in r.dataset_split for r in card.data.eval_results)
    text = card.text
    assert "robustness.png" in text and 'RRMStudent.from_pretrained("user/robust-vit")' in text
    assert "recipes/rrm.py" in text and "--max-steps 4" in text  # the command that reproduces it


@pytest.mark.slow  # its fixture trains
def test_push_hands_over_the_folder_and_fails_cleanly_offline(trained_folder):
    assert upload_plan(trained_folder) == ["config.json", "model.safetensors", "rrm_head.safetensors",
                                           "README.md", "metrics.json", "robustness.png"]
    with pytest.raises(RRMError, match="cannot push while HF_HUB_OFFLINE=1"):
        push_folder(trained_folder, "user/robust-vit")
    result = run_here(["recipes/push.py", str(trained_folder), "--hub-model-id", "user/robust-vit", "--dry-run"])
    assert result.returncode == 0 and "model.safetensors" in result.stdout
    result = run_here(["recipes/push.py", str(trained_folder.parent), "--hub-model-id", "user/x"])
    assert result.returncode == 2 and "not a finished rrm-hub output folder" in result.stderr


def test_bundled_teacher_is_a_hub_repo_with_a_card():
    card = ModelCard.load(DEFAULT_TEACHER / "README.md")
    assert card.data.eval_results and "recipes/adversarial_train.py" in card.text
    assert upload_plan(DEFAULT_TEACHER)[:2] == ["config.json", "model.safetensors"]
    config = json.loads((DEFAULT_TEACHER / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {})


@pytest.mark.slow  # its fixture trains
def test_a_card_names_the_autoattack_package_and_its_checks(trained_folder):
    from rrm_hub import DistillConfig
    from rrm_hub.hub.cards import render_card

    metrics = json.loads((trained_folder / "metrics.json").read_text())
    metrics.update(suite="standard", attack_package="pyautoattack 0.2.0", attack_steps=None,
                   robust_accuracy={"apgd-ce": 0.46812, "square": 0.42217, "worst_case": 0.42217},
                   autoattack_checks=["it seems to be a randomized defense!"])
    context = {"dataset": "mnist-5k", "model_name": "x", "repo_id": "user/x", "config": DistillConfig()}
    card = render_card("student", metrics, context)
    assert "AutoAttack's standard version, run by the authors' code (pyautoattack 0.2.0)" in card.text
    assert "AutoAttack's own checks warned: it seems to be a randomized defense!" in card.text
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["robust accuracy, AutoAttack standard (pyautoattack 0.2.0) (linf, eps=0.3)"] == 0.4222
