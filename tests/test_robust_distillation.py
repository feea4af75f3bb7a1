"""ARD, RSLAD and AdaAD: their losses by hand, the direction of their attacks, the teacher cache and the carried
attack, and the methods by name."""


import pytest
import torch
import torch.nn.functional as F

from rrm_hub import RRMError, RRMStudent, fgsm, pgd
from rrm_hub.methods import ARD, RSLAD, AdaAD, kl_divergence
from rrm_hub.methods.inputs import AttackedInputs
from rrm_hub.methods.memory import PerturbationMemory
from rrm_hub.methods.registry import make_objective
from rrm_hub.teachers.cache import TeacherCache

from .conftest import load_recipe, run_here


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return RRMStudent.for_teacher("resnet18", feature_dim=128, num_classes=10, input_size=(1, 28, 28),
                                  model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)}).eval()


def attack(eps=0.1, steps=3):
    return lambda factor: pgd(eps * factor, "linf", steps)


def kl_by_hand(student_logits, teacher_logits, t=1.0):
    """sum_c p_t (log p_t - log p_s), averaged over the batch, times t^2."""
    p_t = torch.exp(teacher_logits / t) / torch.exp(teacher_logits / t).sum(1, keepdim=True)
    p_s = torch.exp(student_logits / t) / torch.exp(student_logits / t).sum(1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean() * t * t


class Fixed:
    """An input maker that hands back given images (the loss is then checked on known inputs)."""

    perturbs, reads_clean_target, current = True, False, fgsm(0.1)

    def __init__(self, x_adv):
        self.x_adv = x_adv

    def __call__(self, model, x, y=None, origins=None, mismatch=None):
        return self.x_adv


def test_ard_loss_matches_a_hand_computation(teacher, student):
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    objective = ARD(teacher, attack(), weight=0.7, temperature=4.0)
    objective.inputs = Fixed(x_adv)
    loss, logs = objective(student, x, y)
    with torch.no_grad():
        ce = -torch.log_softmax(student(x), 1)[torch.arange(5), y].mean()
        expected = 0.7 * kl_by_hand(student(x_adv), teacher(x), 4.0) + 0.3 * ce
    assert torch.allclose(loss, expected, atol=1e-4) and torch.allclose(logs["ce"], ce, atol=1e-5)
    objective = ARD(teacher, attack())  # the authors' defaults: weight 1 (no CE term), T 30
    objective.inputs = Fixed(x_adv)
    loss, logs = objective(student, x, y)
    assert "ce" not in logs and torch.allclose(loss, kl_by_hand(student(x_adv), teacher(x), 30.0).detach(), atol=1e-3)
    with pytest.raises(RRMError, match="ard-weight"):
        ARD(teacher, attack(), weight=1.5)


def test_rslad_and_adaad_losses_match_hand_computations(teacher, student):
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    rslad = RSLAD(teacher, attack())
    rslad.inputs = Fixed(x_adv)
    loss, logs = rslad(student, x, y)
    with torch.no_grad():
        adversarial, clean = kl_by_hand(student(x_adv), teacher(x)), kl_by_hand(student(x), teacher(x))
    assert torch.allclose(loss, 5 / 6 * adversarial + 1 / 6 * clean, atol=1e-5)
    assert torch.allclose(logs["kl_clean"], clean, atol=1e-5)
    adaad = AdaAD(teacher, attack())
    adaad.inputs = Fixed(x_adv)
    loss, _ = adaad(student, x, y)
    with torch.no_grad():
        assert torch.allclose(loss, kl_by_hand(student(x_adv), teacher(x_adv)), atol=1e-5)  # both models on x'
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.proj.weight.grad is not None
    student.zero_grad(set_to_none=True)


def test_each_attack_raises_the_loss_it_is_meant_to(teacher, student):
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    with torch.no_grad():
        clean_target = teacher(x)
    torch.manual_seed(0)
    ard, rslad, adaad = ARD(teacher, attack()), RSLAD(teacher, attack()), AdaAD(teacher, attack())
    moved = ard.inputs(student, x, y)
    with torch.no_grad():
        assert F.cross_entropy(student(moved), y) > F.cross_entropy(student(x), y)  # ARD: the student's CE
    moved = rslad.inputs(student, x, y, None, lambda logits: kl_divergence(logits, clean_target))
    with torch.no_grad():  # RSLAD: the divergence from the teacher's clean soft labels
        assert kl_divergence(student(moved), clean_target) > kl_divergence(student(x), clean_target)
    moved = adaad.inputs(student, x, y)
    assert (moved - x).abs().max() <= 0.1 + 1e-6 and moved.min() >= 0 and moved.max() <= 1
    with torch.no_grad():  # AdaAD: the divergence with both models on the moved images
        assert kl_divergence(student(moved), teacher(moved)) > kl_divergence(student(x), teacher(x))
    # the gradient AdaAD's attack follows goes through the teacher too
    point = x.clone().requires_grad_(True)
    (joint,) = torch.autograd.grad(adaad.inputs.loss_of(student, y, None)(point), point)
    point = x.clone().requires_grad_(True)
    (student_only,) = torch.autograd.grad(kl_divergence(student(point), teacher(point).detach()), point)
    assert not torch.allclose(joint, student_only)
    with pytest.raises(RRMError, match="joint"):
        AttackedInputs(attack(), "joint")


def test_the_cache_serves_ard_and_rslad_and_the_teacher_does_not_run(teacher, student, mnist):
    from rrm_hub import make_loader
    from rrm_hub.models.features import default_layer

    layer = default_layer(teacher.network)
    loader = make_loader(mnist, "train", 16, limit=16)
    cache = TeacherCache.build(teacher, layer, loader)
    x, y = next(iter(loader))
    for method in (ARD, RSLAD):
        torch.manual_seed(1)
        live = method(teacher, attack(), teacher_layer=layer)(student, x, y)[0]
        cached = method(teacher, attack(), teacher_layer=layer, cache=cache)
        seen = []
        handle = teacher.preprocess.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(1))
        torch.manual_seed(1)
        loss = cached(student, x, y)[0]
        handle.remove()
        assert not seen and torch.allclose(loss, live, atol=1e-4)
        cached.remove()
    with pytest.raises(RRMError, match="cache-teacher"):
        AdaAD(teacher, attack(), cache=cache)


