"""recipes/inheritance.py: each model judged on the other's adversarial examples."""

import json

import datasets
import torch
from PIL import Image

from rrm_hub import make_loader
from rrm_hub.evaluation.inheritance import inheritance

from .conftest import run_here


def test_an_undefended_student_inherits_nothing_and_a_copy_everything(undefended, teacher, mnist):
    loader = make_loader(mnist, "test", 64, limit=64)
    torch.manual_seed(0)
    own = inheritance(undefended, teacher, loader, 0.3, steps=5, show=False)
    assert own["student"]["robust"] == 0.0 and own["student"]["clean"] > 0.8
    assert own["teacher_on_student_attacks"] > 0.7  # the undefended net's attacks do not fool the robust teacher
    assert own["agreement_on_student_attacks"] < 0.3 and own["num_examples"] == 64
    assert 0.5 < own["teacher_confidence"] <= 1.0
    torch.manual_seed(0)
    copy = inheritance(teacher, teacher, loader, 0.3, steps=5, show=False)
    assert copy["agreement_clean"] == 1.0 and copy["agreement_on_student_attacks"] == 1.0
    assert copy["teacher_on_student_attacks"] == copy["student"]["robust"]


def test_the_recipe_writes_its_numbers_and_refuses_mismatched_classes(tmp_path):
    out = tmp_path / "inheritance"
    result = run_here(["recipes/inheritance.py", "--model", "default", "--n-examples", "16", "--steps", "2",
                       "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads((out / "inheritance.json").read_text())
    assert numbers["num_examples"] == 16 and numbers["agreement_clean"] == 1.0  # the bundled teacher with itself
    assert "teacher on the student's attacks" in result.stdout
    three = tmp_path / "three"
    datasets.Dataset.from_dict({"image": [Image.new("L", (28, 28), i * 20) for i in range(9)],
                                "label": [0, 1, 2] * 3}).save_to_disk(str(three))
    bad = run_here(["recipes/inheritance.py", "--model", "default", "--dataset", str(three), "--output-dir",
                    str(out)])
    assert bad.returncode == 2 and "must agree" in bad.stderr and "Traceback" not in bad.stderr
