"""Tests for predictopt.spike (Spike Compensation, Kosson et al. 2021)."""

from __future__ import annotations

import copy
import io
import pickle
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.spike import SpikeCompensatedSGD, spike_coefficients
from tests._hyp import props


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 2), ()]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def _groups(params: list[torch.nn.Parameter], **extra) -> list[dict]:
    return [
        {"params": params[:2]},
        {"params": params[2:3], "lr": 0.03, "momentum": 0.5, **extra},
        {"params": params[3:], "momentum": 0.0, "weight_decay": 0.0},
    ]


def _feed(opt_params: list[list[torch.nn.Parameter]], grads: list[torch.Tensor]) -> None:
    for params in opt_params:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()


# --- (1) delay 0 is torch.optim.SGD, bit for bit ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True, None])
@pytest.mark.parametrize("maximize", [False, True])
def test_delay_zero_is_bitwise_torch_sgd(dtype, foreach, maximize):
    init = _params(dtype)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "maximize": maximize}
    opt = SpikeCompensatedSGD(_groups(ours), delay=0, foreach=foreach, **kw)
    sgd = torch.optim.SGD(_groups(ref), foreach=foreach, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in init]
        _feed([ours, ref], grads)
        if step == 3:  # a parameter without gradient is skipped by both
            ours[1].grad = ref[1].grad = None
        opt.step()
        sgd.step()
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(ours, ref, strict=True):
        if b in sgd.state:
            assert torch.equal(opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])


def test_is_sgd_subclass_with_sgd_state_keys():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SpikeCompensatedSGD([p], lr=0.1, momentum=0.9, delay=2)
    assert isinstance(opt, torch.optim.SGD)
    p.grad = torch.ones(3)
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}
    group = opt.param_groups[0]
    assert group["delay"] == 2 and group["dampening"] == 0 and group["nesterov"] is False


# --- spike_coefficients ------------------------------------------------------------------------


@props(100)
@given(m=st.floats(0.0, 0.999), d=st.integers(0, 64))
def test_coefficients_give_total_of_undelayed_steps(m, d):
    a, b = spike_coefficients(m, d)
    exact_m = Fraction(m)
    assert a == pytest.approx(float(exact_m**d), rel=1e-13, abs=1e-300)
    geometric = sum(exact_m**i for i in range(d))  # b = 1 + m + ... + m^(D-1)
    assert b == pytest.approx(float(geometric), rel=1e-12)
    total = sum(exact_m**i for i in range(d + 1))  # (1 - m^(D+1)) / (1 - m)
    assert a + b == pytest.approx(float(total), rel=1e-12)


def test_coefficients_special_cases():
    assert spike_coefficients(0.9, 0) == (1.0, 0.0)
    assert spike_coefficients(0.0, 0) == (1.0, 0.0)
    assert spike_coefficients(0.0, 3) == (0.0, 1.0)
    assert spike_coefficients(0.5, 1) == (0.5, 1.0)


# --- (2) the Spike Compensation property --------------------------------------------------------


def _scalar_trajectory(opt_cls, grads: list[float], lr: float, m: float, **kw) -> list[float]:
    w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = opt_cls([w], lr=lr, momentum=m, **kw)
    out = []
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(w.item())
    return out


