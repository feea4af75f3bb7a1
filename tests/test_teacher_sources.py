"""Robust teachers in the layouts they really have: MadryLab `robustness` files, pytorch_model.bin-only repos, bare
state dicts, CLIP encoders (transformers and open_clip) and RobustBench's model_dir, all planted offline."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from rrm_hub import FeatureTap, RRMError, default_layer, load_teacher

from .conftest import put_in_hub_cache
from .test_teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_RESNET,
    _normalize,
    _recipe_main,
    _RunsCode,
    _timm_reference,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_HOME = os.environ["HF_HOME"]


def _one_line_error(match, *args, **kwargs):
    with pytest.raises(RRMError, match=match) as info:
        load_teacher(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- MadryLab `robustness` checkpoints as `robustness.train` saves them (madrylab/robust-imagenet-models)

class _InputNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean)[..., None, None])
        self.register_buffer("new_std", torch.tensor(std)[..., None, None])


class _Attacker(nn.Module):
    def __init__(self, model, normalizer):
        super().__init__()
        self.model, self.normalizer = model, normalizer


class _AttackerModel(nn.Module):
    """`robustness.attacker.AttackerModel`: the model, its normalizer and an attacker holding both again."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalizer = _InputNormalize(mean, std)
        self.model = model
        self.attacker = _Attacker(model, self.normalizer)


def _robustness_file(model, extra=None):
    """{'model', 'optimizer', 'schedule', 'epoch', 'amp', 'nat_prec1', 'adv_prec1'} of a DataParallel AttackerModel."""
    wrapped = nn.DataParallel(_AttackerModel(model, IMAGENET_MEAN, IMAGENET_STD))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    wrapped.module.model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state, as after training
    model.zero_grad(set_to_none=True)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    return {"model": wrapped.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "epoch": 90, "amp": None, "nat_prec1": torch.tensor(57.9), "adv_prec1": torch.tensor(35.2),
            **(extra or {})}


@pytest.fixture(scope="module")
def madrylab(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    repo = tmp_path_factory.mktemp("madrylab") / "repo"
    repo.mkdir()
    checkpoint = _robustness_file(model)
    keys = checkpoint["model"].keys()
    assert {"module.normalizer.new_mean", "module.attacker.normalizer.new_std", "module.model.fc.weight",
            "module.attacker.model.fc.weight"} <= keys
    torch.save(checkpoint, repo / "resnet18_l2_eps3.ckpt")
    put_in_hub_cache(repo, "madrylab-real/robust-imagenet-models", HF_HOME)
    return model, repo


@torch.no_grad()
def test_madrylab_file_in_its_real_layout(madrylab):
    model, _ = madrylab
    spec = "hf://madrylab-real/robust-imagenet-models/resnet18_l2_eps3.ckpt"
    teacher = load_teacher(spec)
    assert teacher.num_classes == 1000 and teacher.preprocess.input_size == (3, 224, 224)
    assert torch.allclose(teacher.preprocess.mean.flatten(), torch.tensor(IMAGENET_MEAN))  # from the file
    assert torch.allclose(teacher.preprocess.std.flatten(), torch.tensor(IMAGENET_STD))
    pixels = torch.rand(2, 3, 224, 224)
    assert torch.allclose(teacher(pixels), model(_normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)), atol=1e-4)
    assert default_layer(teacher.network) == "fc@input"
    assert not any("attacker" in k or "normalizer" in k for k in teacher.network.state_dict())


@pytest.mark.slow
def test_madrylab_file_that_runs_code_is_refused_and_the_recipe_converts_a_trusted_one(madrylab, tmp_path):
    model, repo = madrylab
    marker = tmp_path / "pwned"
    evil = tmp_path / "resnet18_linf_eps4.ckpt"  # older files: a pickled object beside the weights
    torch.save(_robustness_file(model, {"schedule": _RunsCode(marker)}), evil)
    message = _one_line_error("never unpickles untrusted files", str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()

    # the conversion recipe the refusal gives, run where the file is trusted (here: the real-layout one)
    command = re.search(r'python -c "(.*)" and pass', message).group(1)
    command = command.replace("resnet18_linf_eps4", "resnet18_l2_eps3")
    subprocess.run([sys.executable, "-c", command], cwd=repo, check=True)
    converted = load_file(str(repo / "resnet18_l2_eps3.safetensors"))
    assert not any("attacker" in k for k in converted) and "module.normalizer.new_mean" in converted
    pixels = torch.rand(1, 3, 64, 64)
    assert torch.equal(load_teacher(str(repo / "resnet18_l2_eps3.safetensors"))(pixels),
                       load_teacher(str(repo / "resnet18_l2_eps3.ckpt"))(pixels))


# ---- pytorch_model.bin-only repos and bare state dicts, read weights-only

@pytest.fixture(scope="module")
def tiny_resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=7, **TINY_RESNET).eval()


