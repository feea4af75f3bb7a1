"""`--holdout` / `--keep-best`: judge epochs on training images kept out of training, end with the best one."""

import pytest
import torch
from torch import nn

from rrm_hub import RRMError, make_loader
from rrm_hub.training.selection import FILENAME, BestEpoch, late_fall


def test_hold_out_moves_seeded_training_images_out_of_training(mnist):
    held = mnist.hold_out(100, seed=1)
    assert len(held.train) == len(mnist.train) - 100 and len(held.holdout) == 100 and held.test is mnist.test
    assert held.holdout["label"] == mnist.hold_out(100, seed=1).holdout["label"]  # seeded
    assert held.train._fingerprint != mnist.train._fingerprint  # what a teacher cache is keyed on
    x, y = next(iter(make_loader(held, "holdout", 100)))
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    with pytest.raises(RRMError, match="no 'holdout' split"):
        make_loader(mnist, "holdout", 8)
    with pytest.raises(RRMError, match="--holdout must be between 1 and"):
        mnist.hold_out(len(mnist.train))


def test_best_epoch_keeps_and_restores_the_most_robust_epochs_weights(tmp_path):
    model = nn.Linear(3, 2)
    scores = iter([0.2, 0.5, 0.4])
    keeper = BestEpoch(lambda epoch, m: {"pgd10": next(scores)}, "pgd10", tmp_path)
    weights = []
    for epoch in range(3):
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights.append(model.weight.detach().clone())
        record = keeper(epoch, model)
    assert record == {"pgd10": 0.4, "best_epoch": 2}
    assert keeper.restore(model) == {"epoch": 2, "pgd10": 0.5} and torch.equal(model.weight, weights[1])
    # a run resumed after epoch 3 knows the best so far from the file, and restores it if no later epoch beats it
    resumed = BestEpoch(lambda epoch, m: {"pgd10": 0.1}, "pgd10", tmp_path, previous=tmp_path)
    assert (resumed.best, resumed.epoch) == (0.5, 2)
    with torch.no_grad():
        model.weight.fill_(9)
    resumed(3, model)
    assert resumed.restore(model)["epoch"] == 2 and torch.equal(model.weight, weights[1])
    # resumed from a checkpoint before that best epoch (after epoch 1): the file's best no longer counts
    earlier = BestEpoch(lambda epoch, m: {"pgd10": 0.1}, "pgd10", None, previous=tmp_path)
    assert earlier(1, model)["best_epoch"] == 2 and earlier.restore(model) == {"epoch": 2, "pgd10": 0.1}
    # a fresh run does not take an old run's best, and a file of another model is refused in one line
    assert BestEpoch(lambda epoch, m: {}, "pgd10", tmp_path).best == float("-inf")
    with pytest.raises(RRMError, match="does not hold this model's weights"):
        BestEpoch(lambda epoch, m: {}, "pgd10", None, previous=tmp_path).restore(nn.Linear(4, 2))
    with pytest.raises(RRMError, match="no epoch was checked"):
        BestEpoch(lambda epoch, m: {}, "pgd10", tmp_path).restore(model)
    (tmp_path / FILENAME).write_bytes(b"garbage")
    with pytest.raises(RRMError, match="is damaged; delete it"):
        BestEpoch(lambda epoch, m: {}, "pgd10", tmp_path, previous=tmp_path)


def test_a_late_fall_of_the_check_is_pointed_out():
    history = [{"epoch": 1, "pgd10": 0.2}, {"epoch": 2, "pgd10": 0.66}, {"epoch": 3, "pgd10": 0.45}]
    note = late_fall(history)
    assert "peaked at 66.0% (epoch 2) and ended at 45.0%" in note and "--keep-best" in note
    assert late_fall(history[:2]) is None and late_fall([{"epoch": 1, "clean": 0.9}]) is None
    assert late_fall([{"epoch": 1, "pgd10": 0.5}, {"epoch": 2, "pgd10": 0.47}]) is None  # within the margin
