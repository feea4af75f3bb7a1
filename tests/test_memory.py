"""`--match-start previous`: each image's matching attack starts where it ended the epoch before (ATTA)."""

import random

import pytest
import torch
import torch.nn.functional as F

from rrm_hub import RRM, RRMError, RRMStudent, make_loader
from rrm_hub.data.transforms import RandomShift, translate
from rrm_hub.methods.memory import CARRIED_STEP, PerturbationMemory

from .conftest import TEACHER_WIDTH


@pytest.fixture(scope="module")
def student():
    return RRMStudent.for_teacher("resnet18", feature_dim=TEACHER_WIDTH, num_classes=10, input_size=(1, 28, 28),
                                  model_args={"layers": (1, 1, 1, 1), "channels": (8, 8, 16, 16)})


def test_translate_moves_pixels_and_fills_zeros():
    t = torch.arange(1, 17, dtype=torch.float32).view(1, 4, 4)
    moved = translate(t, 1, -2)  # out[i, j] = t[i + 1, j - 2]
    assert moved[0, 0, 2] == t[0, 1, 0] and moved[0, 2, 3] == t[0, 3, 1]
    assert (moved[0, 3] == 0).all() and (moved[0, :, :2] == 0).all()
    assert torch.equal(translate(t, 0, 0), t) and (translate(t, 4, 0) == 0).all()


def test_random_shift_is_the_pad_and_crop_it_always_was():
    x = torch.rand(1, 28, 28)
    for seed in range(20):
        rng = random.Random(seed)
        top, left = rng.randint(0, 4), rng.randint(0, 4)
        padded = F.pad(x, (2,) * 4)[:, top:top + 28, left:left + 28]
        assert torch.equal(RandomShift(2)(x, random.Random(seed)), padded)
        assert RandomShift(2).draw(random.Random(seed))[:2] == (top - 2, left - 2)


def test_loader_origins_say_which_image_and_how_it_moved(mnist):
    loader = make_loader(mnist, "train", 8, augment=True, seed=3, pad=2, hflip=True, origins=True)
    x, y, origins = next(iter(loader))
    assert origins.shape == (8, 4) and origins.dtype == torch.long
    plain = make_loader(mnist, "train", 8).dataset
    for view, label, (index, dy, dx, flipped) in zip(x, y, origins.tolist(), strict=True):
        image, true_label = plain[index]
        assert label == true_label and abs(dy) <= 2 and abs(dx) <= 2
        assert torch.equal(view, RandomShift.apply(image, dy, dx, bool(flipped)))


def test_memory_keeps_each_perturbation_in_its_images_frame():
    memory = PerturbationMemory(3, (1, 6, 6))
    like = torch.zeros(2, 1, 6, 6)
    _, seen = memory.recall(torch.tensor([[0, 0, 0, 0], [2, 0, 0, 0]]), like)
    assert not seen.any()
    delta = torch.rand(1, 1, 6, 6) - 0.5
    memory.remember(torch.tensor([[2, 1, -1, 1]]), delta)  # shown moved by (1, -1) and flipped
    recalled, seen = memory.recall(torch.tensor([[2, 1, -1, 1], [0, 0, 0, 0]]), like)
    assert seen.tolist() == [True, False]
    # the view it was stored from: equal where that view showed the image (fp16), zero where it showed padding
    shown = RandomShift.apply(torch.ones(1, 6, 6), 1, -1, True).bool()
    assert torch.allclose(recalled[0][shown], delta[0][shown], atol=1e-3)
    unmoved = memory.recall(torch.tensor([[2, 0, 0, 0]]), like)[0][0]
    assert torch.allclose(RandomShift.apply(unmoved, 1, -1, True)[shown], delta[0][shown], atol=1e-3)
    # a later view that shows only part of the image leaves the rest as it was
    memory.remember(torch.tensor([[2, 2, 0, 0]]), torch.zeros(1, 1, 6, 6))
    after = memory.recall(torch.tensor([[2, 0, 0, 0]]), like)[0][0]
    assert (after[:, 2:] == 0).all() and torch.equal(after[:, :2], unmoved[:, :2])


def test_memory_size_is_checked_and_its_state_round_trips():
    with pytest.raises(RRMError, match="GiB.*--match-start random"):
        PerturbationMemory(1_281_167, (3, 224, 224))  # ImageNet-1k: refused before anything is allocated
    memory = PerturbationMemory(4, (1, 2, 2))
    memory.remember(torch.tensor([[1, 0, 0, 0]]), torch.full((1, 1, 2, 2), 0.25))
    again = PerturbationMemory(4, (1, 2, 2))
    again.load_state_dict(memory.state_dict())
    assert torch.equal(again.deltas, memory.deltas) and again.seen.tolist() == [False, True, False, False]
    with pytest.raises(RRMError, match="same dataset"):
        PerturbationMemory(5, (1, 2, 2)).load_state_dict(memory.state_dict())


