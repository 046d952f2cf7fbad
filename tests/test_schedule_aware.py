"""Schedule-aware prediction: the lrs of the predicted updates come from the scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt import PredictiveOptimizer, predict
from predictopt.lr_scheduler import REX, future_lrs
from predictopt.testing import make_params
from tests._hyp import props

S = torch.optim.lr_scheduler

SCHEDULERS = {
    "step": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "lambda": lambda o: S.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    # cycle_momentum changes Adam's beta1 too; only learning rates are looked ahead
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=40, cycle_momentum=False),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=10),
    "rex": lambda o: REX(o, total_steps=30, warmup_steps=3),
    "sequential": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.ExponentialLR(o, gamma=0.8)],
        milestones=[3]),
}
OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.02),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.02),
}


@props(25)
@given(sched=st.sampled_from(sorted(SCHEDULERS)), name=st.sampled_from(sorted(OPTIMIZERS)),
       steps=st.integers(1, 7), warmup=st.integers(1, 6), seed=st.integers(0, 1000))
def test_constant_gradient_is_exact_under_a_known_schedule(sched, name, steps, warmup, seed):
    params = make_params([(4, 3), (5,)], torch.float64, seed)
    gs = [torch.randn_like(p) for p in params]
    opt = PredictiveOptimizer(OPTIMIZERS[name](params), steps=steps)
    scheduler = SCHEDULERS[sched](opt)
    opt.attach_scheduler(scheduler)

    def run(n):
        for _ in range(n):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            scheduler.step()

    run(warmup)
    sd = copy.deepcopy(scheduler.state_dict())
    lr = opt.param_groups[0]["lr"]
    pred = predict(opt, steps)
    pred = [pred[p].clone() for p in params]
    with opt.predicted():
        inplace = [p.detach().clone() for p in params]
    assert scheduler.state_dict() == sd and opt.param_groups[0]["lr"] == lr  # undisturbed
    assert all(torch.equal(a, b) for a, b in zip(pred, inplace))
    run(steps)
    for a, p in zip(pred, params):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-12 * (steps + 1))


def test_without_the_scheduler_the_prediction_is_off():
    """The check above can fail: a plain prediction misses a decaying schedule."""
    params = make_params([(6,)], torch.float64)
    g = torch.ones(6, dtype=torch.float64)
    opt = PredictiveOptimizer(torch.optim.Adam(params, lr=0.1), steps=4)
    scheduler = S.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        params[0].grad = g.clone()
        opt.step()
        scheduler.step()
    plain = predict(opt, 4)[params[0]].clone()
    opt.attach_scheduler(scheduler)
    aware = predict(opt, 4)[params[0]].clone()
    for _ in range(4):
        params[0].grad = g.clone()
        opt.step()
        scheduler.step()
    assert (plain - params[0]).abs().max() > 1e-3
    torch.testing.assert_close(aware, params[0].detach(), rtol=0, atol=1e-12)


def test_future_lrs_values_and_plateau():
    params = make_params([(2,)])
    opt = torch.optim.SGD(params, lr=1.0)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    assert future_lrs(sched, 3) == [[1.0, 0.5, 0.25]]
    assert opt.param_groups[0]["lr"] == 1.0 and sched.last_epoch == 0
    plateau = S.ReduceLROnPlateau(opt)
    assert future_lrs(plateau, 2) == [[1.0, 1.0]]


def test_attach_scheduler_rejects_a_foreign_scheduler():
    a = PredictiveOptimizer(torch.optim.SGD(make_params([(2,)]), lr=0.1))
    other = torch.optim.SGD(make_params([(2,)]), lr=0.1)
    with pytest.raises(TypeError, match="scheduler must be"):
        a.attach_scheduler(S.StepLR(other, 1))
