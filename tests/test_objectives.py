import pytest
import torch
import torch.nn.functional as F

from rrm_hub import RRM, AdversarialTraining, RRMError, RRMStudent, fgsm, nfgsm, pgd
from rrm_hub.data.transforms import translate
from rrm_hub.methods import feature_loss

from .conftest import TEACHER_WIDTH


@pytest.fixture(scope="module")
def student(teacher):
    return RRMStudent.for_teacher("resnet18", feature_dim=TEACHER_WIDTH, num_classes=10, input_size=(1, 28, 28),
                                  model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)})


def test_rrm_loss_matches_a_hand_computation(teacher, student):
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    objective = RRM(teacher, ce_weight=0.25, feature_weight=2.0)
    student.eval()
    loss, logs = objective(student, x, y)

    with torch.no_grad():
        hidden = student.backbone(student.preprocess(x))
        z_s = hidden @ student.proj.weight.T + student.proj.bias
        logits = z_s @ student.head.weight.T + student.head.bias
        z_t = teacher.model.forward_head(teacher.model.forward_features(teacher.preprocess(x)), pre_logits=True)
        ce = -torch.log_softmax(logits, dim=1)[torch.arange(6), y].mean()
        cos = (z_s * z_t).sum(1) / (z_s.norm(dim=1) * z_t.norm(dim=1))
        expected = 0.25 * ce + 2.0 * (1 - cos.mean())
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(logs["ce"], ce, atol=1e-5)


def test_only_the_student_learns(teacher, student):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    loss, _ = RRM(teacher)(student, x, y)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.proj.weight.grad is not None and student.backbone.conv1.weight.grad is not None
    student.zero_grad()


