"""Tests for predictopt.lr_scheduler (REX schedule with linear warm-up)."""

from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.lr_scheduler import REX, rex_lr
from tests._hyp import props


def _reference(step: int, total: int, max_lr: float, min_lr: float, warmup: int) -> Fraction:
    """The documented schedule, in exact rational arithmetic (independent of the module)."""
    hi, lo = Fraction(max_lr), Fraction(min_lr)
    if step < warmup:
        return hi * Fraction(step + 1, warmup)
    z = min(Fraction(step - warmup, total - warmup), Fraction(1))
    return lo + (hi - lo) * (1 - z) / (1 - z / 2)


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def _run(opt: torch.optim.Optimizer, sched: REX, n: int) -> list[list[float]]:
    """Record the lr of every group used by each of ``n`` updates."""
    seen = []
    for _ in range(n):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize(
    ("total", "max_lr", "min_lr", "warmup"),
    [
        (10, 0.1, 0.0, 0),
        (100, 1.0, 1e-3, 0),
        (37, 0.3, 0.01, 5),
        (2, 0.5, 0.1, 1),
        (1, 0.2, 0.0, 0),
    ],
)
def test_rex_lr_matches_exact_formula(total: int, max_lr: float, min_lr: float, warmup: int):
    for step in range(total + 5):
        expected = float(_reference(step, total, max_lr, min_lr, warmup))
        assert rex_lr(step, total, max_lr, min_lr, warmup) == pytest.approx(expected, rel=1e-14)


def test_known_values_and_endpoints():
    # T = 4, z = 1/2: (1 - 1/2) / (1 - 1/4) = 2/3.
    assert rex_lr(2, 4, 0.3) == pytest.approx(0.2, rel=1e-15)
    assert rex_lr(0, 4, 0.3) == 0.3
    assert rex_lr(4, 4, 0.3, 0.05) == 0.05
    assert rex_lr(1000, 4, 0.3, 0.05) == 0.05
    # Decay starts at max_lr exactly, also with min_lr > 0 (no rounding of min + (max - min)).
    assert rex_lr(3, 10, 0.7, 0.1, warmup_steps=3) == 0.7


def test_warmup_values():
    max_lr, warmup = 0.3, 4
    got = [rex_lr(s, 20, max_lr, 0.01, warmup) for s in range(warmup + 1)]
    assert got[:warmup] == pytest.approx([max_lr * (s + 1) / warmup for s in range(warmup)])
    assert got[warmup - 1] == max_lr  # the ramp ends exactly on max_lr ...
    assert got[warmup] == max_lr  # ... and the decay phase starts there (z = 0).
    assert got == sorted(got)


def test_scheduler_follows_rex_lr_with_per_group_min_lr():
    opt = _optimizer(0.1, 0.02)
    sched = REX(opt, total_steps=12, min_lr=[0.001, 0.002], warmup_steps=3)
    seen = _run(opt, sched, 15)
    for step, lrs in enumerate(seen):
        assert lrs == [rex_lr(step, 12, 0.1, 0.001, 3), rex_lr(step, 12, 0.02, 0.002, 3)]
    assert sched.get_last_lr() == [0.001, 0.002]
    assert sched.rex_lr_at(5) == [rex_lr(5, 12, 0.1, 0.001, 3), rex_lr(5, 12, 0.02, 0.002, 3)]


