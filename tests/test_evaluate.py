"""Attack suites, worst-case aggregation and gradient-masking checks (rrm_hub.evaluation, recipes/evaluate.py)."""

import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rrm_hub import RRMStudent, evaluate, make_loader, pgd
from rrm_hub.evaluation.checks import GradientMaskingWarning, MaskingChecks, check_monotone, check_more_steps
from rrm_hub.evaluation.evaluate import attack_hits, evaluate_suite
from rrm_hub.evaluation.suites import WORST_CASE, AutoAttackPart, AutoAttackRun, worst_case

from .conftest import ROOT, run_here, run_recipe


class Quantized(nn.Module):
    """Gradient masking by construction: `torch.round` on the input has zero gradient almost everywhere."""

    def __init__(self, model: nn.Module, levels: int = 4):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def loader(mnist):
    return make_loader(mnist, "test", 200, limit=200)


@pytest.mark.slow
def test_an_undefended_model_falls_to_zero_under_pgd_and_apgd(undefended, loader):
    attacks = {"pgd": pgd(0.3), "apgd-ce": AutoAttackPart("apgd-ce", 0.3, budget=20),
               "apgd-t": AutoAttackPart("apgd-t", 0.3, budget=10), "apgd-l2": AutoAttackPart("apgd-ce", 3.0, "l2", 20)}
    result = evaluate(undefended, loader, attacks)
    assert result["clean_accuracy"] > 0.85
    assert all(accuracy < 0.02 for accuracy in result["robust_accuracy"].values()), result


def textbook_pgd(model, x, y, eps, steps):
    """Madry et al.'s L-inf PGD, written out: a uniform random start, signed steps of 2.5 eps / steps, projection."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


@pytest.mark.slow
def test_our_pgd_agrees_with_textbook_pgd_and_autoattack_is_stronger(undefended, loader):
    eps, steps = 0.1, 20
    ours = evaluate(undefended, loader, {"pgd": pgd(eps, steps=steps)})["robust_accuracy"]["pgd"]
    theirs = torch.cat([undefended(textbook_pgd(undefended, x, y, eps, steps)).argmax(1) == y
                        for x, y in loader]).float().mean().item()
    assert 0.2 < theirs < 0.8  # a budget where the attack's strength shows
    assert abs(ours - theirs) < 0.05
    apgd = evaluate(undefended, loader, {"apgd": AutoAttackPart("apgd-ce", eps, budget=50)})["robust_accuracy"]
    assert apgd["apgd"] <= ours + 0.02


def test_pgd_restarts_count_an_image_robust_only_if_every_start_failed(undefended, loader):
    one, three = (evaluate_suite(undefended, loader, 0.05, steps=5, restarts=r, checks=None)["robust_accuracy"]
                  for r in (1, 3))
    assert set(three) == {"pgd5x3", WORST_CASE} and 0.2 < one["pgd5"] < 0.9
    assert three[WORST_CASE] <= one[WORST_CASE]
    result = run_here(["recipes/evaluate.py", "--suite", "standard", "--restarts", "5"])
    assert result.returncode == 2 and "--restarts are for --suite pgd" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("kind,norm,eps", [("apgd-ce", "linf", 0.1), ("apgd-t", "l2", 1.0), ("square", "linf", 0.1),
                                           ("fab-t", "linf", 0.1)])
def test_autoattack_parts_stay_in_the_ball_and_leave_the_model_alone(undefended, loader, kind, norm, eps):
    x, y = next(iter(loader))
    model = nn.Sequential(undefended, nn.Dropout(0.0)).train()
    model[0].eval()  # a mixed train / eval model must come back exactly as it was
    undefended[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(3)
    expected_draw = torch.rand(4)
    torch.manual_seed(3)
    try:
        x_adv = AutoAttackPart(kind, eps, norm, budget=5)(model, x, y)
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        undefended[0].weight.requires_grad_(True)
    assert torch.equal(torch.rand(4), expected_draw)  # AutoAttack's reseeding does not leak out
    assert model.training and not model[0].training
    assert all(p.grad is None for p in model.parameters())
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-4).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (undefended(x_adv).argmax(1) != y).sum() > (undefended(x).argmax(1) != y).sum()


def marked_digits(n: int) -> TensorDataset:
    """Toy data: pixel 0 holds the label / 10, pixel 1 the example's index mod 6 (as a tenth)."""
    x = torch.zeros(n, 1, 2, 2)
    y = torch.arange(n) % 10
    x[:, 0, 0, 0], x[:, 0, 0, 1] = y / 10, (torch.arange(n) % 6) / 10
    return TensorDataset(x, y)