@torch.no_grad()
def test_timm_repo_with_only_pytorch_model_bin(tiny_resnet, tmp_path):
    timm.models.save_for_hf(tiny_resnet, str(tmp_path), model_args=TINY_RESNET, safe_serialization=False)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "pytorch_model.bin"}
    put_in_hub_cache(tmp_path, "someone/old-timm-resnet", HF_HOME)
    teacher = load_teacher("someone/old-timm-resnet")
    pixels = torch.rand(2, 3, 224, 224)
    assert teacher.num_classes == 7 and torch.allclose(teacher(pixels), _timm_reference(tiny_resnet, pixels), atol=1e-5)


def test_pickled_pytorch_model_bin_is_refused_without_running(tiny_resnet, tmp_path):
    marker = tmp_path / "pwned"
    timm.models.save_for_hf(tiny_resnet, str(tmp_path / "repo"), model_args=TINY_RESNET, safe_serialization=False)
    torch.save({**tiny_resnet.state_dict(), "x": _RunsCode(marker)}, tmp_path / "repo" / "pytorch_model.bin")
    _one_line_error("never unpickles untrusted files", str(tmp_path / "repo"))
    assert not marker.exists()


@torch.no_grad()
def test_transformers_classifier_with_only_pytorch_model_bin(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()  # as repos saved before safetensors
    put_in_hub_cache(tmp_path, "someone/old-vit", HF_HOME)
    pixels = torch.rand(2, 3, 32, 32)
    teacher = load_teacher("someone/old-vit")
    assert torch.allclose(teacher(pixels), model(pixel_values=_normalize(pixels, [0.5] * 3, [0.5] * 3)).logits,
                          atol=1e-5)


@torch.no_grad()
def test_bare_state_dict_with_a_dataparallel_prefix(tiny_resnet, tmp_path):
    """As poloclub/robust-principles: a .pt holding the state dict alone, saved from DataParallel."""
    torch.save({f"module.{k}": v for k, v in tiny_resnet.state_dict().items()}, tmp_path / "ra_resnet18_at.pt")
    put_in_hub_cache(tmp_path, "someone/robust-principles", HF_HOME)
    teacher = load_teacher("hf://someone/robust-principles/ra_resnet18_at.pt", arch="timm:resnet18",
                           model_args=TINY_RESNET)
    pixels = torch.rand(2, 3, 224, 224)
    assert teacher.num_classes == 7 and torch.allclose(teacher(pixels), _timm_reference(tiny_resnet, pixels), atol=1e-5)


# ---- representation-only teachers: CLIP image encoders

def _tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                   "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                      vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 12},
                      projection_dim=12)


def _tensor(features):
    """`get_image_features`' result: a tensor (transformers 4), or an output whose pooler_output it is (5)."""
    return features if torch.is_tensor(features) else features.pooler_output


