import os

import pytest
import torch

from rrm_hub import DEFAULT_TEACHER, RRMError, RRMStudent, evaluate, load_teacher, make_loader, pgd

from .conftest import put_in_hub_cache


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


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architecture": "resnet18", "num_classes": 10}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(RRMError, match="does not unpickle"):
        load_teacher(str(tmp_path))