class ReadsPixel(nn.Module):
    """Predicts the class written in pixel 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(10 * x[:, 0, 0, 0, None] - torch.arange(10)) ** 2


def relabel_where(divisor: int):
    """An attack that fools exactly the examples whose index is a multiple of `divisor`."""

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chosen = torch.round(x[:, 0, 0, 1] * 10).long() % divisor == 0
        x_adv = x.clone()
        x_adv[chosen, 0, 0, 0] = ((y[chosen] + 1) % 10) / 10
        return x_adv

    return attack


def check_worst_case(n: int, accelerator=None) -> dict[str, float]:
    """Attack A fools S1 (indices = 0 mod 3), B fools S2 (indices = 0 mod 2); returns the accuracies."""
    loader = DataLoader(marked_digits(n), batch_size=8)
    hits = attack_hits(ReadsPixel(), loader, {"A": relabel_where(3), "B": relabel_where(2)}, accelerator)
    return {"n": hits["clean"].numel(), "clean": hits["clean"].float().mean().item(),
            "A": hits["A"].float().mean().item(), "B": hits["B"].float().mean().item(),
            WORST_CASE: worst_case(hits, ["A", "B"]).float().mean().item()}


def test_worst_case_is_taken_per_example():
    n = 60
    result = check_worst_case(n)
    outside_both = sum(1 for i in range(n) if i % 3 and i % 2)  # the complement of S1 | S2
    assert result["clean"] == 1.0 and result["A"] == pytest.approx(40 / 60) and result["B"] == pytest.approx(0.5)
    assert result[WORST_CASE] == pytest.approx(outside_both / n)
    assert result[WORST_CASE] < min(result["A"], result["B"])  # not the best single attack's accuracy


MULTI_PROCESS = """
import json, os, sys
sys.path.insert(0, ROOT)
os.environ["ACCELERATE_USE_CPU"] = "1"  # several CPU processes under torchrun
from accelerate import Accelerator
from tests.test_evaluate import check_worst_case
accelerator = Accelerator()
result = check_worst_case(37, accelerator)
if accelerator.is_main_process:
    print(json.dumps({**result, "processes": accelerator.num_processes}))