def test_no_warnings_in_normal_use_and_closed_form():
    opt = _optimizer(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = REX(opt, total_steps=10, warmup_steps=2)
        _run(opt, sched, 4)
    sched.last_epoch = 7
    assert sched._get_closed_form_lr() == [rex_lr(7, 10, 0.1, 0.0, 2)]


def test_rex_lr_at_is_pure():
    opt = _optimizer(0.1)
    sched = REX(opt, total_steps=10)
    before = (copy.deepcopy(sched.state_dict()), opt.param_groups[0]["lr"])
    future = [sched.rex_lr_at(sched.last_epoch + j)[0] for j in range(4)]
    assert (sched.state_dict(), opt.param_groups[0]["lr"]) == before
    assert future == [rex_lr(j, 10, 0.1) for j in range(4)]


def test_state_dict_round_trip():
    opt = _optimizer(0.1, 0.05)
    sched = REX(opt, total_steps=20, min_lr=0.001, warmup_steps=4)
    _run(opt, sched, 7)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    tail = _run(opt, sched, 18)

    opt2 = _optimizer(0.1, 0.05)
    sched2 = REX(opt2, total_steps=20, min_lr=0.001, warmup_steps=4)  # before the optimizer load
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 7
    assert _run(opt2, sched2, 18) == tail


def test_resume_with_last_epoch():
    opt = _optimizer(0.1)
    sched = REX(opt, total_steps=10, warmup_steps=2)
    _run(opt, sched, 5)
    resumed = REX(opt, total_steps=10, warmup_steps=2, last_epoch=4)
    assert opt.param_groups[0]["lr"] == rex_lr(5, 10, 0.1, 0.0, 2)
    assert resumed.last_epoch == 5


def test_tensor_lr_does_not_break():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.1, dtype=torch.float64))
    sched = REX(opt, total_steps=6, warmup_steps=2)
    for step in range(8):
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        assert opt.param_groups[0]["lr"].item() == pytest.approx(rex_lr(step, 6, 0.1, 0.0, 2))
        opt.step()
        sched.step()


BAD_ARGS = [
    ({"total_steps": 0}, ValueError, "total_steps"),
    ({"total_steps": -3}, ValueError, "total_steps"),
    ({"total_steps": 10.0}, TypeError, "total_steps"),
    ({"total_steps": True}, TypeError, "total_steps"),
    ({"total_steps": 10, "warmup_steps": 10}, ValueError, "warmup_steps"),
    ({"total_steps": 10, "warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"total_steps": 10, "warmup_steps": 2.5}, TypeError, "warmup_steps"),
    ({"total_steps": 10, "min_lr": -0.1}, ValueError, "min_lr"),
    ({"total_steps": 10, "min_lr": 0.2}, ValueError, "min_lr"),
    ({"total_steps": 10, "min_lr": math.nan}, ValueError, "min_lr"),
    ({"total_steps": 10, "min_lr": "0"}, TypeError, "min_lr"),
    ({"total_steps": 10, "min_lr": [0.0, 0.0]}, ValueError, "min_lr"),
    ({"total_steps": 10, "last_epoch": -2}, ValueError, "last_epoch"),
]


@pytest.mark.parametrize(("kwargs", "exc", "name"), BAD_ARGS)
def test_bad_arguments_raise_before_any_change(kwargs, exc, name):
    opt = _optimizer(0.1)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    step_before = opt.step
    with pytest.raises(exc, match=name):
        REX(opt, **kwargs)
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
    ] == groups_before
    assert "initial_lr" not in opt.param_groups[0]
    assert opt.step == step_before  # the step-counting wrapper was not installed either


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="optimizer"):
        REX(object(), total_steps=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "exc", "name"),
    [
        ((-1, 10, 0.1), ValueError, "step"),
        ((0, 0, 0.1), ValueError, "total_steps"),
        ((0, 10, -0.1), ValueError, "max_lr"),
        ((0, 10, 0.1, 0.2), ValueError, "min_lr"),
        ((0, 10, 0.1, 0.0, 10), ValueError, "warmup_steps"),
        ((0.5, 10, 0.1), TypeError, "step"),
    ],
)
def test_rex_lr_bad_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        rex_lr(*args)


@props(150)
@given(
    total=st.integers(1, 2000),
    warmup_frac=st.floats(0.0, 0.99),
    max_lr=st.floats(1e-8, 10.0),
    min_frac=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
)
def test_property_monotone_bounded_endpoints(total, warmup_frac, max_lr, min_frac):
    warmup = min(int(warmup_frac * total), total - 1)
    min_lr = min(max_lr * min_frac, max_lr)
    lrs = [rex_lr(s, total, max_lr, min_lr, warmup) for s in range(warmup, total + 3)]
    assert lrs[0] == max_lr  # t = 0 after warm-up
    assert lrs[total - warmup] == min_lr  # end of the schedule, and it stays there
    assert lrs[-1] == min_lr
    assert all(min_lr <= lr <= max_lr for lr in lrs)
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:], strict=False))
    ramp = [rex_lr(s, total, max_lr, min_lr, warmup) for s in range(warmup)]
    assert all(0 < lr <= max_lr for lr in ramp)
    assert ramp == sorted(ramp)