def test_the_carried_attack_goes_on_where_it_ended(teacher, student):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    origins = torch.tensor([[i, 0, 0, 0] for i in (3, 5, 0, 7)])
    for name in ("ard", "rslad", "adaad"):
        memory = PerturbationMemory(8, (1, 28, 28))
        objective = make_objective(name, eps=0.2, norm="linf", teacher=teacher, memory=memory,
                                   rrm_options={"eps_warmup": 0.0})
        assert objective.uses_origins and objective.current.alpha == pytest.approx(0.1)  # steps of 0.5 eps
        objective(student, x, y, origins)
        stored = memory.deltas[[3, 5, 0, 7]].float()
        assert memory.seen[[3, 5, 0, 7]].all() and not memory.seen[[1, 2, 4, 6]].any()
        assert 0 < stored.abs().max() <= 0.2 + 1e-3
        start = memory.start(0.2, "linf", x, origins)
        assert torch.allclose(start, stored, atol=1e-3)  # the next epoch's attack starts there
        assert set(objective.checkpoint_state()) == {"deltas", "seen"}


def test_methods_by_name_and_their_rules(teacher):
    from rrm_hub.config.runs import DistillConfig

    for name, kind in (("ard", ARD), ("rslad", RSLAD), ("adaad", AdaAD)):
        objective = make_objective(name, eps=0.3, norm="linf", teacher=teacher,
                                   rrm_options={"steps": 2, "eps": None}, robust_options={"ard_temperature": 5.0})
        assert isinstance(objective, kind) and objective.current.steps == 2 and objective.current.eps == 0.3
    assert make_objective("ard", eps=0.3, norm="l2", teacher=teacher, robust_options={"ard_weight": 0.5}).weight == 0.5
    with pytest.raises(RRMError, match="needs a teacher"):
        make_objective("rslad", eps=0.3, norm="linf")
    with pytest.raises(RRMError, match="runs its attack"):
        make_objective("ard", eps=0.3, norm="linf", teacher=teacher, rrm_options={"attack": "free"})
    config = DistillConfig()
    config.method, config.rrm.cache_teacher = "adaad", True
    with pytest.raises(RRMError, match="not adaad"):
        config.validate()
    config.method = "rslad"
    config.validate()
    config.rrm.cache_teacher, config.rrm.attack = False, "n-fgsm"
    with pytest.raises(RRMError, match="match-start random"):
        config.validate()
    assert config.rrm.carries("rslad") and not config.rrm.carries("kd")