"""


@pytest.mark.slow
def test_two_processes_count_each_example_once(tmp_path):
    script = tmp_path / "worst_case.py"
    script.write_text(MULTI_PROCESS.replace("ROOT", repr(str(ROOT)), 1))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_recipe([str(script)], launcher=launcher, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["processes"] == 2 and numbers["n"] == 37  # 37 does not split evenly: no duplicates counted
    assert numbers[WORST_CASE] == pytest.approx(sum(1 for i in range(37) if i % 3 and i % 2) / 37)


QUICK_CHECKS = MaskingChecks(few_steps=10, many_steps=25, probe_queries=200)


@pytest.mark.slow
def test_an_honest_model_passes_the_checks(undefended, mnist):
    loader = make_loader(mnist, "test", 64, limit=64)
    result = evaluate_suite(undefended, loader, 0.05, "linf", "standard", checks=QUICK_CHECKS)
    robust = result["robust_accuracy"]
    assert list(robust) == ["apgd-ce", "apgd-t", "fab-t", "square", WORST_CASE]  # AutoAttack's order
    after = list(robust.values())
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)) and after[-1] == robust["square"]
    assert 0.1 < robust[WORST_CASE] < result["clean_accuracy"]
    assert result["attack_package"].startswith("pyautoattack ") and result["autoattack_checks"] == []
    assert set(result["checks"]) == {"large_eps", "more_steps", "black_box", "monotone_in_eps"}
    assert all(check["passed"] for check in result["checks"].values()), result["checks"]
    assert [p["eps"] for p in result["sweep"]] == [0.0, 0.05] and result["num_examples"] == 64


def test_the_versions_run_autoattacks_attacks_in_its_order():
    from rrm_hub import RRMError
    from rrm_hub.evaluation.suites import attack_suite

    assert AutoAttackRun("standard", 0.3).attacks() == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert AutoAttackRun("plus", 0.3).attacks() == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert AutoAttackRun("rand", 2.0, "l2").attacks() == ["apgd-ce", "apgd-dlr"]
    assert list(attack_suite("rand", 0.3)) == ["autoattack-rand"]
    with pytest.raises(RRMError, match="fixed settings"):
        attack_suite("standard", 0.3, steps=10)


@pytest.mark.slow
def test_the_standard_suite_is_autoattacks_own_run(undefended, mnist):
    """One batch through the suite gives exactly what pyautoattack's run_standard_evaluation gives on it."""
    from pyautoattack import AutoAttack

    x, y = next(iter(make_loader(mnist, "test", 32, limit=32)))
    stages = AutoAttackRun("standard", 0.05)(undefended, x, y)
    ours = undefended(stages["square"]).argmax(1) == y
    reference = AutoAttack(undefended, norm="Linf", eps=0.05, version="standard", seed=0)
    x_adv, _ = reference.run_standard_evaluation(x, y, batch_size=32)
    theirs = undefended(x_adv).argmax(1) == y
    assert torch.equal(ours, theirs) and 0 < ours.sum() < len(y)
    assert ((stages["square"] - x).abs().amax(dim=(1, 2, 3)) <= 0.05 + 1e-5).all()


@pytest.mark.slow
def test_a_gradient_masked_model_looks_robust_to_pgd_but_is_caught(undefended, loader, capsys):
    masked = Quantized(undefended)
    with pytest.warns(GradientMaskingWarning) as warned:
        result = evaluate_suite(masked, loader, 0.3, "linf", "pgd", checks=QUICK_CHECKS)
    messages = " ".join(str(w.message) for w in warned)
    assert "'black_box' FAILED" in messages and "'large_eps' FAILED" in messages
    assert result["robust_accuracy"]["pgd20"] > 0.8  # the undefended network underneath is at 0% here
    assert not result["checks"]["black_box"]["passed"] and not result["checks"]["large_eps"]["passed"]
    assert any(line.startswith("WARNING: gradient-masking check") for line in capsys.readouterr().out.splitlines())


