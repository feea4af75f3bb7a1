import json

import pytest
import timm
import torch

from rrm_hub import RRMError, RRMStudent

VIT = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 48, "num_heads": 2}


def _student(**kwargs):
    args = dict(feature_dim=37, num_classes=10, input_size=(1, 28, 28), model_args=VIT)
    args.update(kwargs)
    return RRMStudent.for_teacher("vit_tiny_patch16_224", **args)


def test_widths_come_from_a_dry_run():
    student = _student()
    assert (student.proj.in_features, student.proj.out_features) == (48, 37)
    assert (student.head.in_features, student.head.out_features) == (37, 10)
    cnn = RRMStudent.for_teacher("resnet18", feature_dim=64, num_classes=3, input_size=(3, 20, 20),
                                 model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 24)})
    assert cnn.proj.in_features == 24 and cnn.preprocess.input_size == (3, 20, 20)
    layered = _student(student_layer="blocks.0")
    assert layered.layer_proj.in_features == 48
    logits, features = layered(torch.rand(2, 1, 28, 28), return_features=True)
    assert logits.shape == (2, 10) and features.shape == (2, 37)


def test_save_load_round_trip_and_plain_timm_export(tmp_path):
    torch.manual_seed(0)
    student = _student().eval()
    with torch.no_grad():
        student.head.bias.normal_()
    x = torch.rand(4, 1, 28, 28)
    before = student(x)
    student.save_pretrained(tmp_path / "s")
    assert {"config.json", "model.safetensors", "rrm_head.safetensors"} <= {p.name for p in (tmp_path / "s").iterdir()}
    loaded = RRMStudent.from_pretrained(tmp_path / "s")
    assert torch.allclose(loaded(x), before, atol=1e-6)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["rrm"]["feature_dim"] == 37

    plain = timm.create_model(f"local-dir:{tmp_path / 's'}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=plain)
    assert tuple(data["input_size"]) == (1, 28, 28)
    normalized = (x - torch.tensor(data["mean"]).view(1, -1, 1, 1)) / torch.tensor(data["std"]).view(1, -1, 1, 1)
    assert torch.allclose(plain(normalized), before, atol=1e-5)  # projection + classifier folded exactly


def test_incomplete_or_foreign_folders_are_refused(tmp_path):
    student = _student()
    student.save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "rrm_head.safetensors").unlink()
    with pytest.raises(RRMError, match="no rrm_head.safetensors"):
        RRMStudent.from_pretrained(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    del config["rrm"]
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RRMError, match="not an rrm-hub student"):
        RRMStudent.from_pretrained(tmp_path / "s")


def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(RRMError, match="timm has no model 'vit_nonexistent'"):
        RRMStudent.for_teacher("vit_nonexistent", feature_dim=8, num_classes=2)


@pytest.mark.parametrize("case", ["no such folder", "uncached Hub id", "broken config.json", "truncated head",
                                  "foreign folder"])
def test_a_student_that_cannot_be_loaded_is_one_line_and_an_oserror(tmp_path, case):
    from rrm_hub.errors import RRMLoadError

    folder = tmp_path / "s"
    _student().save_pretrained(folder)
    source, message = str(folder), None
    if case == "no such folder":
        source, message = str(tmp_path / "no" / "such"), "no such folder, and not a Hub id"
    elif case == "uncached Hub id":
        source, message = "someone/never-downloaded", "not in the local Hugging Face cache"
    elif case == "broken config.json":
        (folder / "config.json").write_text("{oops")
        message = r"config.json is not valid JSON \(line 1\); download it again"
    elif case == "truncated head":
        (folder / "rrm_head.safetensors").write_bytes((folder / "rrm_head.safetensors").read_bytes()[:100])
        message = "a weight file is damaged"
    else:
        (folder / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
        message = "is not an rrm-hub student"
    with pytest.raises(RRMLoadError, match=message) as raised:
        RRMStudent.from_pretrained(source, local_files_only=case == "uncached Hub id")
    assert isinstance(raised.value, OSError) and isinstance(raised.value, RRMError)  # as transformers raises
    assert "\n" not in str(raised.value)