@pytest.mark.slow
def test_the_benchmark_and_the_recipe_run_them_by_name(tmp_path):
    from .test_hub import _recipe

    report = _recipe("benchmark").main([
        "--methods", "ard", "rslad", "adaad", "--epochs", "1", "--max-steps", "2",
        "--epoch-eval-examples", "16", "--eval-examples", "16", "--student", "resnet18", "--student-kwargs",
        "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--target", "0", "--output-dir", str(tmp_path / "bench")])
    for method in ("ard", "rslad", "adaad"):
        entry = report["methods"][method]
        assert entry["steps"] == 2 and 0 <= entry["robust_accuracy"] <= 1
    metrics = _recipe("rrm").main([
        "--method", "rslad", "--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)",
        "--max-steps", "2", "--epoch-eval-examples", "0", "--eval-examples", "16", "--sweep-examples", "16",
        "--eval-steps", "2", "--no-checks", "--output-dir", str(tmp_path / "rslad")])
    assert metrics["method"] == "rslad" and metrics["rrm_options"] is None
    assert metrics["attack"]["match_start"] == "previous" and (tmp_path / "rslad" / "model.safetensors").exists()


def test_step_costs_and_the_study_budget(tmp_path):
    from rrm_hub.config.runs import RECIPE_RRM, RRMOptions
    from rrm_hub.methods.registry import step_cost

    recipe = RRMOptions(**RECIPE_RRM)
    costs = {m: step_cost(m, rrm=recipe) for m in ("natural", "pgd_at", "atta_at", "kd", "rrm", "ard", "rslad",
                                                   "adaad")}
    assert costs == pytest.approx({"natural": 1, "pgd_at": 8, "atta_at": 2, "kd": 4 / 3, "rrm": 7 / 3, "ard": 7 / 3,
                                   "rslad": 10 / 3, "adaad": 10 / 3})
    assert step_cost("rrm", rrm=RRMOptions()) == pytest.approx(4 / 3)  # the paper's clean matching
    assert step_cost("ard", rrm=recipe, cached=True) == 2 and step_cost("ard", rrm=recipe, ard_weight=0.5) == 10 / 3
    assert step_cost("rrm", rrm=RRMOptions(match_on="mixup", clean_weight=1)) == pytest.approx(8 / 3)
    assert step_cost("adaad", rrm=RRMOptions(steps=10)) == pytest.approx(21 + 1 / 3)
    with pytest.raises(RRMError, match="unknown method"):
        step_cost("sat")
    study = load_recipe("study.py")
    config = study.StudyConfig(budget=10)
    # clean matching's teacher outputs are cached by default (one natural step a step, the cache's pass in the
    # budget); the default with the teacher live pays its forward every step
    for variant, epochs in (("vit/rslad", "3"), ("vit/pgd_at", "1"), ("vit/clean", "10"), ("vit/default-live", "4")):
        cmd = study.command(*study.variants()[variant], config, tmp_path)
        assert cmd[cmd.index("--epochs") + 1] == epochs


