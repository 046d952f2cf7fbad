"""Prediction must never hurt: fidelity ratios below 1 on a real (noisy) training run.

The default (calibrated, gains fitted per horizon) is below 1 wherever some prediction helps,
also at learning rates where the uncalibrated formulas lose to the stale weights, and at the
stale weights (within 0.1%) where nothing predicts.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from predictopt import PredictiveOptimizer
from predictopt.fidelity import fidelity_ratios
from predictopt.testing import make_params

O = torch.optim
CONFIGS = {
    "sgd": lambda p: O.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: O.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: O.Adam(p, lr=1e-3),
    "adam-amsgrad": lambda p: O.Adam(p, lr=1e-3, amsgrad=True),
    "adamw": lambda p: O.AdamW(p, lr=1e-3, weight_decay=0.1),
    "adamax": lambda p: O.Adamax(p, lr=2e-3),
    "nadam": lambda p: O.NAdam(p, lr=1e-3),
    "radam": lambda p: O.RAdam(p, lr=1e-3),
    "rmsprop": lambda p: O.RMSprop(p, lr=1e-3),
    "rmsprop-centered": lambda p: O.RMSprop(p, lr=1e-3, centered=True),
    "rmsprop-momentum": lambda p: O.RMSprop(p, lr=1e-3, momentum=0.9),
    "adagrad": lambda p: O.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: O.Adadelta(p, lr=1.0),
    "rprop": lambda p: O.Rprop(p, lr=1e-3),
    "asgd": lambda p: O.ASGD(p, lr=1e-2),
    "adafactor": lambda p: O.Adafactor(p, lr=1e-2),
}
# larger learning rates, where several uncalibrated rules lose to the stale weights
HIGH_LR = {
    "sgd": lambda p: O.SGD(p, lr=0.3),
    "sgd-momentum": lambda p: O.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: O.Adam(p, lr=1e-2),
    "adamw": lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamax": lambda p: O.Adamax(p, lr=2e-2),
    "nadam": lambda p: O.NAdam(p, lr=1e-2),
    "radam": lambda p: O.RAdam(p, lr=1e-2),
    "rmsprop": lambda p: O.RMSprop(p, lr=3e-3),
    "rmsprop-centered": lambda p: O.RMSprop(p, lr=3e-3, centered=True),
    "rmsprop-momentum": lambda p: O.RMSprop(p, lr=3e-3, momentum=0.9),
    "asgd": lambda p: O.ASGD(p, lr=0.1),
    "adafactor": lambda p: O.Adafactor(p, lr=0.1),
}
# learning rates so large that the updates are dominated by oscillation and noise: no rule
# foresees them (uncalibrated, every prediction loses to the stale weights)
UNPREDICTABLE = {
    "rmsprop": lambda p: O.RMSprop(p, lr=1e-2),
    "adagrad": lambda p: O.Adagrad(p, lr=0.1),
    "adadelta": lambda p: O.Adadelta(p, lr=10.0),
}


def digits_matrices_problem(seed: int = 0):
    """The digits MLP without biases (Muon takes matrices only)."""
    from torch import nn

    from predictopt.fidelity import digits_mlp_problem

    _, x, y = digits_mlp_problem(seed)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.Tanh(),
                         nn.Linear(32, 10, bias=False)), x, y


@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prediction_beats_stale_weights(name, calibrate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratios = fidelity_ratios(CONFIGS[name], steps=(1, 2, 4), updates=150, seed=1,
                                 calibrate=calibrate)
    assert all(r < 1.0 for r in ratios.values()), ratios


@pytest.mark.parametrize("name", sorted(HIGH_LR))
def test_default_prediction_beats_stale_weights_at_large_learning_rates(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratios = fidelity_ratios(HIGH_LR[name], steps=(1, 2, 4), updates=150, seed=1,
                                 calibrate=True)
    assert all(r < 1.0 for r in ratios.values()), ratios


@pytest.mark.parametrize("name", sorted(UNPREDICTABLE))
def test_where_nothing_predicts_the_default_stays_at_the_stale_weights(name):
    """The calibrated gains go to about 0: the default predicts (almost) the stale weights,
    within 0.1% of their distance (it cannot beat them), where the formulas are 4% to 25%
    worse than the stale weights."""
    plain = fidelity_ratios(UNPREDICTABLE[name], steps=(1, 2, 4), updates=150, seed=1,
                            calibrate=False)
    assert all(r > 1.04 for r in plain.values()), plain
    default = fidelity_ratios(UNPREDICTABLE[name], steps=(1, 2, 4), updates=150, seed=1,
                              calibrate=True)
    assert all(r < 1.001 for r in default.values()), default


@pytest.mark.parametrize(("momentum", "calibrate"), [(0.95, False), (0.95, True), (0.0, True)])
def test_muon_prediction_beats_stale_weights(momentum, calibrate):
    """Muon's rule, and without momentum (NS of the last gradient) the calibrated default."""
    ratios = fidelity_ratios(lambda p: O.Muon(p, lr=0.02, momentum=momentum), steps=(1, 2, 4),
                             updates=150, seed=1, calibrate=calibrate,
                             problem=digits_matrices_problem)
    assert all(r < 1.0 for r in ratios.values()), ratios


def test_repeating_the_last_update_hurts_and_calibration_rescues_it():
    """The measurement can fail: 'repeat the last update' on RMSprop is worse than stale."""
    plain = fidelity_ratios(CONFIGS["rmsprop"], steps=(1, 4), updates=150, rule="last-update")
    assert plain[1] > 1.0
    calibrated = fidelity_ratios(CONFIGS["rmsprop"], steps=(1, 4), updates=150,
                                 rule="last-update", calibrate=True)
    assert all(r < 1.0 for r in calibrated.values()), calibrated


def test_calibration_keeps_constant_gradient_exactness():
    params = make_params([(4, 3)], torch.float64)
    opt = PredictiveOptimizer(O.Adam(params, lr=1e-2), steps=3, calibrate=True)
    g = torch.randn(4, 3, dtype=torch.float64)

    def run(n):
        for _ in range(n):
            params[0].grad = g.clone()
            opt.step()

    run(3)
    (alpha,) = opt.calibration_scales()
    assert 1 - 1e-9 < alpha <= 1.0
    assert "predictopt_calibration" in opt.state_dict()["param_groups"][0]
    with opt.predicted():
        pred = params[0].detach().clone()
    run(3)
    torch.testing.assert_close(pred, params[0].detach(), rtol=0, atol=1e-13)


def test_calibration_rejects_bad_arguments():
    params = make_params([(2,)])
    with pytest.raises(TypeError, match="calibrate must be a bool"):
        PredictiveOptimizer(O.SGD(params, lr=0.1), calibrate="yes")
    with pytest.raises(ValueError, match=r"calibration_beta must be a float in \[0, 1\)"):
        PredictiveOptimizer(O.SGD(params, lr=0.1), calibrate=True, calibration_beta=1.0)
