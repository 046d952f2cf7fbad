"""Prediction rules for the Schedule-Free optimizers (optional dependency ``schedulefree``)."""

from __future__ import annotations

import pytest
import torch

from predictopt import PredictiveOptimizer, predict
from predictopt.fidelity import fidelity_ratios
from predictopt.rules import ScheduleFreeRule
from predictopt.testing import check_rule, make_params, run_updates

schedulefree = pytest.importorskip("schedulefree")

FACTORIES = {
    "sgd": lambda ps: schedulefree.SGDScheduleFree(ps, lr=0.05, warmup_steps=5),
    "adamw": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2, warmup_steps=5),
    "radam": lambda ps: schedulefree.RAdamScheduleFree(ps, lr=1e-2),
}


def _train_mode(factory):
    def make(ps):
        opt = factory(ps)
        opt.train()
        return opt
    return make


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_rule_is_registered_and_passes_the_property_suite(name):
    make = _train_mode(FACTORIES[name])
    assert isinstance(PredictiveOptimizer(make(make_params([(2,)]))).rule, ScheduleFreeRule)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        check_rule(make, dtype=dtype)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_prediction_applies_to_the_training_point_only(name):
    params = make_params([(3, 2), (4,)])
    # pure-noise gradients: the calibrated default rightly declines to move, so the rule is
    # checked uncalibrated
    opt = PredictiveOptimizer(_train_mode(FACTORIES[name])(params), steps=2, calibrate=False)
    run_updates(opt, params, 10)  # RAdamScheduleFree does not move during its first steps
    moved = predict(opt, 2)
    assert any(not torch.equal(moved[p], p) for p in params)
    opt.eval()  # parameters now hold x, the average
    x = [p.detach().clone() for p in params]
    with opt.predicted():
        assert all(torch.equal(a, p) for a, p in zip(x, params))
    opt.train()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_schedulefree_prediction_beats_stale_weights(name):
    def make(ps):
        opt = FACTORIES[name](ps)
        opt.train()
        return opt

    ratios = fidelity_ratios(make, steps=(1, 2, 4), updates=150)
    assert all(r < 1.0 for r in ratios.values()), ratios
