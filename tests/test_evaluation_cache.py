"""A teacher's evaluation is measured once and reused only for the same weights, images and attack settings."""

import copy
import json

import torch

from rrm_hub import make_loader
from rrm_hub.evaluation import cache as evaluation_cache
from rrm_hub.evaluation.evaluate import robustness_report
from rrm_hub.teachers import load as teachers


def test_a_teachers_report_is_reused_only_when_weights_images_and_attacks_match(teacher, mnist, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(teachers, "ASSETS", tmp_path / "assets")  # no shipped evaluations
    settings = {"eps": 0.3, "norm": "linf", "suite": "pgd", "steps": 2, "checks": False, "sweep_eps": None,
                "sweep_steps": 2, "seed": 0}
    calls = []

    def report(model, loader, eps=0.3):
        def measure():
            calls.append(1)
            return robustness_report(model, loader, None, eps=eps, steps=2, checks=False)
        return evaluation_cache.cached_report(model, loader, None, {**settings, "eps": eps}, measure, "here")

    loader = make_loader(mnist, "test", 8, limit=16)
    first = report(teacher, loader)
    assert first["cached"] is None and len(calls) == 1
    again = report(teacher, loader)
    assert len(calls) == 1 and again["cached"]["measured_on"] == "here"
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    report(teacher, make_loader(mnist, "test", 8, limit=17))  # other images
    report(teacher, loader, eps=0.2)  # another attack
    moved = copy.deepcopy(teacher)  # one weight moved
    with torch.no_grad():
        next(moved.parameters()).add_(1e-3)
    report(moved, loader)
    assert len(calls) == 4
    # an evaluation shipped beside a bundled teacher is found first
    cached = evaluation_cache.places(evaluation_cache.model_hash(teacher))[-1]
    shipped = tmp_path / "assets" / "some-teacher" / evaluation_cache.EVALUATIONS_FILE
    shipped.parent.mkdir(parents=True)
    shipped.write_text(cached.read_text())
    cached.unlink()
    assert report(teacher, loader)["cached"]["from"] == str(shipped) and len(calls) == 4
    assert json.loads(shipped.read_text())[0]["key"]["num_examples"] == 16
