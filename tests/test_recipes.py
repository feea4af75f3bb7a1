"""End-to-end runs of the recipes in fresh processes, as a user would start them."""

import json
import shutil

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rrm_hub import RRMStudent, load_teacher

from .conftest import call_recipe, load_recipe, run_here, run_recipe

QUICK = ["--max-steps", "3", "--epoch-eval-examples", "32", "--eval-examples", "64", "--sweep-examples", "32",
         "--eval-steps", "3"]
ACCELERATE = [shutil.which("accelerate") or "accelerate", "launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
def test_rrm_recipe_through_accelerate_launch(tmp_path):
    out = tmp_path / "student"
    result = run_recipe(["recipes/rrm.py", *QUICK, "--output-dir", str(out)], launcher=ACCELERATE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student" in result.stdout and "teacher" in result.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "rrm_head.safetensors", "README.md", "metrics.json",
            "robustness.png"} <= files
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "eps", "norm", "teacher", "student", "method",
                "train_seconds", "teacher_clean_accuracy", "teacher_robust_accuracy"):
        assert key in metrics
    assert metrics["method"] == "rrm" and metrics["eps"] == 0.3 and metrics["steps"] == 3
    assert set(metrics["robust_accuracy"]) == {"pgd3", "worst_case"} and 0 <= metrics["robust_accuracy"]["pgd3"] <= 1
    assert set(metrics["checks"]) == {"large_eps", "more_steps", "black_box", "monotone_in_eps"}
    assert metrics["teacher_robust_accuracy"]["pgd3"] > 0.5  # the bundled teacher is robust
    student = RRMStudent.from_pretrained(out)
    assert student(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    card = (out / "README.md").read_text()
    assert "model-index" in card  # the card says how the default (adversarial) matching moved the images
    assert "cheap attack on the student" in card and "1-step attack within eps 0.3, raising the student's " \
        "cross-entropy, each image's attack starting where it ended the epoch before, steps of 0.5 x eps" in card
    assert "no adversarial examples" not in card
    assert metrics["rrm_options"]["attack_loss"] == "ce" and metrics["rrm_options"]["attack"] == "fgsm"
    assert metrics["rrm_options"]["match_start"] == "previous"


@pytest.mark.parametrize("method, named, attack", [
    ("nfgsm_at", "N-FGSM-AT", "N-FGSM (random start of 2 eps"),
    ("atta_at", "ATTA", "each image's attack starting where it ended the epoch before"),
])
@pytest.mark.slow
def test_adversarial_training_recipe_writes_a_teacher_folder(tmp_path, method, named, attack):
    out = tmp_path / "teacher"
    args = ["recipes/adversarial_train.py", "--model", "resnet18", "--model-kwargs", "layers=(1,1,1,1)",
            "channels=(8,8,8,8)", "--method", method, *QUICK, "--output-dir", str(out)]
    result = run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= {p.name for p in out.iterdir()}
    teacher = load_teacher(str(out))
    assert teacher.num_classes == 10 and teacher(torch.rand(1, 1, 28, 28)).shape == (1, 10)
    card = (out / "README.md").read_text()
    assert "recipes/adversarial_train.py" in card and named in card and attack in card
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]  # ours, not timm's a1_in1k weights'
    assert cfg["input_size"] == [1, 28, 28] and not {"tag", "paper_ids", "test_input_size"} & set(cfg)


@pytest.mark.slow
def test_keep_best_ends_with_the_epoch_most_robust_on_held_out_images(tmp_path):
    out = tmp_path / "student"
    code, stderr = call_recipe("rrm.py", [
        "--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--train-split",
        "train[:1000]", "--batch-size", "250", "--epochs", "3", "--holdout", "48", "--keep-best", "--eval-examples",
        "16", "--sweep-examples", "16", "--eval-steps", "1", "--no-checks", "--output-dir", str(out)])
    assert code == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    best = max(range(3), key=lambda i: (history[i]["pgd10"], -i))  # the first of equals
    assert metrics["selected_epoch"] == {"epoch": best + 1, "pgd10": history[best]["pgd10"]}
    assert history[-1]["best_epoch"] == best + 1 and metrics["epochs"] == 3
    saved = RRMStudent.from_pretrained(out).state_dict()
    kept = load_file(out / "checkpoints" / "best-epoch.safetensors")
    assert kept and all(torch.equal(saved[k], v) for k, v in kept.items())
    assert f"weights of epoch {best + 1} of 3: the highest PGD-10 accuracy on 48 training images held out" in (
        out / "README.md").read_text()


