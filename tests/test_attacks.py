import pytest
import torch

from rrm_hub import Attack, RRMError, evaluate, fgsm, make_loader, nfgsm, pgd


@pytest.fixture(scope="module")
def batch(mnist):
    return next(iter(make_loader(mnist, "test", 200)))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_perturbations_stay_in_the_ball_and_the_image_range(undefended, batch, norm, eps):
    x, y = batch
    for attack in (pgd(eps, norm, steps=5), fgsm(eps, norm), Attack(eps, norm, steps=3, restarts=2)):
        x_adv = attack(undefended, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-5).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert all(p.grad is None for p in undefended.parameters())  # attacks leave the model alone


def test_nfgsm_leaves_the_ball_by_design_but_not_the_image_range(undefended, batch):
    """N-FGSM: random start of 2 eps plus a step of eps, unprojected: up to 3 eps per pixel, often past eps."""
    x, y = batch
    torch.manual_seed(0)
    x_adv = nfgsm(0.1)(undefended, x, y)
    size = (x_adv - x).abs().flatten(1).max(dim=1).values
    assert (size <= 0.3 + 1e-5).all() and (size > 0.1 + 1e-3).float().mean() > 0.9
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.manual_seed(0)
    bounded = Attack(0.1, steps=1, step_size=0.1, start_eps=0.2)(undefended, x, y)  # the same, projected
    assert (bounded - x).abs().max() <= 0.1 + 1e-6
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():  # one step of eps from a noisy start: a stronger attack than the noise alone
        noisy = (x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)
        assert loss(undefended(x_adv), y) > loss(undefended(noisy), y)


def test_pgd_drives_an_undefended_model_to_zero(undefended, mnist):
    loader = make_loader(mnist, "test", 250, limit=500)
    result = evaluate(undefended, loader, {"pgd20": pgd(0.3, "linf", 20), "fgsm": fgsm(0.3),
                                           "pgd_l2": pgd(3.0, "l2", 20)})
    assert result["clean_accuracy"] > 0.85 and result["num_examples"] == 500
    assert result["robust_accuracy"]["pgd20"] < 0.02
    assert result["robust_accuracy"]["pgd_l2"] < 0.05
    assert result["robust_accuracy"]["pgd20"] <= result["robust_accuracy"]["fgsm"] <= result["clean_accuracy"]


def test_more_restarts_never_help_the_model(undefended, batch):
    x, y = batch
    attack_one, attack_three = Attack(0.1, steps=3), Attack(0.1, steps=3, restarts=3)
    torch.manual_seed(1)
    one = (undefended(attack_one(undefended, x, y)).argmax(1) == y).float().mean()
    torch.manual_seed(1)  # the first restart repeats the single run; later ones only add fooled points
    three = (undefended(attack_three(undefended, x, y)).argmax(1) == y).float().mean()
    assert three <= one < 1.0


def test_zero_eps_is_clean_and_bad_settings_are_refused(undefended, batch):
    x, y = batch
    assert torch.equal(pgd(0.0)(undefended, x, y), x)
    with pytest.raises(RRMError, match="eps must be >= 0"):
        pgd(-0.1)
    with pytest.raises(RRMError, match="unknown norm"):
        pgd(0.1, "l1")
