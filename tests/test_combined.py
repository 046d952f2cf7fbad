"""predictopt.combined: several optimizers as one (Muon for the matrices, AdamW for the rest)."""

from __future__ import annotations

import copy

import pytest
import torch

from predictopt import PredictiveOptimizer, predict
from predictopt.combined import CombinedOptimizer


def _model_and_parts(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    mats = [p for p in m.parameters() if p.ndim == 2]
    rest = [p for p in m.parameters() if p.ndim != 2]
    return m, mats, rest


def _train(m, opt, steps=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()


def test_combined_steps_every_part_exactly_as_alone():
    m1, mats1, rest1 = _model_and_parts()
    m2, mats2, rest2 = _model_and_parts()
    combined = CombinedOptimizer([torch.optim.Muon(mats1, lr=1e-2),
                                  torch.optim.AdamW(rest1, lr=1e-2)])
    muon, adamw = torch.optim.Muon(mats2, lr=1e-2), torch.optim.AdamW(rest2, lr=1e-2)

    class Both:
        def zero_grad(self):
            muon.zero_grad()
            adamw.zero_grad()

        def step(self):
            muon.step()
            adamw.step()

    _train(m1, combined)
    _train(m2, Both())
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert len(combined.param_groups) == 2 and len(combined.state) == 4
    assert combined.param_groups[0] is combined.optimizers[0].param_groups[0]


def test_scheduler_checkpoint_and_prediction_through_the_parts():
    m, mats, rest = _model_and_parts()
    combined = CombinedOptimizer([torch.optim.Muon(mats, lr=1e-2),
                                  torch.optim.AdamW(rest, lr=1e-2)])
    opt = PredictiveOptimizer(combined, steps=2, calibrate=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(m, opt)
    sched.step()
    assert [g["lr"] for g in combined.param_groups] == [5e-3, 5e-3]
    pred = predict(opt, 2)
    muon_rule = predict(combined.optimizers[0], 2)  # each part with its own rule
    adam_rule = predict(combined.optimizers[1], 2)
    for p in mats:
        assert torch.equal(pred[p], muon_rule[p]) and not torch.equal(pred[p], p)
    for p in rest:
        assert torch.equal(pred[p], adam_rule[p])
    sd = copy.deepcopy(opt.state_dict())
    m2, mats2, rest2 = _model_and_parts()
    m2.load_state_dict(m.state_dict())
    other = CombinedOptimizer([torch.optim.Muon(mats2, lr=1e-2),
                               torch.optim.AdamW(rest2, lr=1e-2)])
    other.load_state_dict(sd)
    again = predict(PredictiveOptimizer(other, steps=2, calibrate=False), 2)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(pred[p], again[q])
    with pytest.raises(ValueError, match="list of 2"):
        other.load_state_dict({"optimizers": []})


def test_combined_rejects_bad_parts():
    m, mats, rest = _model_and_parts()
    with pytest.raises(ValueError, match="at least one"):
        CombinedOptimizer([])
    with pytest.raises(ValueError, match="two of the optimizers"):
        CombinedOptimizer([torch.optim.SGD(mats, lr=0.1), torch.optim.SGD(mats, lr=0.1)])
    with pytest.raises(TypeError, match="bare"):
        CombinedOptimizer([PredictiveOptimizer(torch.optim.SGD(rest, lr=0.1))])
    c = CombinedOptimizer([torch.optim.SGD(rest, lr=0.1)])
    with pytest.raises(TypeError, match="add the group"):
        c.add_param_group({"params": mats})
