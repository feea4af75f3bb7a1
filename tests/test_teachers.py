import json
import os
import pickle
import shlex

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from rrm_hub import (
    DEFAULT_TEACHER,
    FeatureTap,
    RRMError,
    RRMStudent,
    default_layer,
    evaluate,
    load_teacher,
    make_loader,
    pgd,
)

from .conftest import load_recipe, put_in_hub_cache, run_here


def test_bundled_teacher_is_frozen_and_robust(teacher, mnist):
    assert teacher.num_classes == 10 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in DEFAULT_TEACHER.iterdir()}
    result = evaluate(teacher, make_loader(mnist, "test", 200, limit=200), {"pgd20": pgd(0.3, steps=20)})
    assert result["clean_accuracy"] > 0.9
    assert result["robust_accuracy"]["pgd20"] > 0.5  # an undefended model is at ~0% here


def test_teacher_from_the_hub_cache_offline(tmp_path):
    put_in_hub_cache(DEFAULT_TEACHER, "someone/robust-mnist", os.environ["HF_HOME"])
    from_hub = load_teacher("someone/robust-mnist")
    assert from_hub.source == "someone/robust-mnist"
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(from_hub(x), load_teacher()(x))
    assert torch.allclose(load_teacher("hf-hub:someone/robust-mnist")(x), from_hub(x))


def test_a_student_can_teach(tmp_path):
    student = RRMStudent.for_teacher("resnet18", feature_dim=16, num_classes=10, input_size=(1, 28, 28),
                                     model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)})
    student.save_pretrained(tmp_path / "student")
    teacher = load_teacher(str(tmp_path / "student"))
    assert isinstance(teacher, RRMStudent) and all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("spec,message", [
    ("./no/such/folder", "not found: give an existing folder"),
    ("nobody/not-cached", "not in the local Hugging Face cache"),
])
def test_missing_teachers_are_one_line_errors(spec, message):
    with pytest.raises(RRMError, match=message) as info:
        load_teacher(spec)
    assert "\n" not in str(info.value)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architecture": "resnet18", "num_classes": 10}')
    with pytest.raises(RRMError, match="has no .safetensors or pytorch_model.bin weights"):
        load_teacher(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch.save file")
    with pytest.raises(RRMError, match="cannot read checkpoint"):
        load_teacher(str(tmp_path))


# ---- every shape a robust model takes on the Hub, built offline and laid out in the Hugging Face cache

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_RESNET = {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)}


def _normalize(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _tapped(teacher, pixels):
    """Logits and the features at the default layer (the classifier's input) of one forward pass."""
    with FeatureTap(teacher.network, default_layer(teacher.network)) as tap:
        return teacher(pixels), tap.pop()


def _recipe_main(argv):
    return load_recipe("rrm.py").main(argv)


def _run_rrm(teacher, out):
    # the teacher live: a cache would run a 224-px teacher over all 4,000 training digits first (most of a minute)
    return _recipe_main(["--teacher", teacher, "--ignore-teacher-labels", "--max-steps", "2", "--batch-size", "8",
                         "--epoch-eval-examples", "0", "--eval-examples", "16", "--sweep-examples", "16",
                         "--eval-steps", "1", "--no-cache-teacher", "--student", "resnet18", "--student-kwargs",
                         "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--output-dir", str(out)])


# timm: a Hub repo written by timm's own export, and bare weights for a named architecture

@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=7, **TINY_RESNET).eval()
    folder = tmp_path_factory.mktemp("timm") / "repo"
    timm.models.save_for_hf(model, str(folder), model_args=TINY_RESNET, safe_serialization=True)
    put_in_hub_cache(folder, "timm/tiny_resnet.rrm_test", os.environ["HF_HOME"])
    weights = tmp_path_factory.mktemp("timm-weights")
    save_file(model.state_dict(), str(weights / "tiny_resnet18_at.safetensors"))
    put_in_hub_cache(weights, "someone/tiny-timm-weights", os.environ["HF_HOME"])
    torch.save({"state_dict": model.state_dict(), "epoch": 9}, weights / "tiny_resnet18_at.pth")
    return model, weights


def _timm_reference(model, pixels):
    config = timm.data.resolve_data_config({}, model=model)
    return model(_normalize(pixels, config["mean"], config["std"]))