def test_matching_attack_goes_on_from_the_last_epochs_perturbation(teacher, student):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    origins = torch.tensor([[i, 0, 0, 0] for i in range(4)])
    student.eval()
    memory = PerturbationMemory(4, (1, 28, 28))
    objective = RRM(teacher, match_on="adversarial", eps=0.1, attack_loss="ce", memory=memory)
    first = objective.matching_inputs(student, x, y=y, origins=origins)
    assert memory.seen.all() and torch.allclose(memory.deltas.float(), first - x, atol=1e-3)
    # the next step starts from the stored perturbation: one step of 0.5 eps (the carried default) from there
    assert objective.step_size == CARRIED_STEP == 0.5
    start = memory.deltas.float()
    delta = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(student(x + delta), y), delta)
    expected = ((x + (start + 0.05 * grad.sign()).clamp(-0.1, 0.1)).clamp(0, 1))
    second = objective.matching_inputs(student, x, y=y, origins=origins)
    assert torch.allclose(second, expected, atol=1e-3)
    with pytest.raises(RRMError, match="origins=True"):
        objective.matching_inputs(student, x, y=y)
    with pytest.raises(RRMError, match="add --match-start random"):
        RRM(teacher, match_on="adversarial", attack="n-fgsm", memory=memory)
    assert RRM(teacher, match_on="noise", memory=memory).memory is None  # only an attack carries on


def test_step_size_is_a_multiple_of_the_current_eps(teacher):
    objective = RRM(teacher, match_on="adversarial", eps=0.2, step_size=0.5, eps_warmup=0.5)
    assert objective.matching_attack().alpha == pytest.approx(0.1)
    objective.schedule(0.25)  # warm-up: eps 0.1
    assert objective.matching_attack().alpha == pytest.approx(0.05)
    assert RRM(teacher, match_on="adversarial", eps=0.2).matching_attack().alpha == pytest.approx(0.25)  # FGSM-RS
    with pytest.raises(RRMError, match="must be > 0"):
        RRM(teacher, match_on="adversarial", step_size=0)


def test_free_step_comes_from_the_training_backward_pass(teacher, student):
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    origins = torch.tensor([[i, 0, 0, 0] for i in range(4)])
    student.eval()
    memory = PerturbationMemory(4, (1, 28, 28))
    objective = RRM(teacher, match_on="adversarial", eps=0.1, attack="free", teacher_input="clean", memory=memory)
    torch.manual_seed(0)
    loss, _ = objective(student, x, y, origins)
    assert not memory.seen.any()  # no attack pass: nothing moves before the training backward
    torch.manual_seed(0)
    start = torch.empty_like(x).uniform_(-0.1, 0.1)  # the random start of unseen images
    view = (x + start).clamp(0, 1).requires_grad_(True)
    logits, features = student(view, return_features=True)
    target = objective.teacher_outputs(x)[1]
    expected_loss = F.cross_entropy(logits, y) + objective.mismatch(features, target)[0]
    (grad,) = torch.autograd.grad(expected_loss, view)
    assert torch.allclose(loss, expected_loss, atol=1e-5)
    loss.backward()  # the training step's backward moves each perturbation one step of 0.5 eps along its gradient
    state = objective.checkpoint_state()  # a checkpoint stores the step taken
    moved = (x + (view.detach() - x + 0.05 * grad.sign()).clamp(-0.1, 0.1)).clamp(0, 1) - x
    assert state["seen"].all() and torch.allclose(state["deltas"].float(), moved, atol=1e-3)
    student.zero_grad()
    with pytest.raises(RRMError, match="needs --match-start previous"):
        RRM(teacher, match_on="adversarial", attack="free")
    with pytest.raises(RRMError, match="takes one step"):
        RRM(teacher, match_on="adversarial", attack="free", steps=2, memory=memory)


def test_step_size_defaults_to_the_carried_step_only_with_a_memory(teacher):
    assert RRM(teacher, match_on="adversarial", memory=PerturbationMemory(2, (1, 2, 2))).step_size == CARRIED_STEP
    assert RRM(teacher, match_on="adversarial").step_size is None  # FGSM-RS's own 1.25 eps
    assert RRM(teacher, match_on="clean", memory=PerturbationMemory(2, (1, 2, 2))).step_size is None