def test_feature_losses():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(feature_loss(a, a), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(feature_loss(a, -a), torch.tensor(2.0), atol=1e-6)
    assert torch.allclose(feature_loss(a, b, "l2"), F.mse_loss(a, b))


def test_noise_matching_feeds_teacher_and_student_the_same_noisy_images(teacher, student):
    seen = []
    handle = teacher.preprocess.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x = torch.full((3, 1, 28, 28), 0.5)
    RRM(teacher, match_on="noise", eps=0.2)(student, x, torch.arange(3))
    handle.remove()
    delta = seen[0] - x
    assert 0 < delta.abs().max() <= 0.2 + 1e-6


def test_adversarial_training_warms_up_epsilon():
    objective = AdversarialTraining(pgd(0.3, steps=7), eps_warmup=0.5)
    objective.schedule(0.25)
    assert abs(objective.current.eps - 0.15) < 1e-9
    objective.schedule(0.9)
    assert objective.current.eps == 0.3 and objective.name == "pgd_at"
    assert AdversarialTraining(fgsm(0.3)).name == "fast_at"
    n_fgsm = AdversarialTraining(nfgsm(0.3), eps_warmup=0.5)
    n_fgsm.schedule(0.25)  # N-FGSM's noise (2 eps) and step (eps) follow the warm-up too
    assert n_fgsm.name == "nfgsm_at" and not n_fgsm.current.bounded
    assert (n_fgsm.current.eps, n_fgsm.current.step_size, n_fgsm.current.start_eps) == pytest.approx((0.15, 0.15, 0.3))


def test_adversarial_matching_finds_a_worse_mismatch_inside_the_ball(teacher, student):
    x = torch.rand(8, 1, 28, 28)
    objective = RRM(teacher, match_on="adversarial", eps=0.1)
    moved = objective.matching_inputs(student, x)
    assert (moved - x).abs().max() <= 0.1 + 1e-6 and moved.min() >= 0 and moved.max() <= 1
    _, target = objective.teacher_outputs(x)
    with torch.no_grad():
        clean_gap = feature_loss(student(x, return_features=True)[1], target)
        moved_gap = feature_loss(student(moved, return_features=True)[1], target)
    assert moved_gap > clean_gap


def test_distillation_term_is_added(teacher, student):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    student.eval()
    base, _ = RRM(teacher)(student, x, y)
    with_kd, logs = RRM(teacher, kd_weight=0.5, temperature=2.0)(student, x, y)
    with torch.no_grad():
        t = F.softmax(teacher(x) / 2.0, dim=1)
        s = F.log_softmax(student(x) / 2.0, dim=1)
        kd = (t * (t.log() - s)).sum(dim=1).mean() * 4.0
    assert torch.allclose(logs["kd"], kd, atol=1e-5)
    assert torch.allclose(with_kd, base + 0.5 * kd, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("teacher_layer,student_layer", [("layer2", "blocks.0"), (None, None)])
def test_vit_student_learns_a_cnn_teacher_layer(teacher, mnist, teacher_layer, student_layer):
    """A ViT matched to the CNN teacher at an intermediate layer, or at the penultimate one: the mismatch falls."""
    from accelerate import Accelerator

    from rrm_hub import TrainConfig, make_loader, train
    from rrm_hub.models.features import feature_width

    width = feature_width(teacher, teacher.network, teacher_layer, torch.zeros(2, 1, 28, 28))
    torch.manual_seed(0)
    vit = RRMStudent.for_teacher("vit_tiny_patch16_224", feature_dim=width, num_classes=10, input_size=(1, 28, 28),
                                 student_layer=student_layer, model_args={"img_size": 28, "patch_size": 7, "depth": 2,
                                                                          "embed_dim": 48, "num_heads": 2})
    run = train(vit, RRM(teacher, teacher_layer), make_loader(mnist, "train", 64, limit=640), Accelerator(cpu=True),
                TrainConfig(epochs=3, lr=2e-3))
    history = [h["feat"] for h in run["history"]]
    assert history[-1] < 0.7 * history[0]


def test_noise_kinds():
    from rrm_hub.attacks import random_perturbation
    from rrm_hub.errors import RRMError

    x = torch.zeros(4, 1, 28, 28)
    sign = random_perturbation(x, 0.3, "linf", "sign")
    assert torch.allclose(sign.abs(), torch.full_like(x, 0.3)) and (sign > 0).any() and (sign < 0).any()
    uniform = random_perturbation(x, 0.3, "linf")
    assert uniform.abs().max() <= 0.3 and uniform.abs().min() < 0.29
    assert abs(random_perturbation(torch.zeros(20000), 0.3, "linf", "gaussian").std() - 0.3) < 0.01
    l2 = random_perturbation(x, 2.0, "l2", "sign").flatten(1).norm(dim=1)
    assert torch.allclose(l2, torch.full((4,), 2.0), atol=1e-4)
    with pytest.raises(RRMError, match="unknown noise"):
        RRM(None, match_on="noise", noise="salt")


def test_adversarial_matching_with_clean_targets_and_a_clean_anchor(teacher, student):
    """teacher_input="clean": the teacher sees only clean images; clean_weight adds the clean mismatch."""
    seen = []
    handle = teacher.preprocess.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    student.eval()
    objective = RRM(teacher, match_on="adversarial", eps=0.2, teacher_input="clean", clean_weight=0.5, steps=2)
    loss, logs = objective(student, x, y)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], x)
    assert set(logs) == {"ce", "feat", "feat_clean"}
    expected = 1.0 * logs["ce"] + logs["feat"] + 0.5 * logs["feat_clean"]  # CE weight 1 on moved images
    assert torch.allclose(loss, expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(logs["feat_clean"], feature_loss(student(x, return_features=True)[1],
                                                              objective.teacher_outputs(x)[1]), atol=1e-5)
    with pytest.raises(Exception, match="match-steps"):
        RRM(teacher, match_on="adversarial", steps=0)
    # the reference code's CE weight, except where CE trains on moved images
    assert RRM(teacher).ce_weight == RRM(teacher, match_on="noise").ce_weight == 0.005
    assert RRM(teacher, match_on="adversarial").ce_weight == 1.0


def test_nfgsm_matching_steps_outside_the_ball_and_is_refused_with_several_steps(teacher, student):
    x = torch.rand(8, 1, 28, 28)
    objective = RRM(teacher, match_on="adversarial", eps=0.1, attack="n-fgsm")
    assert objective.matching_attack().name == "nfgsm" and not objective.matching_attack().bounded
    torch.manual_seed(0)
    moved = objective.matching_inputs(student, x)
    assert 0.1 + 1e-3 < (moved - x).abs().max() <= 0.3 + 1e-6 and moved.min() >= 0 and moved.max() <= 1
    objective.eps_warmup = 0.5
    objective.schedule(0.25)  # the warm-up scales N-FGSM's step and noise alike
    assert objective.matching_attack().eps == pytest.approx(0.05)
    assert objective.matching_attack().start_eps == pytest.approx(0.1)
    with pytest.raises(RRMError, match="one step"):
        RRM(teacher, match_on="adversarial", attack="n-fgsm", steps=2)
    with pytest.raises(RRMError, match="match-attack"):
        RRM(teacher, match_on="adversarial", attack="pgd-ish")


def test_ce_driven_matching_raises_the_students_loss_and_spares_the_teachers_clean_pass(teacher, student):
    """attack_loss="ce": the step raises the student's cross-entropy (ARD's examples); with the teacher's view of
    the moved images as target, the teacher runs once, on those images only."""
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    student.eval()
    objective = RRM(teacher, match_on="adversarial", eps=0.1, attack_loss="ce", teacher_input="matched")
    torch.manual_seed(0)
    moved = objective.matching_inputs(student, x, y=y)
    assert (moved - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(student(moved), y) > F.cross_entropy(student(x), y)
    seen = []
    handle = teacher.preprocess.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    objective(student, x, y)
    handle.remove()
    assert len(seen) == 1 and not torch.equal(seen[0], x)
    with pytest.raises(RRMError, match="pass y"):
        objective.matching_inputs(student, x)
    with pytest.raises(RRMError, match="match-attack-loss"):
        RRM(teacher, match_on="adversarial", attack_loss="kl")


def test_matching_on_mixes_and_shifted_views(teacher, student):
    """mixup / cutmix: each mix is mostly its own image, the rest another's; shift: the image moved; the teacher
    sees the same mixed images as the student."""
    from rrm_hub.methods.inputs import MixedInputs, ShiftedInputs

    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 28, 28), float(v)) for v in (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)])
    mixed = MixedInputs("mixup")(None, x)
    own = torch.where(x[:, 0, 0, 0] > 0.5, mixed[:, 0, 0, 0], 1 - mixed[:, 0, 0, 0])
    assert (own >= 0.5 - 1e-6).all() and (mixed.amax((1, 2, 3)) == mixed.amin((1, 2, 3))).all()
    cut = MixedInputs("cutmix")(None, x)
    assert set(cut.unique().tolist()) <= {0.0, 1.0}
    share = (cut == x).float().mean((1, 2, 3))
    assert (share >= 0.5 - 0.05).all() and (share < 1).any()
    image = torch.rand(4, 1, 28, 28)
    shifted = ShiftedInputs(2)(None, image)
    assert all(any(torch.equal(shifted[i], translate(image[i], dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3))
               for i in range(4))
    seen = []
    handle = teacher.preprocess.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    loss, logs = RRM(teacher, match_on="cutmix", clean_weight=1.0)(student, image, torch.arange(4))
    handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], image) and not torch.equal(seen[1], image)
    assert torch.isfinite(loss) and "feat_clean" in logs
    with pytest.raises(RRMError, match="mixup or cutmix"):
        MixedInputs("blend")
