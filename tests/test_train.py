import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rrm_hub import Natural, RRMError, TrainConfig, train


def _problem(n=64):
    torch.manual_seed(0)
    x = torch.rand(n, 1, 4, 4)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_loss_falls_and_steps_are_counted():
    run = train(_model(), Natural(), _problem(), Accelerator(cpu=True), TrainConfig(epochs=6, lr=0.05))
    assert run["steps"] == 6 * 8 and run["epochs"] == 6
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    capped = train(_model(), Natural(), _problem(), Accelerator(cpu=True), TrainConfig(epochs=6, max_steps=11))
    assert capped["steps"] == 11 and capped["epochs"] == 2


def test_gradient_accumulation_takes_fewer_optimizer_steps():
    run = train(_model(), Natural(), _problem(), Accelerator(cpu=True, gradient_accumulation_steps=2),
                TrainConfig(epochs=2, lr=0.05))
    assert run["steps"] == 2 * 4


def test_a_diverging_loss_stops_with_one_line():
    def exploding(model, x, y):
        return model(x).sum() * float("nan"), {}

    with pytest.raises(RRMError, match="loss became nan at step 0"):
        train(_model(), exploding, _problem(), Accelerator(cpu=True), TrainConfig(epochs=1))


def test_free_adversarial_training_replays_each_minibatch():
    from rrm_hub.methods import FreeAdversarialTraining

    objective = FreeAdversarialTraining(eps=0.1, replays=3)
    run = train(_model(), objective, _problem(), Accelerator(cpu=True), TrainConfig(epochs=1, lr=0.05))
    assert run["steps"] == 8 * 3
    assert 0 < objective.delta.abs().max() <= 0.1 + 1e-6  # the perturbation moved, inside the ball