@pytest.fixture(scope="module")
def three_class_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "three"
    images = [Image.new("L", (28, 28), color=i * 20) for i in range(9)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2] * 3}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("args,message", [
    (["--teacher", "./missing-teacher"], "teacher './missing-teacher' not found"),
    (["--teacher-layer", "layer9"], "has no layer 'layer9' (near matches: layer"),
    (["--student", "vit_nonexistent_model"], "timm has no model 'vit_nonexistent_model'"),
    (["--eps", "-1"], "eps must be >= 0"),
    (["--dataset", "THREE"], "teacher predicts 10 classes but the dataset has 3"),
    (["--eval-examples", "-5"], "--eval-examples must be >= 0"),
    (["--eval-steps", "0"], "--eval-steps must be >= 1"),
    (["--match-eps", "-1"], "--match-eps must be >= 0"),
    (["--preflight", "--preflight-steps", "0"], "--preflight-steps must be >= 1"),
    (["--student-kwargs", "img_size"], "'img_size' is not key=value"),
    (["--match", "layer2:blocks.0", "--teacher-layer", "layer2"], "--match replaces --teacher-layer/--student-layer"),
    (["--match", "layer2"], "--match 'layer2' is not TEACHER_LAYER:STUDENT_LAYER[:WEIGHT]"),
    (["--match", "fc@input:blocks.0", "--match-mode", "spatial"], "the teacher layer 'fc@input' is a vector"),
])
def test_bad_input_gives_one_line_errors(tmp_path, three_class_dataset, args, message):
    args = [str(three_class_dataset) if a == "THREE" else a for a in args]
    result = run_here(["recipes/rrm.py", *QUICK, "--output-dir", str(tmp_path / "out"), *args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_a_launch_whose_processes_would_train_alone_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate set, while this process sees no group
    result = run_here(["recipes/rrm.py", *QUICK, "--output-dir", str(tmp_path / "out")])
    assert result.returncode == 2 and "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_preflight_reports_whether_robustness_moves(tmp_path):
    out = tmp_path / "pre"
    result = run_here(["recipes/rrm.py", "--preflight", "--preflight-steps", "3", "--eval-examples", "40",
                         "--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)",
                         "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "preflight.json").read_text())
    assert [row["eps"] for row in report["rows"]] == [0.15, 0.3] and report["num_examples"] == 40
    assert report["rows"][1]["teacher"] > 0.4 and isinstance(report["moving"], bool)
    assert "preflight after 3 steps" in result.stdout and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_study_runs_each_variant_and_tabulates(tmp_path):
    out = tmp_path / "study"
    extra = "--max-steps 2 --epoch-eval-examples 0 --eval-examples 16 --sweep-examples 16"
    result = run_here(["recipes/study.py", "--variants", "cnn/adversarial", "--eps-sweep", "0.1", "0.3",
                       "--extra", extra, "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    [row] = study["rows"]
    assert row["variant"] == "cnn/adversarial" and row["seed"] == 0 and row["lr"] == 3e-3
    assert set(row["sweep"]) == {"0.1", "0.3"} and row["steps"] == 2 and 0 <= row["clean"] <= 1
    assert "--match-on adversarial" in row["command"] and "--seed 0" in row["command"]
    assert study["summary"][0]["robust"] == row["robust"] and study["summary"][0]["teacher_contribution"] is None
    table = (out / "study.md").read_text()
    assert "| cnn/adversarial |" in table and "eps 0.3" in table and (out / "study.png").exists()
    bad = run_here(["recipes/study.py", "--variants", "vit/nothing", "--output-dir", str(out)])
    assert bad.returncode != 0 and "unknown variant" in bad.stderr and "Traceback" not in bad.stderr


def test_the_study_compares_each_variant_at_its_best_rate_with_its_teacherless_twin(tmp_path):
    from rrm_hub.runs import study as report

    module = load_recipe("study.py")
    rows = [{"variant": "vit/rslad", "lr": 1e-3, "seed": 1, "robust": 0.30, "clean": 0.9},
            {"variant": "vit/rslad", "lr": 1e-3, "seed": 0, "robust": 0.40, "clean": 0.8},
            # the screening (seed 0) chose 1e-3, and it stays chosen though its mean over seeds (0.35) is lower
            {"variant": "vit/rslad", "lr": 2e-3, "seed": 0, "robust": 0.36, "clean": 0.9},
            {"variant": "vit/atta_at", "lr": 2e-3, "seed": 0, "robust": 0.20, "clean": 0.9},
            {"variant": "vit/atta_at", "lr": 1e-3, "seed": 0, "robust": 0.10, "clean": 0.9},
            {"variant": "cnn/kd", "lr": 1e-3, "seed": 0, "robust": 0.0, "clean": 0.99},
            {"variant": "vit/kd", "error": "boom"}]
    assert report.best_lrs(rows) == {"vit/rslad": 1e-3, "vit/atta_at": 2e-3, "cnn/kd": 1e-3}
    rslad, twin, kd = report.contributions(rows, "atta_at")
    assert (rslad["seeds"], rslad["lowest"], rslad["highest"], rslad["by"]) == (2, 0.30, 0.40, "pgd20")
    assert rslad["robust"] == pytest.approx(0.35) and rslad["teacher_contribution"] == pytest.approx(0.15)
    assert twin["teacher_contribution"] is None and kd["teacher_contribution"] is None  # no cnn/atta_at run
    assert "+15.0 points" in report.summary_table([rslad, twin, kd], "atta_at")
    # the final suite replaces the screening where every seed of the best rate has it; the twin must have it too
    final = [{**r, "final": {"suite": "autoattack-standard", "clean": 0.9, "robust": r["robust"] - 0.05}}
             if r.get("lr") == 1e-3 and r["variant"] == "vit/rslad" else r for r in rows]
    rslad, twin, _ = report.contributions(final, "atta_at")
    assert rslad["by"] == "autoattack-standard" and rslad["robust"] == pytest.approx(0.30)
    # the twin was measured by PGD-20 only: the two are compared by their screenings
    assert rslad["contribution_by"] == "pgd20" and rslad["teacher_contribution"] == pytest.approx(0.15)
    assert "+15.0 points (pgd20)" in report.summary_table([rslad, twin, kd], "atta_at")
    report.plot_contributions([twin, kd], "atta_at", tmp_path / "none.png")  # no variant has a twin: no plot
    summary = report.contributions(rows, "atta_at")
    report.plot_contributions(summary, "atta_at", tmp_path / "contribution.png")
    assert (tmp_path / "contribution.png").stat().st_size > 0 and not (tmp_path / "none.png").exists()
    config = module.StudyConfig(norm="l2", eps=2.0)
    rrm = module.command(*module.variants()["vit/rslad"], config, tmp_path, seed=3)
    baseline = module.command(*module.variants()["vit/atta_at"], config, tmp_path, seed=3)
    assert rrm[rrm.index("--teacher") + 1] == "default-l2" and "--teacher" not in baseline
    for cmd in (rrm, baseline):
        assert cmd[cmd.index("--norm") + 1] == "l2" and cmd[cmd.index("--seed") + 1] == "3"
    bad = run_here(["recipes/study.py", "--twin", "nope", "--variants", "vit/kd", "--output-dir", str(tmp_path)])
    assert bad.returncode == 2 and "--twin nope is not a baseline; choose one of atta_at, pgd_at" in bad.stderr


def test_the_study_tunes_each_variant_in_length_too(tmp_path):
    from rrm_hub.runs import study as report

    module = load_recipe("study.py")
    # the twin overfits with the whole budget and is compared at half of it; the method keeps the whole budget
    rows = [{"variant": "vit/atta_at", "lr": 2e-3, "length": 1.0, "seed": 0, "robust": 0.50, "clean": 0.8},
            {"variant": "vit/atta_at", "lr": 2e-3, "length": 0.5, "seed": 0, "robust": 0.55, "clean": 0.8},
            {"variant": "vit/adaad", "lr": 2e-3, "length": 0.5, "seed": 0, "robust": 0.45, "clean": 0.8},
            {"variant": "vit/adaad", "lr": 2e-3, "seed": 0, "robust": 0.54, "clean": 0.8},  # older rows: length 1
            {"variant": "vit/adaad", "lr": 2e-3, "length": 1.0, "seed": 1, "robust": 0.56, "clean": 0.8}]
    assert report.best_settings(rows) == {"vit/atta_at": (2e-3, 0.5), "vit/adaad": (2e-3, 1.0)}
    twin, adaad = report.contributions(rows, "atta_at")
    assert (twin["length"], twin["robust"]) == (0.5, 0.55) and adaad["seeds"] == 2
    assert adaad["teacher_contribution"] == pytest.approx(0.0)
    summary = report.summary_table([twin, adaad], "atta_at")
    assert "| vit/atta_at | 0.002 (50% of budget) | 1 |" in summary and "| vit/adaad | 0.002 | 2 |" in summary
    report.plot_lengths(rows, 40, tmp_path / "lengths.png", 0.1)
    assert (tmp_path / "lengths.png").stat().st_size > 0
    config = module.StudyConfig(budget=40, lengths=[0.5, 1.0])
    twin_runs = [module.command(*module.variants()["vit/atta_at"], config, tmp_path, length=share)
                 for share in config.lengths]
    epochs = [cmd[len(cmd) - 1 - cmd[::-1].index("--epochs") + 1] for cmd in twin_runs]  # the last --epochs wins
    assert epochs == ["10", "20"]  # ATTA-AT: two natural steps a step
    bad = run_here(["recipes/study.py", "--lengths", "1.5", "--output-dir", str(tmp_path)])
    assert bad.returncode == 2 and "--lengths" in bad.stderr


@pytest.mark.slow
def test_the_study_tunes_each_variant_counts_the_teacher_and_resumes(tmp_path):
    out = tmp_path / "study"
    extra = "--max-steps 1 --batch-size 8 --epoch-eval-examples 0 --eval-examples 8 --sweep-examples 0"
    args = ["recipes/study.py", "--variants", "cnn/kd", "cnn/atta_at", "--lrs", "1e-3", "3e-3", "--seeds", "0", "1",
            "--budget", "4", "--eps-sweep", "0.3", "--final-suite", "standard", "--final-examples", "8", "--jobs", "2",
            "--extra", extra, "--output-dir", str(out)]
    result = run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    ratio = study["teacher_ratios"]["cnn"]
    assert ratio > 0 and "cnn: a teacher forward costs" in result.stdout
    rows = study["rows"]
    assert sorted((r["variant"], r["lr"], r["seed"]) for r in rows if r["seed"] == 0) == [
        ("cnn/atta_at", 1e-3, 0), ("cnn/atta_at", 3e-3, 0), ("cnn/kd", 1e-3, 0), ("cnn/kd", 3e-3, 0)]
    best = {s["variant"]: s["lr"] for s in study["summary"]}
    for row in rows:  # the second seed runs at the best rate only, and the best rate's runs get the final suite
        assert row["seed"] == 0 or row["lr"] == best[row["variant"]]
        assert ("final" in row) == (row["lr"] == best[row["variant"]])
    kd = next(r for r in rows if r["variant"] == "cnn/kd")
    assert kd["step_cost"] == pytest.approx(1 + ratio / 3, rel=1e-3)  # a teacher forward at its measured cost
    assert f"--epochs {max(1, round(4 / kd['step_cost']))}" in kd["command"]
    assert all(s["by"] == "autoattack-standard" and s["seeds"] == 2 for s in study["summary"])
    assert study["summary"][0]["teacher_contribution"] is not None
    logs = {p: p.stat().st_mtime for p in out.rglob("*.log")}
    again = run_here([*args[:-2], "--teacher-ratio", str(ratio), "--output-dir", str(out)])  # resumed: nothing runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in out.rglob("*.log")} == logs
    assert json.loads((out / "study.json").read_text())["summary"] == study["summary"]
    # the final suite on the twin only: KD is reported, and compared with the twin, by the PGD-20 screening
    twin_only = run_here([*args[:-2], "--teacher-ratio", str(ratio), "--final-variants", "cnn/atta_at",
                          "--output-dir", str(out)])
    assert twin_only.returncode == 0, twin_only.stderr[-3000:]
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert all(("final" in r) == (r["variant"] == "cnn/atta_at" and r["lr"] == best[r["variant"]]) for r in rows)
    kd, twin = json.loads((out / "study.json").read_text())["summary"]
    assert (kd["by"], kd["contribution_by"], twin["by"]) == ("pgd20", "pgd20", "autoattack-standard")
    stray = run_here([*args[:-2], "--final-variants", "cnn/rslad", "--output-dir", str(out)])
    assert stray.returncode == 2 and "--final-variants cnn/rslad: not in --variants" in stray.stderr


def test_a_teacher_cache_is_paid_for_up_front_in_the_study_budget(tmp_path):
    module = load_recipe("study.py")
    config = module.StudyConfig(budget=40)
    known = module.variants()
    live = module.command(*known["vit/default-live"], config, tmp_path, teacher_ratio=1.2)
    cached = module.command(*known["vit/default-cached"], config, tmp_path, teacher_ratio=1.2)
    twin = module.command(*known["vit/atta_at"], config, tmp_path)
    def epochs_of(cmd):  # the last --epochs wins
        return int(cmd[len(cmd) - 1 - cmd[::-1].index("--epochs") + 1])

    epochs = {name: epochs_of(cmd) for name, cmd in (("live", live), ("cached", cached), ("twin", twin))}
    assert epochs == {"live": round(40 / 2.4), "cached": round((40 - 0.4) / 2.0), "twin": 20}


def test_the_data_gap_plots_the_teachers_contribution_against_the_students_images(tmp_path):
    studies = []
    for images, contribution in ((1000, 0.08), (2000, 0.03)):
        run = tmp_path / f"n{images}" / "vit__rslad-seed0"
        run.mkdir(parents=True)
        (run / "run_config.yaml").write_text(f"data:\n  train_split: train[:{images}]\ntraining:\n  seed: 0\n")
        summary = [{"variant": "vit/rslad", "by": "autoattack-standard", "robust": 0.3, "seeds": 1,
                    "teacher_contribution": contribution},
                   {"variant": "vit/atta_at", "by": "autoattack-standard", "robust": 0.3 - contribution, "seeds": 1,
                    "teacher_contribution": None}]
        (tmp_path / f"n{images}" / "study.json").write_text(json.dumps(
            {"rows": [{"variant": "vit/rslad", "folder": str(run)}], "summary": summary}))
        studies.append(str(tmp_path / f"n{images}"))
    result = run_here(["recipes/study.py", "--combine", *studies, "--output-dir", str(tmp_path / "gap")])
    assert result.returncode == 0, result.stderr[-2000:]
    gap = json.loads((tmp_path / "gap" / "data-gap.json").read_text())
    assert [(p["variant"], p["images"], p["teacher_contribution"]) for p in gap["points"]] == [
        ("vit/rslad", 1000, 0.08), ("vit/rslad", 2000, 0.03)]
    assert (tmp_path / "gap" / "data-gap.png").stat().st_size > 0 and "+8.0 points over the twin" in result.stdout
    missing = run_here(["recipes/study.py", "--combine", str(tmp_path / "nothing"), "--output-dir", str(tmp_path)])
    assert missing.returncode == 2 and "no study.json there" in missing.stderr