def test_the_l2_teacher_loads_offline_by_name():
    import json

    from rrm_hub import load_teacher
    from rrm_hub.teachers.load import L2_TEACHER

    teacher = load_teacher("default-l2")
    assert teacher.num_classes == 10 and "L2" in teacher.source
    metrics = json.loads((L2_TEACHER / "metrics.json").read_text())
    assert metrics["norm"] == "l2" and metrics["eps"] == 2.0 and metrics["method"] == "pgd_at"
    with torch.no_grad():
        assert teacher(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_distilling_on_mixes_attacks_and_matches_fresh_mixes(teacher, student):
    from rrm_hub.config.runs import DistillConfig
    from rrm_hub.methods.inputs import MixedInputs

    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    seen = []

    class Recorder:
        perturbs, reads_clean_target, current = True, False, fgsm(0.1)

        def __call__(self, model, images, y=None, origins=None, mismatch=None):
            seen.append(images)
            return images

    adaad = make_objective("adaad", eps=0.1, norm="linf", teacher=teacher,
                           rrm_options={"eps_warmup": 0.0}, robust_options={"distill_on": "mixup"})
    assert isinstance(adaad.mix, MixedInputs) and adaad.mix.kind == "mixup"
    adaad.inputs = Recorder()
    torch.manual_seed(3)
    loss, _ = adaad(student, x, y)
    torch.manual_seed(3)
    expected = MixedInputs("mixup")(student, x)
    assert torch.allclose(seen[0], expected) and not torch.allclose(seen[0], x)  # the attack starts from the mixes
    with torch.no_grad():
        assert torch.allclose(loss, kl_by_hand(student(expected), teacher(expected)), atol=1e-5)
    rslad = make_objective("rslad", eps=0.1, norm="linf", teacher=teacher, robust_options={"distill_on": "cutmix"})
    torch.manual_seed(4)
    assert rslad(student, x, y)[0].isfinite()
    # a carried attack goes on from the perturbation of the mix each image led the epoch before
    memory = PerturbationMemory(8, (1, 28, 28))
    carried = AdaAD(teacher, attack(), memory=memory, mix=MixedInputs("cutmix"))
    origins = torch.tensor([[i, 0, 0, 0] for i in range(6)])
    carried(student, x, y, origins)
    assert memory.seen[:6].all() and 0 < memory.deltas[:6].float().abs().max() <= 0.1 + 1e-3
    with pytest.raises(RRMError, match="cache-teacher"):
        RSLAD(teacher, attack(), cache=object(), mix=MixedInputs("mixup"))
    config = DistillConfig()
    config.method, config.robust.distill_on = "rrm", "mixup"
    with pytest.raises(RRMError, match="--match-on mixup"):
        config.validate()
    config.method = "rslad"
    assert config.validate().caches_teacher() is False  # a cache would hold the training images' targets, not mixes'
    config.rrm.cache_teacher = True
    with pytest.raises(RRMError, match="cache-teacher"):
        config.validate()


def test_unlabeled_images_replace_a_share_of_the_batch_and_take_the_teachers_classes(teacher, student):
    from rrm_hub.config.runs import DistillConfig
    from rrm_hub.methods.inputs import UnlabeledInputs

    pool = [(torch.full((3, 1, 28, 28), float(i) / 10), torch.full((3,), -1)) for i in range(1, 4)]
    maker = UnlabeledInputs(pool, share=0.5)
    x = torch.zeros(8, 1, 28, 28)
    first, second = maker(student, x), maker(student, x)
    assert maker.drawn == 4 and torch.equal(first[4:], x[4:])
    # the pool's images in their order, over batch boundaries and around again (0.1 x3, 0.2 x3, 0.3 x3, 0.1 ...)
    drawn = torch.cat([first[:4], second[:4]]).flatten(1)[:, 0]
    assert torch.allclose(drawn, torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3]))
    assert torch.allclose(maker(student, x)[:4].flatten(1)[:, 0], torch.tensor([0.3, 0.1, 0.1, 0.1]))
    with pytest.raises(RRMError, match="unlabeled-share"):
        UnlabeledInputs(pool, share=0)
    with pytest.raises(RRMError, match="no unlabeled images to draw"):
        UnlabeledInputs(iter([]), share=0.5)(student, x)

    # ARD attacks the unlabeled images against the teacher's classes, the labelled ones against their labels
    seen = {}

    class Recorder:
        perturbs, reads_clean_target, current = True, False, fgsm(0.1)

        def __call__(self, model, images, y=None, origins=None, mismatch=None):
            seen["images"], seen["labels"] = images, y
            return images

    ard = ARD(teacher, attack(), unlabeled=UnlabeledInputs(pool, share=0.5))
    ard.inputs = Recorder()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    ard(student, x, y)
    with torch.no_grad():
        classes = teacher(seen["images"][:3]).argmax(1)
    assert torch.equal(seen["labels"], torch.cat([classes, y[3:]])) and torch.equal(seen["images"][3:], x[3:])
    with pytest.raises(RRMError, match="cache-teacher"):
        RSLAD(teacher, attack(), cache=object(), unlabeled=UnlabeledInputs(pool))
    with pytest.raises(RRMError, match="match-start random"):
        AdaAD(teacher, attack(), memory=PerturbationMemory(8, (1, 28, 28)), unlabeled=UnlabeledInputs(pool))

    config = DistillConfig()
    config.robust.unlabeled_split = "rest"
    with pytest.raises(RRMError, match="for --method ard, rslad, adaad to distill on, not for rrm"):
        config.validate()
    config.method = "rslad"
    assert config.validate().caches_teacher() is False
    config.rrm.cache_teacher = True
    with pytest.raises(RRMError, match=r"--unlabeled-split \(or --unlabeled-dataset\) distills on images other than"):
        config.validate()
    bad = run_here(["recipes/benchmark.py", "--unlabeled-split", "rest", "--quick"])
    assert bad.returncode != 0 and "--unlabeled-dataset are for recipes/rrm.py" in bad.stderr


