"""Several matched layer pairs: parsing, shape alignment, the student's projections, the loss, a whole run."""

import json

import pytest
import timm
import torch

from rrm_hub import RRM, RRMError, RRMStudent
from rrm_hub.methods import feature_loss
from rrm_hub.models.align import Match, common_grid, parse_match, teacher_pairs, to_grid, view, view_shape

from .conftest import LAYER2_WIDTH, TEACHER_WIDTH, run_here

VIT = {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 48, "num_heads": 2}
TWO_PAIRS = [Match("layer2", "blocks.0"), Match("fc@input", None, 0.5)]


def test_pairs_parse_with_weights_and_the_penultimate_name():
    assert parse_match("layer2:blocks.1:0.5") == Match("layer2", "blocks.1", 0.5)
    assert parse_match("fc@input:penultimate") == Match("fc@input", None, 1.0) == parse_match("fc@input:")
    assert parse_match("layer3@input:blocks.0.attn@input:2").name == "layer3@input:blocks.0.attn@input"
    for bad, message in [("layer2", "not TEACHER_LAYER:STUDENT_LAYER"), (":blocks.0", "not TEACHER_LAYER"),
                         ("a:b:c:d", "not TEACHER_LAYER"), ("layer2:blocks.0:heavy", "'heavy' is not a number"),
                         ("layer2:blocks.0:-1", "must be a number >= 0")]:
        with pytest.raises(RRMError, match=message):
            parse_match(bad)


def test_maps_and_tokens_align_on_the_smaller_grid():
    cnn = torch.randn(2, 64, 7, 7)
    with_cls, without_cls = torch.randn(2, 17, 48), torch.randn(2, 16, 48)
    assert to_grid(cnn).shape == (2, 64, 7, 7)
    assert to_grid(with_cls, prefix_tokens=1).shape == to_grid(with_cls).shape == (2, 48, 4, 4)
    assert torch.equal(to_grid(with_cls)[:, :, 0, 1], with_cls[:, 2])  # token 0 (class) dropped, row-major grid
    assert torch.equal(to_grid(without_cls)[:, :, 1, 0], without_cls[:, 4])
    registers = torch.randn(2, 5 + 49, 48)  # class + 4 register tokens ahead of a 7x7 grid
    assert torch.equal(to_grid(registers, prefix_tokens=5)[:, :, 0, 0], registers[:, 5])
    nhwc = torch.randn(2, 4, 4, 32)
    assert torch.equal(to_grid(nhwc, nhwc=True)[:, :, 1, 2], nhwc[:, 1, 2])

    grid = common_grid(Match("t", "s"), "spatial", view_shape(cnn, "spatial"), view_shape(with_cls, "spatial"))
    assert grid == [4, 4]
    assert view(cnn, "spatial", grid).shape == (2, 64, 4, 4) and view(with_cls, "spatial", grid).shape == (2, 48, 4, 4)
    assert torch.allclose(view(cnn, "spatial", [1, 1]).flatten(1), cnn.mean(dim=(2, 3)), atol=1e-6)
    assert view(cnn, "pooled").shape == (2, 64) and view(with_cls, "pooled").shape == (2, 48)
    with pytest.raises(RRMError, match="not a square grid"):
        to_grid(torch.randn(2, 18, 8), prefix_tokens=1, layer="blocks.3")


def test_spatial_cosine_is_taken_per_location():
    a = torch.randn(3, 8, 4, 4)
    b = a.clone()
    b[:, :, 0, 0] *= -1  # one location of sixteen points the other way
    assert torch.allclose(feature_loss(a, b), torch.tensor(2.0 / 16), atol=1e-5)


def test_a_spatial_pair_with_a_vector_side_names_the_layer(teacher):
    sample = torch.zeros(2, 1, 28, 28)
    pairs = teacher_pairs(teacher, teacher.network, [Match("fc@input", "blocks.0")], "spatial", sample)
    with pytest.raises(RRMError, match="teacher layer 'fc@input' is a vector"):
        RRMStudent.for_teacher("vit_tiny_patch16_224", feature_dim=TEACHER_WIDTH, num_classes=10,
                               input_size=(1, 28, 28), model_args=VIT, pairs=pairs)
    pairs = teacher_pairs(teacher, teacher.network, [Match("layer2", None)], "spatial", sample)
    with pytest.raises(RRMError, match="student layer 'penultimate' is a vector"):
        RRMStudent.for_teacher("vit_tiny_patch16_224", feature_dim=TEACHER_WIDTH, num_classes=10,
                               input_size=(1, 28, 28), model_args=VIT, pairs=pairs)


def _two_pair_student(teacher):
    pairs = teacher_pairs(teacher, teacher.network, TWO_PAIRS, "spatial", torch.zeros(2, 1, 28, 28))
    torch.manual_seed(0)
    return RRMStudent.for_teacher("vit_tiny_patch16_224", feature_dim=TEACHER_WIDTH, num_classes=10,
                                  input_size=(1, 28, 28), model_args=VIT, pairs=pairs)


def test_student_projects_each_pair_to_the_teacher(teacher):
    student = _two_pair_student(teacher)
    assert [p.grid for p in student.pairs] == [[4, 4], None]
    assert [p.mode for p in student.pairs] == ["spatial", "pooled"]  # two vectors stay vectors
    conv, same = student.aligners["0"], student.aligners["1"]
    assert isinstance(conv, torch.nn.Conv2d) and (conv.in_channels, conv.out_channels) == (48, LAYER2_WIDTH)
    assert isinstance(same, torch.nn.Identity)  # the penultimate pair is the projection the classifier reads
    logits, features = student(torch.rand(3, 1, 28, 28), return_features=True)
    assert logits.shape == (3, 10) and [f.shape for f in features] == [(3, LAYER2_WIDTH, 4, 4), (3, TEACHER_WIDTH)]
    assert not any(m._forward_hooks for m in student.modules())