@props(60)
@given(
    m=st.floats(0.0, 0.99),
    d=st.integers(0, 12),
    lr=st.floats(1e-3, 1.0),
    g=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3),
    tail=st.integers(1, 25),
    foreach=st.booleans(),
)
def test_delayed_gradient_gets_the_undelayed_contributions(m, d, lr, g, tail, foreach):
    # SC run: the gradient computed at update 0 arrives at its update 0 (its clock is D updates
    # behind). Reference: undelayed momentum SGD that received the same gradient D updates
    # earlier, i.e. at its update 0 as well, and zeros afterwards.
    sc = _scalar_trajectory(
        SpikeCompensatedSGD, [g] + [0.0] * tail, lr, m, delay=d, foreach=foreach
    )
    ref = _scalar_trajectory(torch.optim.SGD, [g] + [0.0] * (d + tail), lr, m)
    scale = lr * abs(g) / (1.0 - m)  # bound on any cumulative displacement

    # At arrival: lr * (1 - m^(D+1)) / (1 - m) * g, the reference's total over D + 1 updates.
    arrival = lr * float(sum(Fraction(m) ** i for i in range(d + 1))) * g
    assert -sc[0] == pytest.approx(arrival, rel=1e-12)
    # j updates later: lr * m^(D+j) * g, as the reference applies D + j updates after g.
    for j in range(1, tail + 1):
        expected = lr * float(Fraction(m) ** (d + j)) * g
        assert sc[j - 1] - sc[j] == pytest.approx(expected, rel=1e-12, abs=1e-12 * scale)
    # Cumulative displacement after arrival agrees with the undelayed run D updates ahead.
    # Not bitwise: SC adds a*v + b*g (rounded coefficients, one rounded sum) in one update,
    # whereas the reference rounds w after each of its D + 1 separate updates.
    for k in range(tail + 1):
        assert sc[k] == pytest.approx(ref[d + k], rel=1e-12, abs=1e-12 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_and_loop_agree_with_formula_for_delays(dtype):
    init = _params(dtype, seed=3)
    runs = {}
    for foreach in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [
            {"params": ps[:2], "delay": 3},
            {"params": ps[2:3], "delay": 1, "momentum": 0.5},
            {"params": ps[3:], "delay": 5, "momentum": 0.0},
        ]
        opt = SpikeCompensatedSGD(
            groups, lr=0.05, momentum=0.9, weight_decay=1e-3, maximize=True, foreach=foreach
        )
        runs[foreach] = (ps, opt)

    # Independent float64 reference of the documented math.
    ref_w = [t.double().clone() for t in init]
    ref_v: list[torch.Tensor | None] = [None] * len(init)
    cfg = [(0.9, 3)] * 2 + [(0.5, 1), (0.0, 5)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(15):
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in init]
        _feed([runs[False][0], runs[True][0]], grads)
        runs[False][1].step()
        runs[True][1].step()
        for i, ((m, d), g) in enumerate(zip(cfg, grads, strict=True)):
            g = -g.double() + 1e-3 * ref_w[i]
            ref_v[i] = g.clone() if ref_v[i] is None else m * ref_v[i] + g
            a, b = (m**d, (1 - m**d) / (1 - m)) if m else (1.0, 0.0)
            ref_w[i] = ref_w[i] - 0.05 * (a * ref_v[i] + b * g)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for p_loop, p_fe, r in zip(runs[False][0], runs[True][0], ref_w, strict=True):
        torch.testing.assert_close(p_loop, p_fe, rtol=tol, atol=tol)
        torch.testing.assert_close(p_loop.double(), r, rtol=tol, atol=tol)


def test_first_step_mixed_buffers_foreach():
    # One parameter gets its first gradient later: v_1 = g_1 for it, a normal update for others.
    a_loop, b_loop = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    a_fe, b_fe = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    loop = SpikeCompensatedSGD([a_loop, b_loop], lr=0.1, delay=2, foreach=False)
    fe = SpikeCompensatedSGD([a_fe, b_fe], lr=0.1, delay=2, foreach=True)
    for step in range(4):
        for a, b in ((a_loop, b_loop), (a_fe, b_fe)):
            a.grad = torch.full((2,), 0.5 + step)
            b.grad = None if step == 0 else torch.full((3,), 1.0 - step)
        loop.step()
        fe.step()
        assert torch.equal(a_loop, a_fe) and torch.equal(b_loop, b_fe)


# --- (3) bad arguments --------------------------------------------------------------------------

BAD_KWARGS = [
    ({"delay": -1}, ValueError, "delay"),
    ({"delay": 1.5}, TypeError, "delay"),
    ({"delay": True}, TypeError, "delay"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"momentum": float("nan")}, ValueError, "momentum"),
    ({"dampening": 0.1}, ValueError, "dampening"),
    ({"nesterov": True}, ValueError, "nesterov"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
]


@pytest.mark.parametrize(("kwargs", "exc", "name"), BAD_KWARGS)
def test_bad_constructor_arguments(kwargs, exc, name):
    p = torch.nn.Parameter(torch.ones(2))
    kw = {"lr": 0.1, **kwargs}
    with pytest.raises(exc, match=name):
        SpikeCompensatedSGD([p], **kw)
    # In a group dict too.
    with pytest.raises(exc, match=name):
        SpikeCompensatedSGD([{"params": [p], **kwargs}], lr=0.1)


@pytest.mark.parametrize(("kwargs", "exc", "name"), BAD_KWARGS)
def test_bad_add_param_group_changes_nothing(kwargs, exc, name):
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SpikeCompensatedSGD([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=name):
        opt.add_param_group({"params": [q], **kwargs})
    assert len(opt.param_groups) == 1
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])