@pytest.fixture(scope="module")
def clip_repos(tmp_path_factory):
    """Hub id -> (model, its image embedding of normalized pixels) for each transformers CLIP class."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    full = CLIPModel(_tiny_clip_config()).eval()
    repos = {}
    folder = tmp_path_factory.mktemp("clip") / "full"  # as LEAF-CLIP/CLIP-ViT-L-FARE2: safetensors + processor
    full.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    repos["someone/tiny-fare-clip"] = full, lambda x: _tensor(full.get_image_features(pixel_values=x))
    put_in_hub_cache(folder, "someone/tiny-fare-clip", HF_HOME)
    for cls, embed in ((CLIPVisionModelWithProjection, lambda m: lambda x: m(pixel_values=x).image_embeds),
                       (CLIPVisionModel, lambda m: lambda x: m(pixel_values=x).pooler_output)):
        model = cls(_tiny_clip_config().vision_config).eval()
        folder = tmp_path_factory.mktemp("clip") / cls.__name__  # no preprocessor_config.json: CLIP's defaults
        model.save_pretrained(folder)
        repo_id = f"someone/tiny-{cls.__name__.lower()}"
        put_in_hub_cache(folder, repo_id, HF_HOME)
        repos[repo_id] = model, embed(model)
    return repos


@torch.no_grad()
def test_clip_encoders_are_representation_teachers(clip_repos):
    for repo_id, (_, embed) in clip_repos.items():
        teacher = load_teacher(repo_id)
        assert teacher.num_classes == 0 and teacher.label_names == []
        assert teacher.preprocess.input_size == (3, 32, 32) and teacher.preprocess.interpolation == "bicubic"
        assert torch.allclose(teacher.preprocess.mean.flatten(), torch.tensor(CLIP_MEAN))
        pixels = torch.rand(2, 3, 32, 32)
        reference = embed(_normalize(pixels, CLIP_MEAN, CLIP_STD))
        with FeatureTap(teacher.network) as tap:
            assert torch.allclose(teacher(pixels), reference, atol=1e-5)
            assert torch.allclose(tap.pop(), reference, atol=1e-5)  # the default layer is the embedding
        layer = "vision_model.post_layernorm" if "visionmodel" in repo_id and "projection" not in repo_id \
            else "visual_projection"
        assert default_layer(teacher.network) == layer
        assert not any(k.startswith("text") for k in teacher.network.state_dict())  # the image tower only


def _open_clip_repo(folder, safetensors=False):
    """A tiny open_clip model saved as open_clip's push_to_hf_hub does (as chs20/fare2-clip)."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is an optional extra (pip install 'rrm-hub[clip]')")
    model_cfg = {"embed_dim": 12, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**model_cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}))
    if safetensors:
        from safetensors.torch import save_file

        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "README.md").write_text("---\nlibrary_name: open_clip\n---\n")
    return model


@pytest.fixture(scope="module")
def open_clip_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip") / "fare"
    model = _open_clip_repo(folder)
    put_in_hub_cache(folder, "someone/tiny-fare2-clip", HF_HOME)
    return model, folder


@pytest.mark.parametrize("safetensors", [False, True])
@torch.no_grad()
def test_open_clip_repo_is_a_representation_teacher(open_clip_repo, tmp_path, safetensors):
    import open_clip

    model, folder = open_clip_repo
    if safetensors:
        folder = tmp_path / "st"
        model = _open_clip_repo(folder, safetensors=True)
    teacher = load_teacher("someone/tiny-fare2-clip" if not safetensors else str(folder))
    assert teacher.num_classes == 0 and teacher.preprocess.input_size == (3, 32, 32)
    assert default_layer(teacher.network) == "visual"
    pixels = torch.rand(2, 3, 32, 32)
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")  # open_clip's own loader
    expected = reference.eval().encode_image(_normalize(pixels, CLIP_MEAN, CLIP_STD))
    assert torch.allclose(teacher(pixels), expected, atol=1e-5)
    assert torch.allclose(expected, model.encode_image(_normalize(pixels, CLIP_MEAN, CLIP_STD)), atol=1e-5)


def test_open_clip_missing_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8, "vision_cfg": {}}}))
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    _one_line_error(r"install it with: pip install --no-deps open-clip-torch", str(tmp_path))


RRM_ARGS = ["--max-steps", "2", "--batch-size", "8", "--epoch-eval-examples", "0", "--eval-examples", "16",
            "--sweep-examples", "16", "--eval-steps", "1", "--student", "vit_tiny_patch16_224", "--student-kwargs",
            "img_size=28", "patch_size=7", "depth=2", "embed_dim=24", "num_heads=2"]


@pytest.mark.slow
def test_rrm_with_an_open_clip_teacher_needs_no_label_flag(open_clip_repo, tmp_path):
    metrics = _recipe_main(["--teacher", "someone/tiny-fare2-clip", "--match",
                            "visual.transformer.resblocks.1:blocks.1", "--match", "visual:penultimate",
                            "--output-dir", str(tmp_path / "a"), *RRM_ARGS])
    assert metrics["teacher_layer"] == "visual.transformer.resblocks.1, visual" and metrics["feature_dim"] == 12
    assert metrics["teacher_clean_accuracy"] is None and metrics["steps"] == 2  # no classes: the teacher is not scored
    assert metrics["pairs"][0]["teacher_shape"][-1] == 16