def test_the_steps_and_monotonicity_checks_fail_when_they_should():
    checks = MaskingChecks()
    rising = [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.1, "accuracy": 0.5}, {"eps": 0.2, "accuracy": 0.6}]
    verdict = check_monotone(rising, checks, "accuracy")
    assert not verdict["passed"] and "rises 0.1 -> 0.2" in verdict["detail"]
    assert check_monotone(rising[:2], checks, "accuracy")["passed"]
    few, many = torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False])
    assert not check_more_steps({"check:few-steps": few, "check:many-steps": many}, checks)["passed"]
    assert check_more_steps({"check:few-steps": many, "check:many-steps": few}, checks)["passed"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small (untrained) rrm-hub student folder, so the recipe runs the full standard suite in seconds."""
    folder = tmp_path_factory.mktemp("models") / "small"
    torch.manual_seed(0)
    RRMStudent.for_teacher("resnet18", feature_dim=16, num_classes=10, input_size=(1, 28, 28),
                           model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)}).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_recipe_writes_metrics_and_plot(tmp_path, small_model):
    out = tmp_path / "eval"
    args = ["recipes/evaluate.py", "--model", str(small_model), "--n-examples", "64", "--suite", "standard",
            "--eps-sweep", "0.15", "0.3", "--output-dir", str(out)]
    result = run_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"metrics.json", "robustness.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 64 and metrics["suite"] == "standard" and metrics["eps"] == 0.3
    robust = metrics["robust_accuracy"]
    assert set(robust) == {"apgd-ce", "apgd-t", "fab-t", "square", WORST_CASE}
    assert robust[WORST_CASE] <= min(robust["apgd-ce"], robust["apgd-t"], robust["square"])
    assert metrics["attack_package"].startswith("pyautoattack") and isinstance(metrics["autoattack_checks"], list)
    assert [p["eps"] for p in metrics["sweep"]] == [0.0, 0.15, 0.3]
    assert metrics["sweep"][0]["accuracy"] == metrics["clean_accuracy"]
    assert set(metrics["checks"]) == {"large_eps", "more_steps", "black_box", "monotone_in_eps"}
    assert "worst_case" in result.stdout and "check black_box" in result.stdout


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, mnist):
    """`small_model`'s network trained naturally on the embedded digits for a few seconds: clean accuracy well above
    chance and robust accuracy at a small eps between nought and clean, so two attack runs can disagree."""
    folder = tmp_path_factory.mktemp("models") / "trained"
    torch.manual_seed(0)
    model = RRMStudent.for_teacher("resnet18", feature_dim=16, num_classes=10, input_size=(1, 28, 28),
                                   model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 8)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for x, y in make_loader(mnist, "train", 64):  # one epoch: about 85% of test digits right
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():  # BatchNorm's running statistics lag weights this young: measure them afresh
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        for x, _ in make_loader(mnist, "train", 500):
            model(x)
    model.eval().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_autoattack_alone_agrees_with_the_standard_suite(tmp_path, trained_model, mnist):
    """recipes/autoattack_alone.py (pyautoattack on the bare timm model, no rrm-hub code) and recipes/evaluate.py
    --suite standard give the same figure on the same images: the cross-check a teacher card's number gets."""
    from .test_idx import write_idx

    x, y = next(iter(make_loader(mnist, "test", 48, limit=48)))
    digits = tmp_path / "digits"
    digits.mkdir()
    for part in ("train", "t10k"):
        write_idx(digits / f"{part}-images-idx3-ubyte", (x[:, 0] * 255).round().numpy())
        write_idx(digits / f"{part}-labels-idx1-ubyte", y.numpy())
    alone = run_recipe(["recipes/autoattack_alone.py", "--model", str(trained_model), "--idx", str(digits),
                        "--n-examples", "48", "--eps", "0.05", "--output", str(tmp_path / "alone.json")])
    assert alone.returncode == 0, alone.stderr[-3000:]
    ours = run_here(["recipes/evaluate.py", "--model", str(trained_model), "--dataset", str(digits), "--suite",
                     "standard", "--eps", "0.05", "--no-checks", "--output-dir", str(tmp_path / "ours")])
    assert ours.returncode == 0, ours.stderr[-3000:]
    alone, ours = (json.loads(p.read_text()) for p in (tmp_path / "alone.json", tmp_path / "ours" / "metrics.json"))
    assert alone["clean_accuracy"] == pytest.approx(ours["clean_accuracy"]) and ours["num_examples"] == 48
    assert alone["clean_accuracy"] > 0.5 and 0 < alone["robust_accuracy"] < alone["clean_accuracy"]
    assert abs(alone["robust_accuracy"] - ours["robust_accuracy"][WORST_CASE]) <= 2 / 48


def test_push_results_writes_the_numbers_into_the_models_own_card(tmp_path, small_model):
    """--push-results --dry-run on a model in the Hugging Face cache: its card keeps what it had and gains the
    measured model-index results; without --dry-run, offline, a one-line error."""
    import os

    from huggingface_hub import ModelCard

    from .conftest import put_in_hub_cache

    repo = tmp_path / "repo"
    (repo).mkdir()
    for name in ("config.json", "model.safetensors", "rrm_head.safetensors"):
        (repo / name).write_bytes((small_model / name).read_bytes())
    (repo / "README.md").write_text("---\nlicense: mit\nmodel-index:\n- name: small\n  results:\n  - task:\n"
                                    "      type: image-classification\n    dataset:\n      name: cifar10\n"
                                    "      type: cifar10\n    metrics:\n    - type: accuracy\n      value: 0.5\n"
                                    "      name: top-1\n---\nA small model.\n")
    put_in_hub_cache(repo, "someone/small", os.environ["HF_HOME"])
    args = ["recipes/evaluate.py", "--model", "someone/small", "--n-examples", "16", "--steps", "2", "--no-checks",
            "--push-results", "--output-dir", str(tmp_path / "eval")]
    result = run_here([*args, "--dry-run"])
    assert result.returncode == 0, result.stderr[-3000:]
    card = ModelCard(result.stdout[result.stdout.index("---\n"):])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["top-1"] == 0.5 and card.data.license == "mit" and "A small model." in card.text
    assert values["clean accuracy"] == round(metrics["clean_accuracy"], 4)
    assert values["robust accuracy, PGD-2 (linf, eps=0.3)"] == round(metrics["robust_accuracy"]["worst_case"], 4)
    offline = run_here(args)
    assert offline.returncode == 2 and "cannot push while HF_HUB_OFFLINE=1" in offline.stderr
    bad = run_here(["recipes/evaluate.py", "--dry-run"])
    assert bad.returncode == 2 and "go with --push-results" in bad.stderr


def test_recipe_bad_input_is_one_line():
    result = run_here(["recipes/evaluate.py", "--eps", "0"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        ["error: --eps must be > 0 and --eps-sweep values >= 0"]


@pytest.mark.slow
def test_recipe_evaluates_a_bare_weight_file(tmp_path):
    """`--model ARCH --checkpoint FILE` (and `--arch` for a file spec) load the same weights as timm does."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = ["in_chans=1", "layers=(1,1,1,1)", "channels=(8,8,8,8)"]
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8))
    weights = str(tmp_path / "weights.safetensors")
    save_file(model.state_dict(), weights)
    out = tmp_path / "eval"
    result = run_here(["recipes/evaluate.py", "--model", "resnet18", "--checkpoint", weights,
                         "--model-kwargs", *kwargs, "--n-examples", "16", "--no-checks", "--steps", "2",
                         "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["num_examples"] == 16
    result = run_here(["recipes/evaluate.py", "--model", weights, "--arch", "resnet18",
                         "--model-kwargs", *kwargs, "--n-examples", "16", "--no-checks", "--steps", "2",
                         "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]


def test_autoattack_edges_are_handled(undefended):
    import logging

    from rrm_hub import RRMError
    from rrm_hub.evaluation.suites import autoattack_warnings

    empty = torch.zeros(0, 1, 28, 28)
    assert AutoAttackPart("apgd-ce", 0.1)(undefended, empty, torch.zeros(0, dtype=torch.long)).shape == empty.shape
    three = nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
    with pytest.raises(RRMError, match="attacks 9 target classes; the model has 3"):
        AutoAttackRun("standard", 0.1)(three, torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    root, caught = logging.getLogger(), []
    level, root.level = root.level, logging.ERROR
    try:
        with autoattack_warnings(caught):
            logging.getLogger("auto-attack").warning("it seems to be a randomized defense!")
    finally:
        root.level = level
    assert caught == ["it seems to be a randomized defense!"]
