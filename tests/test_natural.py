"""Natural images at the student's own resolution: timm names, timm transforms, mixed photos, the users' command."""

import json
import os

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from rrm_hub import RRMError, RRMStudent, load_image_data, make_loader
from rrm_hub.config.runs import RRMConfig
from rrm_hub.config.sections import EvalConfig
from rrm_hub.methods.memory import PerturbationMemory
from rrm_hub.models.names import resolve, resolve_model_name
from rrm_hub.models.pixel import model_input
from rrm_hub.runs.builders import perturbation_memory
from rrm_hub.teachers.converters import resolve_architecture

from .conftest import ROOT, put_in_hub_cache, run_here, run_recipe


def _photo(kind: str, seed: int) -> Image.Image:
    """A photo-like image of a mode and size that real folders mix."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"rgb": (300, 220), "rgba": (180, 260), "palette": (250, 250), "gray": (200, 300)}
    width, height = sizes[kind]
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    if kind == "rgba":
        image = image.convert("RGBA")
    if kind == "palette":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
    if kind == "gray":
        image = image.convert("L")
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An imagefolder of two classes of photos of mixed sizes and modes (JPEG and PNG), train and test."""
    root = tmp_path_factory.mktemp("photos")
    seed = 0
    for split, count in (("train", 3), ("test", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                for kind in ("rgb", "rgba", "palette", "gray"):
                    seed += 1
                    suffix = "jpg" if kind in ("rgb", "gray") else "png"
                    _photo(kind, seed).save(folder / f"{kind}{i}.{suffix}")
    return root


def test_names_as_timm_users_type_them():
    picked = resolve("vit_small")
    assert picked.name == "vit_small_patch16_224" and "timm's vit_small_patch16_224" in picked.note
    assert resolve("vit_base").name == "vit_base_patch16_224"  # plain before clip / dinov2 variants
    assert resolve("vit_small.augreg_in21k_ft_in1k").name == "vit_small_patch16_224.augreg_in21k_ft_in1k"
    for exact in ("resnet50", "vit_small_patch16_224.augreg_in21k_ft_in1k", "hf-hub:timm/resnet18.a1_in1k"):
        assert resolve(exact).name == exact and resolve(exact).note is None
    lines = []
    assert resolve_model_name("deit_small", "--model", lines.append) == "deit_small_patch16_224"
    assert lines and lines[0].startswith("--model deit_small:")
    assert resolve_architecture("vit_small", "robust.pt", "timm") == ("timm", "vit_small_patch16_224")  # --teacher-arch
    with pytest.raises(RRMError, match=r"no model 'vit_smal' \(near: vit_small_patch16_224") as err:
        resolve("vit_smal")
    assert "\n" not in str(err.value)
    with pytest.raises(RRMError, match="near: .*convnext_tiny"):
        resolve("convnet_tiny")
    with pytest.raises(RRMError, match="no pretrained tag 'bogus' for vit_small_patch16_224 .*augreg_in1k"):
        resolve("vit_small_patch16_224.bogus")


@pytest.mark.slow
def test_photos_of_mixed_sizes_and_modes_are_cropped_as_timm_does(photos):
    student = model_input("vit_small_patch16_224")
    assert student.size == (224, 224) and student.crop_pct == 0.9
    data = load_image_data(str(photos), model_input=student)
    assert (data.augment, data.framing, data.image_mode, data.image_size) == ("timm", "crop", "RGB", (224, 224))
    assert data.crop_pct == 0.9 and data.interpolation == "bicubic"
    train = make_loader(data, "train", 24, augment=True, auto_augment="rand-m9-mstd0.5-inc1")
    x, y = next(iter(train))
    assert x.shape == (24, 3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert sorted(y.tolist()) == [0] * 12 + [1] * 12
    with pytest.raises(RRMError, match="timm does not know --auto-augment 'xyz'"):
        make_loader(data, "train", 4, augment=True, auto_augment="xyz")
    test = make_loader(data, "test", 8)
    first, second = next(iter(test))[0], next(iter(test))[0]
    assert torch.equal(first, second)  # evaluation views are fixed: resize by crop_pct, center crop
    # the evaluation view is timm's: shorter side to 224 / 0.9, then the center 224 x 224
    image = data.test[0][data.image_column].convert("RGB")
    eval_view = timm.data.create_transform((3, 224, 224), crop_pct=0.9, interpolation="bicubic", normalize=False)
    assert torch.allclose(first[0], eval_view(image).float() / 255)


def test_small_images_keep_their_size_and_shifts(mnist, photos):
    assert (mnist.augment, mnist.framing, mnist.image_size, mnist.image_mode) == ("shift", "resize", (28, 28), "L")
    resized = load_image_data(str(photos), augment="shift", image_size=64)
    assert (resized.augment, resized.framing, resized.image_size) == ("shift", "crop", (64, 64))
    assert next(iter(make_loader(resized, "train", 4, augment=True, pad=4)))[0].shape == (4, 3, 64, 64)


def test_the_carried_attack_falls_back_to_random_starts_with_one_line(photos, mnist):
    data = load_image_data(str(photos), model_input=model_input("vit_small_patch16_224"))
    lines = []
    rrm = RRMConfig(match_on="adversarial", match_start="previous")
    assert perturbation_memory("rrm", data, rrm, lines.append) is None
    assert lines == ["--match-start random instead of previous: random-resized crops move each image's frame"]
    assert "GiB for 1300000 images" in PerturbationMemory.too_large(1_300_000, (3, 224, 224))
    assert perturbation_memory("rrm", mnist, rrm, lines.append) is not None and len(lines) == 1
    with pytest.raises(RRMError, match="random-resized crops"):
        perturbation_memory("atta_at", data)  # a method chosen for its memory is not changed silently


def test_evaluation_scales_with_the_run():
    full, half, smoke = (EvalConfig().for_run(n) for n in (160_000, 20_000, 8))
    assert (full.eval_examples, full.sweep_examples, full.epoch_eval_examples, full.no_checks) == (500, 250, 256, False)
    assert (half.eval_examples, half.sweep_examples, half.epoch_eval_examples) == (250, 125, 128)
    assert (smoke.eval_examples, smoke.sweep_examples, smoke.epoch_eval_examples, smoke.no_checks) == (16, 0, 0, True)
    assert not smoke.sweeps and full.sweeps
    given = EvalConfig(eval_examples=100, sweep_examples=40, epoch_eval_examples=64).for_run(8)
    assert (given.eval_examples, given.sweep_examples, given.epoch_eval_examples) == (100, 40, 64)
    assert not given.no_checks  # an evaluation asked for is checked for gradient masking, however short the run


def test_student_pretrained_from_the_offline_hub_cache(tmp_path):
    tag = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    torch.manual_seed(0)
    weights = timm.create_model(tag, pretrained=False).state_dict()
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    put_in_hub_cache(tmp_path, f"timm/{tag}", os.environ["HF_HOME"])
    student = RRMStudent.for_teacher(tag, feature_dim=8, num_classes=2, pretrained_backbone=True)
    backbone = student.backbone.state_dict()
    assert torch.equal(backbone["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])
    assert student.config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the tag's own normalization
    with pytest.raises(RRMError, match="cannot get the pretrained weights of 'vit_tiny_patch16_224.augreg_in21k'"):
        RRMStudent.for_teacher("vit_tiny_patch16_224.augreg_in21k", feature_dim=8, num_classes=2,
                               pretrained_backbone=True)


@pytest.fixture(scope="module")
def teacher_at_224(tmp_path_factory):
    """A Hub teacher (timm export in the Hugging Face cache) that sees 224-px images."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 224, 224)}
    folder = tmp_path_factory.mktemp("teacher") / "repo"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    put_in_hub_cache(folder, "someone/robust-test-resnet-224", os.environ["HF_HOME"])
    return "someone/robust-test-resnet-224"


@pytest.mark.slow
def test_the_users_command_at_224_px(photos, teacher_at_224, tmp_path):
    out = tmp_path / "student"
    result = run_recipe(["recipes/rrm.py", "--teacher", teacher_at_224, "--student", "vit_small", "--dataset",
                         str(photos), "--max-steps", "2", "--batch-size", "4", "--eval-examples", "2",
                         "--eval-steps", "1", "--no-checks", "--output-dir", str(out)], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "--student vit_small: timm's vit_small_patch16_224" in printed
    assert "--match-start random instead of previous: random-resized crops" in printed
    assert "smoke run (8 images trained)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["num_examples"] == 2 and metrics["rrm_options"]["match_start"] == "random"
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224"
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and config["pretrained_cfg"]["crop_pct"] == 0.9
    student = RRMStudent.from_pretrained(str(out))
    assert student(torch.rand(1, 3, 300, 200)).shape == (1, 2)


@pytest.mark.slow
def test_the_papers_cifar10_config_runs_on_a_cifar_shaped_set(tmp_path):
    import datasets
    import yaml

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list("abcdefghij"))})
    generator = torch.Generator().manual_seed(0)

    def split(count):
        images = [Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy())
                  for _ in range(count)]
        return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]}, features=features)

    datasets.DatasetDict({"train": split(40), "test": split(20)}).save_to_disk(str(tmp_path / "cifar"))
    paper = yaml.safe_load((ROOT / "recipes/configs/rrm-cifar10.yaml").read_text())
    assert paper["training"] == {"epochs": 48, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9,
                                 "weight_decay": 5.0e-4, "warmup": 0.0}
    assert paper["rrm"]["match_on"] == "clean" and paper["rrm"]["ce_weight"] == 0.005
    assert abs(paper["eval"]["eps"] - 8 / 255) < 1e-9 and paper["student"]["name"] == "resnet50"
    smoke = tmp_path / "smoke.yaml"  # the paper's settings on the tiny set, with the bundled teacher
    smoke.write_text(yaml.safe_dump({"base": str(ROOT / "recipes/configs/rrm-cifar10.yaml"),
                                     "data": {"dataset": str(tmp_path / "cifar")}, "teacher": {"name": None},
                                     "eval": {"suite": "pgd", "eval_examples": 4, "eval_steps": 1}}))
    out = tmp_path / "out"
    result = run_here(["recipes/rrm.py", "--config", str(smoke), "--max-steps", "2", "--batch-size", "8",
                         "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["student"] == "resnet50" and metrics["match_on"] == "clean"
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert resolved["training"]["optimizer"] == "sgd" and resolved["data"]["pad"] == 4 and resolved["data"]["hflip"]


@pytest.fixture(scope="module")
def parquet_digits(tmp_path_factory, mnist):
    """The embedded digits as parquet files (two training shards and a test file), as Hub datasets store them."""
    folder = tmp_path_factory.mktemp("parquet") / "digits"
    (folder / "data").mkdir(parents=True)
    train = mnist.train.select(range(64))
    for shard in range(2):
        train.shard(2, shard, contiguous=True).to_parquet(str(folder / "data" / f"train-0000{shard}-of-00002.parquet"))
    mnist.test.select(range(32)).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


@pytest.mark.slow
def test_streaming_from_parquet_files_continues_the_stream(parquet_digits):
    from accelerate import Accelerator

    data = load_image_data(str(parquet_digits), streaming=True)
    assert data.streaming and data.class_names == [str(d) for d in range(10)] and data.image_size == (28, 28)
    assert len(data.test) == 32 and data.image_mode == "L"
    loader = make_loader(data, "train", 8, augment=True, pad=2, shuffle_buffer=16, stream_images=64)
    assert len(loader) == 8
    loader.dataset.set_epoch(3)
    full = [batch for batch in loader]
    assert sum(len(y) for _, y in full) == 64 and 0 <= full[0][0].min() and full[0][0].max() <= 1
    resumed = list(Accelerator(cpu=True).skip_first_batches(loader, 3))  # what a resumed run does
    assert len(resumed) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(full[3:], resumed, strict=True))
    loader.dataset.set_epoch(4)
    assert not torch.equal(next(iter(loader))[1], full[0][1])  # another epoch, another order
    part = load_image_data(str(parquet_digits), streaming=True, train_split="train[16:48]")
    assert part.stream_length == 32 and part.train_size == 32
    labels = [row["label"] for row in part.train]
    assert labels == [row["label"] for row in data.train][16:48]
    with pytest.raises(RRMError, match="sliced by counts from its start"):
        load_image_data(str(parquet_digits), streaming=True, train_split="train[:50%]")


@pytest.mark.slow
def test_rrm_recipe_streams_a_dataset(parquet_digits, tmp_path):
    result = run_here(["recipes/rrm.py", "--dataset", str(parquet_digits), "--streaming", "--max-steps", "2",
                         "--batch-size", "8", "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "--match-start random instead of previous: streamed images have no index" in printed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 2
    refused = run_here(["recipes/rrm.py", "--dataset", str(parquet_digits), "--streaming", "--epochs", "1"])
    assert refused.returncode != 0 and "does not say how many images it has: add --max-steps" in refused.stderr