@torch.no_grad()
def test_timm_hub_repo_by_id(tiny_timm):
    model, _ = tiny_timm
    teacher = load_teacher("timm/tiny_resnet.rrm_test")
    assert teacher.source == "timm/tiny_resnet.rrm_test" and teacher.num_classes == 7 and not teacher.training
    assert isinstance(teacher.network, timm.models.ResNet)
    pixels = torch.rand(2, 3, 224, 224)
    logits, features = _tapped(teacher, pixels)
    assert torch.allclose(logits, _timm_reference(model, pixels), atol=1e-5)
    config = timm.data.resolve_data_config({}, model=model)
    reference = model.forward_head(model.forward_features(_normalize(pixels, config["mean"], config["std"])),
                                   pre_logits=True)
    assert torch.allclose(features, reference, atol=1e-5)
    for spec in ("hf-hub:timm/tiny_resnet.rrm_test", "hf://timm/tiny_resnet.rrm_test"):
        assert torch.allclose(load_teacher(spec)(pixels), logits)


@pytest.mark.parametrize("how", ["hub-safetensors", "local-pth"])
@torch.no_grad()
def test_timm_architecture_with_a_checkpoint(tiny_timm, how):
    model, weights = tiny_timm
    if how == "hub-safetensors":  # the architecture as spec, the classes from the classifier's weight
        teacher = load_teacher("resnet18", checkpoint="hf://someone/tiny-timm-weights/tiny_resnet18_at.safetensors",
                               model_args=TINY_RESNET)
    else:  # the file as spec, the architecture guessed from its name
        teacher = load_teacher(str(weights / "tiny_resnet18_at.pth"), model_args=TINY_RESNET, num_classes=7)
    assert teacher.num_classes == 7 and all(not p.requires_grad for p in teacher.parameters())
    pixels = torch.rand(2, 3, 224, 224)
    assert torch.allclose(teacher(pixels), _timm_reference(model, pixels), atol=1e-5)


# transformers: image classifiers with their image processors

def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=5, id2label=dict(enumerate("abcde")))
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3],
                                  image_std=[0.2, 0.25, 0.3])
    return ViTForImageClassification(config), processor, lambda m, x: m.vit(x).last_hidden_state[:, 0]


def _tiny_hf_resnet():
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
    processor = ConvNextImageProcessor(size={"shortest_edge": 40}, image_mean=[0.4, 0.5, 0.6], image_std=[0.3] * 3)
    return ResNetForImageClassification(config), processor, lambda m, x: m.resnet(x).pooler_output.flatten(1)


@pytest.fixture(scope="module")
def transformers_repos(tmp_path_factory):
    """name -> (Hub id, folder, model, image processor, the model's penultimate features)."""
    repos = {}
    for name, make in (("vit", _tiny_vit), ("resnet", _tiny_hf_resnet)):
        torch.manual_seed(0)
        model, processor, penultimate = make()
        folder = tmp_path_factory.mktemp("transformers") / name
        model.eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        repo_id = f"someone/tiny-{name}-classifier"
        put_in_hub_cache(folder, repo_id, os.environ["HF_HOME"])
        repos[name] = repo_id, folder, model, processor, penultimate
    return repos