def test_pairs_and_their_projections_survive_save_and_load(teacher, tmp_path):
    student = _two_pair_student(teacher).eval()
    with torch.no_grad():
        student.aligners["0"].bias.normal_()
    x = torch.rand(2, 1, 28, 28)
    logits, features = student(x, return_features=True)
    student.save_pretrained(tmp_path / "s")
    loaded = RRMStudent.from_pretrained(tmp_path / "s")
    again_logits, again = loaded(x, return_features=True)
    assert torch.allclose(again_logits, logits, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again, features, strict=True))
    assert loaded.pairs == student.pairs


def test_loss_is_the_weighted_sum_of_the_pairs(teacher):
    student = _two_pair_student(teacher).eval()
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in teacher.modules())
    objective = RRM(teacher, ce_weight=0.1, feature_weight=2.0, pairs=student.pairs)
    loss, logs = objective(student, x, y)
    with torch.no_grad():
        logits, (s_map, s_vec) = student(x, return_features=True)
        teacher(x)
        t_map, t_vec = objective.teacher_features()
        first = 1 - torch.nn.functional.cosine_similarity(s_map, t_map, dim=1).mean()
        second = 1 - torch.nn.functional.cosine_similarity(s_vec, t_vec, dim=1).mean()
    assert t_map.shape == (5, LAYER2_WIDTH, 4, 4)
    assert torch.allclose(logs["feat/layer2:blocks.0"], first, atol=1e-5)
    assert torch.allclose(logs["feat/fc@input:penultimate"], second, atol=1e-5)
    expected = 0.1 * torch.nn.functional.cross_entropy(logits, y) + 2.0 * (first + 0.5 * second)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert student.aligners["0"].weight.grad is not None and all(p.grad is None for p in teacher.parameters())
    objective.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in teacher.modules()) == hooks


def test_adversarial_matching_maximises_the_total_mismatch(teacher):
    student = _two_pair_student(teacher).eval()
    x = torch.rand(6, 1, 28, 28)
    objective = RRM(teacher, match_on="adversarial", eps=0.1, clean_weight=0.5, pairs=student.pairs)
    moved = objective.matching_inputs(student, x)
    assert (moved - x).abs().max() <= 0.1 + 1e-6
    _, targets = objective.teacher_outputs(x)
    with torch.no_grad():
        clean_gap = objective.mismatch(student(x, return_features=True)[1], targets)[0]
        moved_gap = objective.mismatch(student(moved, return_features=True)[1], targets)[0]
    assert moved_gap > clean_gap
    loss, logs = objective(student, x, torch.arange(6))
    assert {"feat", "feat_clean", "feat/layer2:blocks.0", "feat/fc@input:penultimate"} <= set(logs)
    objective.remove()


@pytest.mark.slow
def test_vit_student_matched_at_two_pairs_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "two"
    args = ["recipes/rrm.py", "--student-kwargs", *[f"{k}={v}" for k, v in VIT.items()],
            "--match", "layer2:blocks.0", "--match", "fc@input:penultimate:0.5", "--match-mode", "spatial",
            "--max-steps", "3", "--epoch-eval-examples", "0", "--eval-examples", "16", "--sweep-examples", "16",
            "--no-checks", "--output-dir", str(out)]
    result = run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"match layer2:blocks.0 (weight 1, teacher ({LAYER2_WIDTH}, 4, 4), on a 4x4 grid)" in result.stdout
    assert "feat/layer2:blocks.0=" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert [p["teacher_layer"] for p in config["rrm"]["pairs"]] == ["layer2", "fc@input"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_layer"] == "layer2, fc@input" and metrics["steps"] == 3

    student = RRMStudent.from_pretrained(out)
    x = torch.rand(4, 1, 28, 28)
    logits, features = student(x, return_features=True)
    assert [f.shape for f in features] == [(4, LAYER2_WIDTH, 4, 4), (4, TEACHER_WIDTH)]
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # the trained student, folded
    data = timm.data.resolve_data_config({}, model=plain)
    normalized = (x - torch.tensor(data["mean"]).view(1, -1, 1, 1)) / torch.tensor(data["std"]).view(1, -1, 1, 1)
    assert torch.allclose(plain(normalized), logits, atol=1e-5)
    assert not any("aligners" in key for key in plain.state_dict())


def test_without_match_the_single_pair_stays_as_before_unless_spatial():
    from rrm_hub.config.runs import LayersConfig

    layers, student_layer = LayersConfig(teacher_layer="layer2", mode="pooled"), "blocks.1"
    assert layers.matches(student_layer) is None  # the run builds exactly what it built before --match existed
    layers.mode = "spatial"
    assert layers.matches(student_layer) == [Match("layer2", "blocks.1", 1.0)]
    layers.pairs, student_layer = ["layer2:blocks.1:2"], None
    with pytest.raises(RRMError, match="--match replaces"):
        layers.matches(student_layer)
    layers.teacher_layer = None
    assert layers.matches(student_layer) == [Match("layer2", "blocks.1", 2.0)]
