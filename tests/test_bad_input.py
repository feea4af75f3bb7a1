"""The bad-input table: each bad input to the recipes gives one `error:` line (no traceback) or is fixed
automatically as documented. Cases already covered elsewhere are referenced, not repeated:
tests/test_recipes.py::test_bad_input_gives_one_line_errors (missing teacher folder, wrong --teacher-layer,
unknown timm student, eps < 0, mismatched classes, --eval-examples < 0, --eval-steps 0, --match-eps < 0,
--preflight-steps 0, malformed --student-kwargs) and tests/test_teachers.py (teacher files of every kind).
"""

import json
import shutil

import datasets
import pytest
import torch
from PIL import Image

from rrm_hub import create_pixel_model
from rrm_hub.models.pixel import save_timm_folder
from rrm_hub.teachers.load import DEFAULT_TEACHER

from .conftest import call_recipe
from .test_teachers import _RunsCode

QUICK = ["--max-steps", "1", "--batch-size", "16", "--epoch-eval-examples", "0", "--eval-examples", "16",
         "--sweep-examples", "16", "--eval-steps", "1", "--no-checks", "--student", "resnet18", "--student-kwargs",
         "layers=(1,1,1,1)", "channels=(8,8,8,8)"]


def _save(path, images, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abc"))})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return str(path)


def no_image_column(tmp):
    datasets.Dataset.from_dict({"text": ["a", "b"] * 5, "label": [0, 1] * 5}).save_to_disk(str(tmp / "text"))
    return str(tmp / "text")


def empty_dataset(tmp):  # datasets cannot save an empty dataset: an empty folder is what users meet
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def mixed_modes(tmp):  # the first image is RGB, others grayscale: all become RGB (gray repeated)
    images = [Image.new("RGB", (28, 28), (i * 20, 0, 0)) if i == 0 else Image.new("L", (28, 28), i * 20)
              for i in range(12)]
    return _save(tmp / "mixed", images, [0, 1, 2] * 4)


def rgb_teacher(tmp):  # a 3-channel teacher for the grayscale digits: gray is repeated over its channels
    torch.manual_seed(0)
    args = {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)}
    model = create_pixel_model("resnet18", 10, (3, 28, 28), args, [str(i) for i in range(10)])
    save_timm_folder(model.model, str(tmp / "rgb-teacher"), args, [str(i) for i in range(10)])
    return str(tmp / "rgb-teacher")