def test_clip_teacher_layers_are_listed_and_have_no_logits(clip_repos, tmp_path, capsys):
    _recipe_main(["--teacher", "someone/tiny-fare-clip", "--list-layers", "--output-dir", str(tmp_path / "b"),
                  *RRM_ARGS])
    listed = capsys.readouterr().out
    assert re.search(r"vision_model\.encoder\.layers\.1\s+CLIPEncoderLayer\s+\(2, 17, 16\)", listed)
    assert re.search(r"visual_projection\s+Linear\s+\(2, 12\)", listed)
    with pytest.raises(SystemExit):
        _recipe_main(["--teacher", "someone/tiny-fare-clip", "--kd-weight", "1", *RRM_ARGS])
    assert "no logits to distill" in capsys.readouterr().err


# ---- RobustBench: its model_dir layout inside rrm-hub's cache

def _robustbench():
    if importlib.util.find_spec("robustbench") is None:  # importing it needs rrm-hub's shims
        pytest.skip("robustbench is optional (pip install --no-deps robustbench==1.1.1 ...)")
    from rrm_hub.teachers.robustbench import import_robustbench, model_dir

    return import_robustbench(), model_dir()


@pytest.mark.parametrize("layout", ["state_dict", "bare"])
@torch.no_grad()
def test_robustbench_checkpoint_in_its_model_dir_offline(layout):
    had_autoattack = importlib.util.find_spec("autoattack") is not None
    utils, model_dir = _robustbench()
    torch.manual_seed(0)
    zoo = utils.all_models[utils.BenchmarkDataset("cifar10")][utils.ThreatModel("Linf")]
    reference = zoo["Wong2020Fast"]["model"]()
    weights = {f"module.{k}": v for k, v in reference.state_dict().items() if k not in ("mu", "sigma")}
    path = model_dir / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": weights, "epoch": 15} if layout == "state_dict" else weights, path)
    for spec in ("robustbench:Wong2020Fast", "robustbench:cifar10/Linf/Wong2020Fast"):
        teacher = load_teacher(spec)
        assert teacher.source == "robustbench:cifar10/Linf/Wong2020Fast" and teacher.num_classes == 10
        assert teacher.preprocess.input_size == (3, 32, 32) and teacher.label_names[0] == "airplane"
        pixels = torch.rand(2, 3, 32, 32)
        assert torch.allclose(teacher(pixels), reference.eval()(pixels), atol=1e-5)
        assert default_layer(teacher.network) == "linear@input"
    # the shim is undone: `autoattack` is importable afterwards exactly when it was before
    assert "autoattack" not in sys.modules or had_autoattack
    assert (importlib.util.find_spec("autoattack") is not None) == had_autoattack


def test_robustbench_pickle_that_runs_code_is_refused_without_running(tmp_path):
    _, model_dir = _robustbench()
    marker = tmp_path / "pwned"
    path = model_dir / "cifar10" / "L2" / "Engstrom2019Robustness.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "args": _RunsCode(marker)}, path)
    _one_line_error("never unpickles untrusted files", "robustbench:cifar10/L2/Engstrom2019Robustness")
    assert not marker.exists()


@pytest.mark.parametrize("spec,message", [
    ("robustbench:cifar10/Linf/Standard", "not in the cache .*HF_HUB_OFFLINE is set"),
    ("robustbench:Wong2020Fats", "no model 'Wong2020Fats' \\(near: Wong2020Fast"),
    ("robustbench:imagenet/L2/Standard_R50", "no threat model 'L2'"),
    ("robustbench:cifar10/Linf", "is not robustbench:<name> or"),
])
def test_robustbench_errors_are_one_line(spec, message):
    _robustbench()
    _one_line_error(message, spec)


def test_robustbench_missing_says_how_to_install(monkeypatch):
    for name in ("robustbench", "robustbench.utils"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    message = _one_line_error("install it with: pip install --no-deps robustbench==1.1.1", "robustbench:Wong2020Fast")
    assert "keeps rrm-hub's timm" in message
