"""Typed run settings: flags generated from the config dataclasses, YAML files, run_config.yaml, the library call."""

import dataclasses
import json

import pytest
import yaml

from rrm_hub import DistillConfig, RRMError, cli, distill
from rrm_hub.config.runs import AdversarialTrainConfig
from rrm_hub.runs.reference import recipe_configs, reference

from .conftest import ROOT, call_recipe, load_recipe, run_here

QUICK = ["--epoch-eval-examples", "16", "--eval-examples", "16", "--sweep-examples", "16", "--eval-steps", "1",
         "--no-checks"]

# every flag each recipe had before its flags were generated from the config dataclasses
FLAGS = {
    "rrm.py": "--batch-size --cache-teacher --ce-weight --channels-last --clean-weight --compile --dataset "
    "--dataset-config --epoch-eval-examples --epochs --eps --eps-sweep --eval-examples --eval-steps --feature-loss "
    "--feature-weight --grad-accum --hflip --holdout --hub-model-id --hub-private --hub-revision "
    "--ignore-teacher-labels --image-column --image-size --kd-temperature --kd-weight --keep-best --keep-checkpoints "
    "--label-column --list-layers --lr --match --match-attack --match-attack-loss --match-eps --match-eps-warmup "
    "--match-mode --match-on --match-start --match-step-size --match-steps --max-steps --mixed-precision --no-checks "
    "--noise --norm --num-workers --optimizer --output-dir --pad --preflight --preflight-steps --push-to-hub --resume "
    "--save-every --seed --student --student-kwargs --student-layer --suite --sweep-examples --sweep-steps --teacher "
    "--teacher-arch --teacher-checkpoint --teacher-input --teacher-kwargs --teacher-layer --teacher-num-classes "
    "--teacher-revision --test-split --train-split --trust-remote-code --warmup --weight-decay",
    "adversarial_train.py": "--attack-steps --batch-size --channels-last --compile --dataset --dataset-config "
    "--epoch-eval-examples --epochs --eps --eps-sweep --eps-warmup --eval-examples --eval-steps --grad-accum --hflip "
    "--holdout --hub-model-id --hub-private --hub-revision --image-column --image-size --keep-best --keep-checkpoints "
    "--label-column --lr --max-steps --method --mixed-precision --model --model-kwargs --no-checks --norm "
    "--num-workers --optimizer --output-dir --pad --push-to-hub --resume --save-every --seed --suite --sweep-examples "
    "--sweep-steps --test-split --train-split --warmup --weight-decay",
    "benchmark.py": "--attack-steps --batch-size --cache-teacher --ce-weight --channels-last --clean-weight --compile "
    "--dataset --dataset-config --epoch-eval-examples --epochs --eps --eps-sweep --eps-warmup --eval-examples "
    "--eval-steps --feature-loss --feature-weight --grad-accum --hflip --holdout --image-column --image-size "
    "--kd-temperature --kd-weight --keep-best --keep-checkpoints --label-column --lr --match-attack "
    "--match-attack-loss --match-eps --match-eps-warmup --match-on --match-start --match-step-size --match-steps "
    "--max-steps --methods --mixed-precision --no-checks --noise --norm --num-workers --optimizer --output-dir --pad "
    "--quick --replays --resume --save-every --seed --student --student-kwargs --student-layer --suite "
    "--sweep-examples --sweep-steps --target --target-fraction --teacher --teacher-arch --teacher-checkpoint "
    "--teacher-input --teacher-kwargs --teacher-num-classes --teacher-revision --test-split --train-split "
    "--trust-remote-code --warmup --weight-decay",
    "evaluate.py": "--arch --batch-size --checkpoint --dataset --dataset-config --eps --eps-sweep --hflip "
    "--image-column --image-size --label-column --model --model-kwargs --n-examples --no-checks --norm --num-classes "
    "--num-workers --output-dir --pad --revision --seed --steps --suite --test-split --train-split "
    "--trust-remote-code",  # --square-queries went with torchattacks: AutoAttack's versions fix their budgets
    "study.py": "--eps --eps-sweep --extra --jobs --list --output-dir --variants",
}