def corrupt_safetensors(tmp):
    folder = shutil.copytree(DEFAULT_TEACHER, tmp / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return str(folder)


def unsafe_pickle(tmp):
    torch.save({"model": {}, "args": _RunsCode(tmp / "pwned")}, tmp / "resnet18_evil.ckpt")
    return str(tmp / "resnet18_evil.ckpt")


def damaged_checkpoint(tmp):
    folder = tmp / "out" / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text('{"step": 4}')
    (folder / "model.safetensors").write_bytes(b"garbage")
    return "auto"


def images_one_corrupt(tmp, good=40):
    """An imagefolder of `good` PNGs and one corrupt JPEG in each split (train and test)."""
    for split in ("train", "test"):
        for label in range(2):
            folder = tmp / "photos" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(good // 2):
                Image.new("L", (28, 28), 40 + 100 * label + i).save(folder / f"{i}.png")
        for label in ("0",) if good else ("0", "1"):
            (tmp / "photos" / split / label / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    return str(tmp / "photos")


def images_all_corrupt(tmp):
    return images_one_corrupt(tmp, good=0)


def another_runs_checkpoint(tmp):
    folder = tmp / "out" / "checkpoints" / "step-00000007"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text('{"step": 7, "run_id": "someone-else"}')
    return str(tmp / "out")


def a_file(tmp):
    (tmp / "file.txt").write_text("not a folder")
    return str(tmp / "file.txt" / "out")


# (flags, what to make under tmp_path for the "MADE" placeholder, the one error line, or None: runs and fixes)
CASES = {
    "unknown teacher hub id": (["--teacher", "nobody/no-such-teacher"], None, "not in the local Hugging Face cache"),
    "unknown timm student": (["--student", "resnet_nonexistent"], None, "timm has no model 'resnet_nonexistent'"),
    "wrong --teacher-layer": (["--teacher-layer", "fc9"], None, "has no layer 'fc9'"),
    "wrong --student-layer": (["--student-layer", "layer9"], None, "layer9"),
    "mismatched classes": (["--dataset", "MADE"], mixed_modes, "teacher predicts 10 classes but the dataset has 3"),
    "negative --eps": (["--eps", "-0.1"], None, "--eps must be >= 0"),
    "--eval-examples -1": (["--eval-examples", "-1"], None, "--eval-examples must be >= 0"),
    "--epochs 0": (["--epochs", "0"], None, "--epochs must be >= 1"),
    "--match-steps 0": (["--match-steps", "0"], None, "--match-steps must be >= 1"),
    "n-fgsm with several steps": (["--match-attack", "n-fgsm", "--match-steps", "2"], None, "takes one step"),
    "n-fgsm carried over epochs": (["--match-attack", "n-fgsm"], None, "add --match-start random"),
    "free step without a memory": (["--match-attack", "free", "--match-start", "random"], None,
                                    "needs --match-start previous"),
    "--keep-best without --holdout": (["--keep-best"], None, "add --holdout N"),
    "--holdout larger than the data": (["--holdout", "100000", "--epoch-eval-examples", "8"], None,
                                       "--holdout must be between 1 and"),
    "--holdout without a per-epoch check": (["--holdout", "100"], None, "drop one of them"),
    "--grad-accum 0": (["--grad-accum", "0"], None, "--grad-accum must be >= 1"),
    "--save-every -1": (["--save-every", "-1"], None, "--save-every must be >= 0"),
    "--push-to-hub without id": (["--push-to-hub"], None, "--push-to-hub needs --hub-model-id"),
    "--preflight with --list-layers": (["--preflight", "--list-layers"], None, "give one of them"),
    "dataset without an image column": (["--dataset", "MADE"], no_image_column, "has no image column"),
    "empty dataset": (["--dataset", "MADE"], empty_dataset, "is empty; put images in class subfolders"),
    "missing dataset": (["--dataset", "./no/such/data"], None, "could not load dataset './no/such/data'"),
    "corrupt safetensors teacher": (["--teacher", "MADE"], corrupt_safetensors, "has a corrupt or incomplete file"),
    "pickled teacher that runs code": (["--teacher", "MADE"], unsafe_pickle, "never unpickles untrusted files"),
    "--resume with no checkpoint": (["--resume"], None, "--resume: no checkpoint in"),
    "--resume a damaged checkpoint": (["--resume", "MADE"], damaged_checkpoint, "it is damaged, unsafe or from"),
    "--resume a folder that is none": (["--resume", "MADE"], lambda t: str(t), "is not a checkpoint"),
    "output folder under a file": (["--output-dir", "MADE"], a_file, "cannot write to the output folder"),
    "corrupt images only": (["--dataset", "MADE", "--ignore-teacher-labels"], images_all_corrupt,
                            "none of the first 2 images of"),
    "a label column of images": (["--label-column", "image"], None, "holds PIL.Image.Image, not class ids"),
    "L-inf --eps 300": (["--eps", "300"], None, "--eps 300 is more than an L-inf budget can be"),
    "L-inf --match-eps 2": (["--match-eps", "2"], None, "--match-eps 2 is more than an L-inf budget can be"),
    "L2 --eps beyond any image": (["--norm", "l2", "--eps", "40", "--teacher", "default-l2"], None,
                                  "more than any L2 perturbation of a 1x28x28 image can be (28"),
    "--warmup 2": (["--warmup", "2"], None, "--warmup must be <= 1"),
    "--match-eps-warmup 5": (["--match-eps-warmup", "5"], None, "--match-eps-warmup must be <= 1"),
    "--max-bad-images 2": (["--max-bad-images", "2"], None, "--max-bad-images must be <= 1"),
    "fp16 on a CPU": (["--mixed-precision", "fp16"], None, "--mixed-precision fp16 needs a GPU"),
    "another run's checkpoints": (["--output-dir", "MADE"], another_runs_checkpoint,
                                  "holds checkpoints of an earlier run (up to step-00000007): add --resume"),
    "--hub-model-id not an id": (["--push-to-hub", "--hub-model-id", "not a/valid id/x"], None,
                                 "--hub-model-id 'not a/valid id/x' is not a Hub repo id"),
    "--push-to-hub offline": (["--push-to-hub", "--hub-model-id", "me/robust"], None, "--push-to-hub me/robust:"),
    "a corrupt image among 40 (skipped)": (["--dataset", "MADE", "--ignore-teacher-labels"], images_one_corrupt, None),
    "grayscale data, RGB teacher (fixed)": (["--teacher", "MADE"], rgb_teacher, None),
    "RGB and grayscale images mixed (fixed)": (["--dataset", "MADE", "--ignore-teacher-labels"], mixed_modes, None),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if CASES[name][2] is None else name
                                  for name in CASES])  # the inputs that are fixed run a training
def test_bad_input(tmp_path, name):
    flags, make, message = CASES[name]
    made = make(tmp_path) if make else None
    flags = [made if f == "MADE" else f for f in flags]
    args = [*QUICK, "--output-dir", str(tmp_path / "out"), *flags]  # a later --output-dir wins
    code, stderr = call_recipe("rrm.py", args)
    assert "Traceback" not in stderr
    if message is None:
        assert code == 0, stderr[-2000:]
        assert (tmp_path / "out" / "model.safetensors").exists()
        return
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_image_is_skipped_counted_and_reported(tmp_path):
    from .conftest import run_here

    data = images_one_corrupt(tmp_path)
    result = run_here(["recipes/rrm.py", *QUICK, "--dataset", data, "--ignore-teacher-labels", "--eval-examples", "41",
                       "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert "skipped 1 unreadable test image(s) (first: " in printed and "broken.jpg" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_examples"] == 40  # the broken test image is left out, not counted
    assert metrics["skipped_images"]["test"]["count"] == 1
    assert metrics["skipped_images"]["test"]["first"][0].endswith("broken.jpg")
    code, stderr = call_recipe("evaluate.py", ["--dataset", data, "--model", str(tmp_path / "out"), "--n-examples",
                                               "41", "--steps", "1", "--no-checks", "--max-bad-images", "0",
                                               "--output-dir", str(tmp_path / "ev")])
    assert code == 2 and "1 of the 41 test images cannot be read" in stderr and "Traceback" not in stderr


OTHER_RECIPES = {
    "evaluate.py a missing model": ("evaluate.py", ["--model", "./no/such/model"],
                                    "model './no/such/model' not found: give an existing folder or file"),
    "evaluate.py L-inf --eps 3": ("evaluate.py", ["--eps", "3"], "--eps 3 is more than an L-inf budget can be"),
    "evaluate.py bad --model-kwargs": ("evaluate.py", ["--checkpoint", "x.safetensors", "--model", "resnet18",
                                                       "--model-kwargs", "layers"], "key=value"),
    "adversarial_train.py --eps-warmup 5": ("adversarial_train.py", ["--eps-warmup", "5"],
                                            "--eps-warmup must be <= 1"),
    "adversarial_train.py bad --model-kwargs": ("adversarial_train.py", ["--model-kwargs", "bogus=1", "--max-steps",
                                                                         "1"], "fix or drop that key=value"),
    "push.py not an id": ("push.py", [str(DEFAULT_TEACHER), "--hub-model-id", "not a/valid id/x"],
                          "is not a Hub repo id"),
}


@pytest.mark.parametrize("name", list(OTHER_RECIPES))
def test_bad_input_to_the_other_recipes(tmp_path, name):
    script, flags, message = OTHER_RECIPES[name]
    code, stderr = call_recipe(script, flags)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1 and message in errors[0], stderr[-2000:]