def test_the_recipe_distills_on_unlabeled_images_and_resumes_their_draws(tmp_path, capsys):
    from safetensors.torch import load_file

    from .test_hub import _recipe

    flags = ["--method", "adaad", "--train-split", "train[:64]", "--unlabeled-split", "rest", "--unlabeled-share",
             "0.25", "--student", "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)",
             "--max-steps", "2", "--batch-size", "32", "--save-every", "1", "--epoch-eval-examples", "0",
             "--eval-examples", "16", "--sweep-examples", "16", "--eval-steps", "2", "--no-checks"]
    metrics = _recipe("rrm").main([*flags, "--output-dir", str(tmp_path / "adaad")])
    assert metrics["steps"] == 2 and metrics["attack"]["match_start"] == "random"
    assert metrics["unlabeled_images"] == {"dataset": None, "split": "rest", "count": 3936, "share": 0.25}
    assert "3,936 images of the training split's rest" in (tmp_path / "adaad" / "README.md").read_text()
    # resumed after step 1, step 2 draws the images the whole run drew there (not step 1's again): same weights
    first = tmp_path / "adaad" / "checkpoints" / "step-00000001"
    assert load_file(first / "objective.safetensors")["unlabeled_used"].tolist() == [8]
    capsys.readouterr()
    _recipe("rrm").main([*flags, "--output-dir", str(tmp_path / "resumed"), "--resume", str(first)])
    assert f"resuming from {first} (step 1" in capsys.readouterr().out
    whole, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("adaad", "resumed"))
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_the_recipe_draws_unlabeled_images_from_another_dataset(tmp_path, mnist):
    from safetensors.torch import load_file

    from .test_hub import _recipe

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(100, 112):  # training images the student is not given
        mnist.train[i]["image"].save(folder / f"{i}.png")
    metrics = _recipe("rrm").main([
        "--method", "rslad", "--train-split", "train[:64]", "--unlabeled-dataset", str(folder), "--student",
        "resnet18", "--student-kwargs", "layers=(1,1,1,1)", "channels=(8,8,8,8)", "--max-steps", "1",
        "--batch-size", "32", "--save-every", "1", "--epoch-eval-examples", "0", "--eval-examples", "16",
        "--sweep-examples", "0", "--eval-steps", "2", "--no-checks", "--output-dir", str(tmp_path / "rslad")])
    assert metrics["unlabeled_images"] == {"dataset": str(folder), "split": None, "count": 12, "share": 0.5}
    step = tmp_path / "rslad" / "checkpoints" / "step-00000001" / "objective.safetensors"
    assert load_file(step)["unlabeled_used"].tolist() == [16]  # half of the batch of 32 was drawn from them
    assert f"12 images of **{folder}** whose labels were never read" in (tmp_path / "rslad" / "README.md").read_text()