@pytest.mark.parametrize("script", list(FLAGS))
def test_every_earlier_flag_is_generated(script):
    parser = cli.build_parser(recipe_configs()[script]())
    flags = {option for action in parser._actions for option in action.option_strings}
    assert set(FLAGS[script].split()) <= flags and "--config" in flags


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--eps-sweep", "0.1", "-0.2"], "--eps-sweep values must be >= 0, got -0.2"),
    (["--match-step-size", "0"], "--match-step-size must be > 0, got 0"),
    (["--teacher-num-classes", "0"], "--teacher-num-classes must be >= 1"),
    (["--cache-teacher", "--pad", "2"], "--cache-teacher needs the training images unaugmented"),
    (["--cache-teacher", "--match-on", "noise"], "--cache-teacher holds the teacher's outputs on clean images only"),
    (["--cache-teacher", "--augment", "timm"], "--cache-teacher needs the training images on disk and unaugmented"),
    (["--cache-teacher", "--method", "adaad"], "it serves --method rrm, ard, rslad, not adaad"),
    (["--suite", "standard", "--eval-steps", "5"], "AutoAttack's standard version has fixed settings"),
])
def test_bounds_and_rules_are_one_line_errors(argv, message):
    with pytest.raises(RRMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.parse(DistillConfig, argv)


def test_yaml_sections_flags_override_and_bad_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  epochs: 7\n  lr: 2.0e-3\nrrm:\n  match_on: noise\n")
    config = cli.parse(DistillConfig, ["--config", str(path), "--epochs", "3"])
    assert (config.training.epochs, config.training.lr, config.rrm.match_on) == (3, 2e-3, "noise")
    later = tmp_path / "later.yaml"
    later.write_text(f"base: {path.name}\nrrm:\n  kd_weight: 1.0\n")
    config = cli.parse(DistillConfig, ["--config", str(later)])
    assert (config.training.epochs, config.rrm.match_on, config.rrm.kd_weight) == (7, "noise", 1.0)
    for text, message in [("training:\n  epoch: 3\n", "unknown setting 'epoch' in .*training"),
                          ("training:\n  epochs: ten\n", "--epochs must be an integer, got 'ten'"),
                          ("rrm:\n  match_on: sideways\n", "unknown --match-on 'sideways'; use one of"),
                          ("training: [1, 2\n", "is not valid YAML at line"), ("- 1\n- 2\n", "by section")]:
        path.write_text(text)
        with pytest.raises(RRMError, match=message):
            cli.parse(DistillConfig, ["--config", str(path)])
    with pytest.raises(RRMError, match="cannot read config file"):
        cli.parse(DistillConfig, ["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in (ROOT / "recipes" / "configs").glob("rrm-*.yaml")))
def test_method_configs_are_valid_rrm_runs(path):
    config = cli.parse(DistillConfig, ["--config", str(ROOT / path)])
    assert config.rrm.match_on in ("adversarial", "clean")


def test_the_default_recipe_file_spells_out_the_defaults():
    config = cli.parse(DistillConfig, ["--config", str(ROOT / "recipes" / "configs" / "rrm-vit.yaml")])
    assert config.student.spec() == DistillConfig().student.spec()
    assert dataclasses.replace(config, student=DistillConfig().student) == DistillConfig()


def study_variants() -> dict:
    return load_recipe("study.py").variants()


def test_study_variants_become_the_recipes_flags():
    table = study_variants()
    assert len(table) == 6 * (33 + 2)  # students x (matchings + baselines)
    recipe, flags = table["vit/adaad-cutmix-random"]
    assert flags == ["--method", "adaad", "--match-start", "random", "--distill-on", "cutmix"]
    recipe, flags = table["cnn/adversarial-kd"]
    assert recipe == "rrm.py" and "--kd-weight" in flags and "--clean-weight" in flags  # from its base file
    recipe, flags = table["vit/pgd_at"]
    assert recipe == "adversarial_train.py" and flags[:2] == ["--model", "vit_tiny_patch16_224"]
    for recipe, flags in table.values():
        cls = DistillConfig if recipe == "rrm.py" else AdversarialTrainConfig
        cli.parse(cls, flags)


def test_the_teacher_is_cached_wherever_that_gives_the_same_targets():
    run = cli.parse(DistillConfig, [])
    assert run.rrm.cache_teacher is None and run.rrm.caches(run.method, run.data)  # unaugmented digits, clean targets
    assert run.rrm.caches("ard", run.data) and not run.rrm.caches("adaad", run.data)  # AdaAD's teacher sees attacks
    assert not run.rrm.caches(run.method, dataclasses.replace(run.data, pad=2))  # shifted views: live
    assert not run.rrm.caches(run.method, run.data, augment="timm")  # random-resized photos: live
    assert not run.rrm.caches(run.method, run.data, pairs=2)  # several layers: live
    matched = cli.parse(DistillConfig, ["--teacher-input", "matched"])
    assert not matched.rrm.caches(matched.method, matched.data)
    off = cli.parse(DistillConfig, ["--no-cache-teacher"])
    assert not off.rrm.caches(off.method, off.data) and "--no-cache-teacher" in cli.to_flags(off)
    assert cli.to_flags(run) == []
    with pytest.raises(RRMError, match="--pad 0"):  # asked for where it cannot give the same targets: refused
        cli.parse(DistillConfig, ["--cache-teacher", "--pad", "2"])


@pytest.mark.slow
def test_a_run_writes_its_config_and_reruns_it(tmp_path):
    """The issue's check: `--config OUT/run_config.yaml` writes the same configuration (output folder aside)."""
    first, second = tmp_path / "out", tmp_path / "out2"
    code, stderr = call_recipe("rrm.py", ["--max-steps", "5", *QUICK, "--output-dir", str(first)])
    assert code == 0, stderr[-2000:]
    code, stderr = call_recipe("rrm.py", ["--config", str(first / "run_config.yaml"), "--output-dir", str(second)])
    assert code == 0, stderr[-2000:]
    written = [yaml.safe_load((folder / "run_config.yaml").read_text()) for folder in (first, second)]
    assert written[0]["training"].pop("output_dir") == str(first)
    assert written[1]["training"].pop("output_dir") == str(second)
    assert written[0] == written[1] and written[0]["training"]["max_steps"] == 5
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (first, second)]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 5
    card = (first / "README.md").read_text()  # the card's command reproduces the run on its own
    assert f"python recipes/rrm.py --max-steps 5 --output-dir {first}" in card


@pytest.mark.slow
def test_distill_is_a_library_call(tmp_path):
    config = cli.parse(DistillConfig, ["--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)",
                                       "channels=(8,8,8,8)", "--max-steps", "2", *QUICK,
                                       "--output-dir", str(tmp_path / "lib")])
    result = distill(config)
    assert result.output_dir == tmp_path / "lib" and result.metrics["steps"] == 2
    assert (result.output_dir / "run_config.yaml").exists() and result.model is not None


@pytest.mark.slow
def test_l2_runs_end_to_end(tmp_path):
    """The paper's other threat model: --norm l2 --eps 2.0 through the default recipe."""
    out = tmp_path / "l2"
    result = run_here(["recipes/rrm.py", "--norm", "l2", "--eps", "2.0", "--max-steps", "3", *QUICK,
                         "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["norm"], metrics["eps"], metrics["rrm_options"]["eps"]) == ("l2", 2.0, 2.0)
    assert [point["eps"] for point in metrics["sweep"]] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert 0 <= metrics["teacher_robust_accuracy"]["worst_case"] <= metrics["teacher_clean_accuracy"]


def test_cli_reference_is_current():
    stale = "docs/cli.md is stale: python -m rrm_hub.runs.reference > docs/cli.md"
    assert (ROOT / "docs" / "cli.md").read_text() == reference(), stale
