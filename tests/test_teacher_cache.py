"""The teacher cache: hits equal the live teacher, any change or damage rebuilds, unknown inputs are refused."""

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from rrm_hub import RRM, FeatureTap, RRMError, RRMStudent, make_loader
from rrm_hub.data import cache_dir
from rrm_hub.teachers.cache import TeacherCache, load_or_build

from .conftest import TEACHER_WIDTH, run_here
from .test_hub import _recipe

LAYER = "fc@input"


@pytest.fixture(scope="module")
def small(mnist):
    """The first 96 training digits: a cache built in a moment."""
    return replace(mnist, train=mnist.train.select(range(96)))


def quiet(_line: str) -> None:
    pass


def tiny_student() -> RRMStudent:
    torch.manual_seed(0)
    return RRMStudent.for_teacher("resnet18", feature_dim=TEACHER_WIDTH, num_classes=10, input_size=(1, 28, 28),
                                  model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)})


def test_a_hit_gives_exactly_the_live_teachers_outputs(small, teacher):
    lines = []
    cache = load_or_build(teacher, LAYER, small, 32, log=lines.append)
    assert not cache.reused and len(cache) == 96 and lines[0].startswith("teacher cache: built")
    live, cached = RRM(teacher, LAYER, match_on="clean"), RRM(teacher, LAYER, match_on="clean", cache=cache)
    try:
        x, y = next(iter(make_loader(small, "train", 40, augment=True, pad=0, seed=3)))  # other batches, order
        live_logits, live_features = live.teacher_outputs(x)
        logits, features = cached.teacher_outputs(x)
        assert torch.equal(features, live_features) and torch.equal(logits, live_logits)
        student = tiny_student()
        expected, _ = live(student, x, y)
        cached.teacher = None  # the cache stands in for the teacher's forward pass
        loss, _ = cached(student, x, y)
        assert torch.equal(loss, expected)
    finally:
        live.tap.remove()
        cached.tap.remove()


def test_another_dataset_teacher_or_layer_gets_its_own_cache(small, teacher):
    first = load_or_build(teacher, LAYER, small, 32, log=quiet)
    again = load_or_build(teacher, LAYER, small, 32, log=quiet)
    assert again.reused and again.path == first.path and torch.equal(again.features, first.features)
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.network.fc.weight.mul_(2)  # logits change, the representation does not
    fewer = replace(small, train=small.train.select(range(64)))
    paths = {first.path}
    for model, layer, data in ((changed, LAYER, small), (teacher, "layer3", small), (teacher, LAYER, fewer)):
        cache = load_or_build(model, layer, data, 32, log=quiet)
        assert not cache.reused and cache.path not in paths
        paths.add(cache.path)
        x, _ = next(iter(make_loader(data, "train", 8)))
        with FeatureTap(model.network, layer) as tap, torch.inference_mode():
            logits = model(x)
            features = tap.pop()
        assert torch.equal(cache.lookup(x)[0], logits) and torch.equal(cache.lookup(x)[1], features)
    assert len(load_or_build(teacher, LAYER, fewer, 32, log=quiet)) == 64


def test_a_file_made_for_another_run_is_rebuilt(small, teacher):
    cache = load_or_build(teacher, LAYER, small, 32, log=quiet)
    stale = TeacherCache(cache.keys, cache.logits + 1, cache.features, {**cache.metadata, "teacher_weights": "0"})
    stale.save(cache.path)
    lines = []
    rebuilt = load_or_build(teacher, LAYER, small, 32, log=lines.append)
    assert not rebuilt.reused and "made for another teacher_weights; rebuilding" in lines[0]
    assert torch.equal(rebuilt.logits, cache.logits)
    assert load_or_build(teacher, LAYER, small, 32, log=quiet).reused


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_file_is_rebuilt(small, teacher, damage):
    cache = load_or_build(teacher, LAYER, small, 32, log=quiet)
    content = cache.path.read_bytes()
    cache.path.write_bytes(b"not a safetensors file" if damage == "garbage" else content[: len(content) // 2])
    lines = []
    rebuilt = load_or_build(teacher, LAYER, small, 32, log=lines.append)
    assert not rebuilt.reused and "unreadable" in lines[0] and torch.equal(rebuilt.features, cache.features)
    written = TeacherCache.load(cache.path)  # written back whole
    assert written.metadata == cache.metadata and torch.equal(written.features, cache.features)
    assert load_or_build(teacher, LAYER, small, 32, log=quiet).reused


def test_an_input_not_in_the_cache_is_refused_in_one_line(small, teacher):
    cache = load_or_build(teacher, LAYER, small, 32, log=quiet)
    shifted, _ = next(iter(make_loader(small, "train", 16, augment=True, pad=2, seed=0)))
    clean, _ = next(iter(make_loader(small, "train", 16)))
    one_pixel = clean.clone()
    one_pixel[5, 0, 14, 14] = 1 - one_pixel[5, 0, 14, 14]
    for x in (shifted, (clean + 0.01 * torch.rand_like(clean)).clamp(0, 1), one_pixel):
        with pytest.raises(RRMError, match="--pad 0") as err:
            cache.lookup(x)
        assert "\n" not in str(err.value)
    cache.lookup(clean)


def test_matching_perturbed_teacher_views_with_a_cache_is_refused(small, teacher):
    cache = load_or_build(teacher, LAYER, small, 32, log=quiet)
    with pytest.raises(RRMError, match="use --match-on clean or --teacher-input clean"):
        RRM(teacher, LAYER, match_on="noise", cache=cache)
    objective = RRM(teacher, LAYER, match_on="noise", teacher_input="clean", cache=cache)  # the teacher sees clean
    try:
        x, y = next(iter(make_loader(small, "train", 16)))
        loss, logs = objective(tiny_student(), x, y)
        assert torch.isfinite(loss) and "feat" in logs
    finally:
        objective.tap.remove()


TINY = ["--max-steps", "3", "--epoch-eval-examples", "0", "--eval-examples", "16", "--sweep-examples", "16",
        "--no-checks", "--student-kwargs", "img_size=28", "patch_size=7", "depth=2", "embed_dim=48", "num_heads=2"]


@pytest.mark.slow
def test_rrm_recipe_builds_the_cache_once_then_reuses_it(tmp_path):
    shutil.rmtree(cache_dir() / "teacher-features", ignore_errors=True)
    args = ["recipes/rrm.py", "--cache-teacher", "--pad", "0", "--match-on", "clean", *TINY]
    first = run_here([*args, "--output-dir", str(tmp_path / "first")])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher cache: built" in first.stdout and "teacher cache: reusing" not in first.stdout
    second = run_here([*args, "--output-dir", str(tmp_path / "second")])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher cache: reusing" in second.stdout and "teacher cache: built" not in second.stdout
    built, reused = (json.loads((tmp_path / run / "metrics.json").read_text())["teacher_cache"]
                     for run in ("first", "second"))
    assert built["path"] == reused["path"] and not built["reused"] and reused["reused"]


@pytest.mark.parametrize("args, message", [
    (["--pad", "2", "--match-on", "clean"], "add --pad 0"),
    (["--pad", "0", "--hflip", "--match-on", "clean"], "add --pad 0"),
    (["--pad", "0", "--match-on", "noise"], "use --match-on clean or --teacher-input clean"),
])
def test_rrm_recipe_refuses_a_cache_it_cannot_use(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        _recipe("rrm").main(["--cache-teacher", *args, *TINY, "--output-dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()