def test_load_state_dict_rejects_nesterov_before_changing_anything():
    p = torch.nn.Parameter(torch.ones(2))
    q = torch.nn.Parameter(torch.ones(2))
    nesterov = torch.optim.SGD([q], lr=0.5, momentum=0.9, nesterov=True)
    q.grad = torch.ones(2)
    nesterov.step()
    opt = SpikeCompensatedSGD([p], lr=0.1, delay=1)
    with pytest.raises(ValueError, match="nesterov"):
        opt.load_state_dict(nesterov.state_dict())
    assert opt.param_groups[0]["lr"] == 0.1 and not opt.state


def test_sparse_gradient_is_rejected():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = SpikeCompensatedSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# --- (4) state_dict ------------------------------------------------------------------------------


def _train(opt, params, grads_seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(grads_seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def test_state_dict_round_trip_resumes_bitwise():
    init = _params(torch.float32)
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SpikeCompensatedSGD(_groups(ps, delay=4), lr=0.1, delay=2)
    _train(opt, ps, 0, 5)
    buf = io.BytesIO()
    torch.save({"w": [p.detach().clone() for p in ps], "opt": opt.state_dict()}, buf)
    _train(opt, ps, 1, 5)

    buf.seek(0)
    saved = torch.load(buf)
    qs = [torch.nn.Parameter(w) for w in saved["w"]]
    opt2 = SpikeCompensatedSGD(_groups(qs), lr=0.7, delay=0)  # hyperparameters come from the file
    opt2.load_state_dict(saved["opt"])
    assert [g["delay"] for g in opt2.param_groups] == [2, 4, 2]
    _train(opt2, qs, 1, 5)
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)


def test_state_dict_loads_into_torch_sgd_and_back():
    init = _params(torch.float64)
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SpikeCompensatedSGD(_groups(ps), lr=0.1, momentum=0.9, delay=0)
    _train(opt, ps, 0, 4)
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in ps]
    _train(opt, ps, 1, 4)

    qs = [torch.nn.Parameter(w.clone()) for w in weights]
    sgd = torch.optim.SGD(_groups(qs), lr=0.1, momentum=0.9)
    sgd.load_state_dict(state)
    for p, q in zip(ps, qs, strict=True):
        if p in opt.state:
            assert set(sgd.state[q]) == {"momentum_buffer"}
    _train(sgd, qs, 1, 4)  # delay 0: the SGD continuation is the same, bit for bit
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)

    # And back: a torch.optim.SGD state (no "delay" key) gets the constructor's default delay.
    rs = [torch.nn.Parameter(w.clone()) for w in weights]
    back = SpikeCompensatedSGD(_groups(rs), lr=0.1, delay=3)
    back.load_state_dict(sgd.state_dict())
    assert [g["delay"] for g in back.param_groups][0] == 0  # saved by us, so it kept delay 0
    plain = torch.optim.SGD([{"params": [r]} for r in rs], lr=0.1, momentum=0.9)
    back2 = SpikeCompensatedSGD([{"params": [r]} for r in rs], lr=0.1, delay=3)
    back2.load_state_dict(plain.state_dict())
    assert all(g["delay"] == 3 for g in back2.param_groups)


def test_deepcopy_and_pickle():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SpikeCompensatedSGD([p], lr=0.1, delay=2)
    p.grad = torch.ones(3)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups[0]["delay"] == 2
        assert len(clone.state) == 1


def test_loading_a_fused_sgd_state_resets_implementation_flags():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.SGD([q], lr=0.1, momentum=0.9, fused=True)
    q.grad = torch.ones(3)
    fused.step()
    opt = SpikeCompensatedSGD([p], lr=0.1, delay=1)
    opt.load_state_dict(fused.state_dict())
    assert opt.param_groups[0]["fused"] is None
    assert opt.param_groups[0]["differentiable"] is False
    p.grad = torch.ones(3)
    opt.step()  # v = 0.9 * 1 + 1 = 1.9, update 0.1 * (0.9 * 1.9 + 1 * 1)
    assert torch.allclose(p, torch.full((3,), 1.0 - 0.1 * (0.9 * 1.9 + 1.0)))