@pytest.mark.parametrize("name", ["vit", "resnet"])
@torch.no_grad()
def test_transformers_classifier_by_hub_id_and_folder(transformers_repos, name):
    repo_id, folder, model, processor, penultimate = transformers_repos[name]
    teacher = load_teacher(repo_id)
    size = teacher.preprocess.input_size[1:]
    assert teacher.source == repo_id and teacher.num_classes == model.config.num_labels
    assert teacher.label_names == [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert size == {"vit": (32, 32), "resnet": (40, 40)}[name]  # size, or shortest_edge (ConvNext crops to it)
    pixels = torch.rand(3, 3, *size)
    normalized = _normalize(pixels, processor.image_mean, processor.image_std)
    logits, features = _tapped(teacher, pixels)
    assert torch.allclose(logits, model(pixel_values=normalized).logits, atol=1e-5)
    assert torch.allclose(features, penultimate(model, normalized), atol=1e-5)
    assert torch.allclose(load_teacher(str(folder))(pixels), logits)


def test_transformers_logits_match_the_image_processor(transformers_repos):
    repo_id, _, model, processor, _ = transformers_repos["vit"]
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    pixels = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    with torch.no_grad():
        reference = model(**processor(images, return_tensors="pt")).logits
        assert torch.allclose(load_teacher(repo_id)(pixels), reference, atol=1e-5)


# MadryLab robustness checkpoints: module.model.* / module.normalizer.* / module.attacker.*

def _robustness_state(model, mean, std, prefix="module."):
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    state = {}
    for part in ("", "attacker."):
        state.update({f"{prefix}{part}model.{k}": v.clone() for k, v in model.state_dict().items()})
        state.update({f"{prefix}{part}normalizer.new_mean": mean, f"{prefix}{part}normalizer.new_std": std})
    return state


@pytest.fixture(scope="module")
def robust_checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().eval()
    folder = tmp_path_factory.mktemp("madry")
    hub = folder / "repo"
    hub.mkdir()
    torch.save({"model": _robustness_state(imagenet, IMAGENET_MEAN, IMAGENET_STD), "epoch": 3},
               hub / "resnet18_l2_eps3.ckpt")
    put_in_hub_cache(hub, "madrylab-test/robust-imagenet-models", os.environ["HF_HOME"])
    cifar = torchvision.models.resnet18(num_classes=10).eval()
    cifar_stats = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    local = folder / "resnet18_linf_eps8.pt"  # no DataParallel prefix, saved under 'state_dict'
    torch.save({"state_dict": _robustness_state(cifar, *cifar_stats, prefix=""), "epoch": 90}, local)
    return {"hf://madrylab-test/robust-imagenet-models/resnet18_l2_eps3.ckpt": (imagenet, IMAGENET_MEAN,
                                                                               IMAGENET_STD),
            str(local): (cifar, *cifar_stats)}


@pytest.mark.slow
@torch.no_grad()
def test_robustness_checkpoints_load_into_torchvision(robust_checkpoints):
    for spec, (model, mean, std) in robust_checkpoints.items():
        teacher = load_teacher(spec)
        assert teacher.source == spec and teacher.num_classes == model.fc.out_features
        assert teacher.preprocess.input_size == (3, 224, 224) and not teacher.training
        pixels = torch.rand(2, 3, 224, 224)
        logits, features = _tapped(teacher, pixels)
        normalized = _normalize(pixels, mean, std)
        assert torch.allclose(logits, model(normalized), atol=1e-4)
        trunk = torch.nn.Sequential(*list(model.children())[:-1])  # everything up to the average pool
        assert torch.allclose(features, trunk(normalized).flatten(1), atol=1e-5)
        assert default_layer(teacher.network) == "fc@input"
    imagenet = load_teacher(next(iter(robust_checkpoints)))
    assert imagenet.label_names[0].startswith("tench")


@pytest.mark.slow
def test_robustness_architecture_and_revision_can_be_named(robust_checkpoints):
    spec = next(iter(robust_checkpoints))
    pixels = torch.rand(1, 3, 64, 64)
    reference = load_teacher(spec)(pixels)
    revision = "0" * 40  # the commit put_in_hub_cache lays out
    for teacher in (load_teacher("resnet18", checkpoint=spec), load_teacher(checkpoint=spec),
                    load_teacher(spec, arch="torchvision:resnet18"),
                    load_teacher(spec, revision=revision),
                    load_teacher(spec.replace("-models/", f"-models@{revision}/"))):
        assert torch.equal(teacher(pixels), reference)


@torch.no_grad()
def test_robustness_checkpoint_converted_to_safetensors_as_the_error_says(robust_checkpoints, tmp_path):
    local = list(robust_checkpoints)[1]
    state = torch.load(local, weights_only=True)["state_dict"]  # what the refusal message has users run
    save_file({k: v for k, v in state.items() if "attacker" not in k}, str(tmp_path / "resnet18_linf_eps8.safetensors"))
    pixels = torch.rand(2, 3, 224, 224)
    converted = load_teacher(str(tmp_path / "resnet18_linf_eps8.safetensors"))
    assert torch.equal(converted(pixels), load_teacher(local)(pixels))


class _RunsCode:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet18_evil.ckpt"
    payload = {"model": {}, "epoch": 3, "args": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # torch's legacy format reads a plain pickle first
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(RRMError, match="never unpickles untrusted files") as info:
        load_teacher(str(path))
    assert not marker.exists()
    assert "\n" not in str(info.value) and "'resnet18_evil.safetensors'" in str(info.value)
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the payload is live: full unpickling does run it
    assert marker.exists()


# one-line errors that name the fix

def _folder(tmp_path, config, files=()):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in files:
        (tmp_path / name).write_bytes(b"not loaded")
    return str(tmp_path)


VIT_CONFIG = {"architectures": ["ViTForImageClassification"], "model_type": "vit"}


@pytest.mark.parametrize("make,kwargs,message", [
    (lambda t, c: _folder(t, {"name": "mystery"}), {}, "not a timm, transformers, CLIP or rrm-hub config"),
    (lambda t, c: str(t), {}, "has no config.json"),
    (lambda t, c: _folder(t, VIT_CONFIG, ["pytorch_model.bin"]), {}, "cannot read checkpoint"),
    (lambda t, c: _folder(t, {**VIT_CONFIG, "architectures": ["ViTModel"]}), {}, "not an image classifier"),
    (lambda t, c: _folder(t, {**VIT_CONFIG, "auto_map": {"AutoModelForImageClassification": "m.Net"}}), {},
     "trust_remote_code=True"),
    (lambda t, c: "./no/such/resnet50_l2_eps3.ckpt", {}, "checkpoint './no/such/resnet50_l2_eps3.ckpt' not found"),
    (lambda t, c: "hf://nobody/not-cached/resnet50_l2_eps3.ckpt", {}, "not in the local Hugging Face cache"),
    (lambda t, c: "resnet18", {}, "is an architecture name"),
    (lambda t, c: c, {"arch": "vgg16_bn"}, "does not fit torchvision 'vgg16_bn'"),
    (lambda t, c: c, {"arch": "resnet_xl"}, "torchvision has no architecture 'resnet_xl'"),
    (lambda t, c: c, {"arch": "keras:resnet18"}, "prefix must be one of timm, torchvision"),
    (lambda t, c: "someone/tiny-timm-weights", {"arch": "resnet18"}, "only apply to a weight file"),
])
@pytest.mark.slow
def test_teacher_errors_are_one_line(tmp_path, robust_checkpoints, make, kwargs, message):
    with pytest.raises(RRMError, match=message) as info:
        load_teacher(make(tmp_path, list(robust_checkpoints)[1]), **kwargs)
    assert "\n" not in str(info.value)


def test_weights_of_an_unnamed_architecture_are_refused(tmp_path, tiny_timm):
    save_file(tiny_timm[0].state_dict(), str(tmp_path / "weights.safetensors"))
    with pytest.raises(RRMError, match="cannot tell the timm architecture of 'weights.safetensors'"):
        load_teacher(str(tmp_path / "weights.safetensors"))
    with pytest.raises(RRMError, match=r"missing .*; unexpected"):
        load_teacher("resnet34", checkpoint=str(tmp_path / "weights.safetensors"))


# end to end: the RRM recipe with a teacher from each new source, by its Hub id

@pytest.mark.slow
def test_rrm_recipe_with_a_transformers_teacher(transformers_repos, tmp_path):
    repo_id = transformers_repos["vit"][0]
    metrics = _run_rrm(repo_id, tmp_path / "out")
    assert metrics["teacher"] == repo_id and metrics["steps"] == 2
    assert metrics["teacher_layer"] == "model.classifier@input" and metrics["feature_dim"] == 32
    assert RRMStudent.from_pretrained(str(tmp_path / "out")).config["rrm"]["teacher"] == repo_id


@pytest.mark.slow
def test_rrm_recipe_with_a_robustness_checkpoint(robust_checkpoints, tmp_path):
    spec = next(iter(robust_checkpoints))
    metrics = _run_rrm(spec, tmp_path / "out")
    assert metrics["teacher"] == spec and metrics["steps"] == 2
    assert metrics["teacher_layer"] == "fc@input" and metrics["feature_dim"] == 512


@pytest.mark.slow
def test_the_fashion_mnist_teacher_says_what_it_is_and_its_setups_run(tmp_path):
    """The bundled Fashion-MNIST teacher: its classes, the data and AutoAttack figure its card states, and the two
    setups that name it (recipes/configs/rrm-fashion-mnist*.yaml) taking a step on an IDX folder of the same shape
    (the real set is not needed)."""
    from rrm_hub.data.idx import FASHION
    from rrm_hub.teachers.load import BUNDLED

    from .test_idx import idx_folder

    teacher = load_teacher("default-fashion-mnist")
    assert teacher.label_names == FASHION and teacher(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    folder = BUNDLED["default-fashion-mnist"][0]
    card, metrics = (folder / "README.md").read_text(), json.loads((folder / "metrics.json").read_text())
    assert "- zalando-datasets/fashion_mnist" in card and metrics["suite"] == "standard" and metrics["eps"] == 0.1
    assert metrics["num_examples"] >= 1000 and f"value: {metrics['robust_accuracy']['worst_case']:.3g}" in card
    idx_folder(tmp_path / "clothes", n_train=16, n_test=8, size=28)
    # the few-labels setup takes 8 of the 16 images labelled, the other 8 unlabeled
    for setup, split in (("rrm-fashion-mnist.yaml", []), ("rrm-fashion-mnist-5k.yaml", []),
                         ("rrm-fashion-mnist-1k-unlabeled.yaml", ["--train-split", "train[:8]"])):
        out = tmp_path / setup
        result = run_here(["recipes/rrm.py", "--config", f"recipes/configs/{setup}", "--dataset",
                           str(tmp_path / "clothes"), *split, "--max-steps", "1", "--epoch-eval-examples", "0",
                           "--eval-examples", "8", "--sweep-examples", "8", "--no-checks", "--output-dir", str(out)])
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((out / "metrics.json").read_text())["teacher"] == BUNDLED["default-fashion-mnist"][1]
