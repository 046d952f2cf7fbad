"""RotatedAdamW (basis rotation) and the ``basis-rotation`` method."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.basis_rotation import RotatedAdamW
from predictopt.data import mlp_stages
from predictopt.pipeline import PipelineSimulator, get_method
from predictopt.pipeline.methods import StageContext
from predictopt.pipeline.transforms import BasisRotation
from tests._hyp import props

torch.set_num_threads(1)


def _train(make, params, steps, seed=1, grads=None):
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = make(ps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return ps, opt


@props(30)
@given(shapes=st.lists(st.sampled_from([(5,), (3, 4), (2, 2, 3), (1,)]), min_size=1,
                       max_size=3),
       lr=st.floats(1e-4, 1e-1), wd=st.sampled_from([0.0, 0.01, 0.3]),
       decoupled=st.booleans(), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.999),
       steps=st.integers(1, 6))
def test_unrotated_parameters_are_torch_adamw_bit_for_bit(shapes, lr, wd, decoupled, b1, b2,
                                                          steps):
    """Parameters without a rotated side (not matrices, or sides over ``max_dim``) take
    torch's single-tensor Adam/AdamW update exactly."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    kw = {"lr": lr, "weight_decay": wd, "betas": (b1, b2)}
    ours, _ = _train(lambda q: RotatedAdamW(q, max_dim=1, decoupled_weight_decay=decoupled,
                                            **kw), params, steps)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    theirs, _ = _train(lambda q: cls(q, foreach=False, **kw), params, steps)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def _fit(make, w0, loss, steps=25):
    w = w0.clone().requires_grad_()
    opt = make([w])
    for _ in range(steps):
        opt.zero_grad()
        loss(w).backward()
        opt.step()
    return w.detach()


@props(20)
@given(seed=st.integers(0, 10_000), rows=st.integers(2, 5), extra=st.integers(0, 1),
       freq=st.integers(1, 5))
def test_rotated_adam_does_not_depend_on_the_coordinates(seed, rows, extra, freq):
    r"""Adam in the eigenbasis is invariant under an orthogonal change of coordinates
    $W \mapsto U W V^\top$ of a matrix parameter (plain Adam is not: that is the misalignment
    basis rotation removes). Equal up to rounding, which Adam's normalisation amplifies by at
    most about 1 / eps. The bases must be unique up to signs for this to hold: the first
    update's covariances have rank ``min(rows, cols)``, so the null space of the larger one is
    an arbitrary choice when it has more than one dimension (then the runs differ); hence
    ``cols - rows`` in {0, 1}."""
    cols = rows + extra
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows + 3, rows, generator=gen, dtype=torch.float64)
    b = torch.randn(cols, cols + 3, generator=gen, dtype=torch.float64)
    c = torch.randn(rows + 3, cols + 3, generator=gen, dtype=torch.float64)
    u, v = _orthogonal(rows, gen), _orthogonal(cols, gen)
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64)

    def loss(w):
        return 0.5 * (a @ w @ b - c).square().sum()

    def loss_rotated(w):
        return loss(u.T @ w @ v)

    def rotated(q):
        return RotatedAdamW(q, lr=1e-2, eps=1e-4, precondition_frequency=freq)

    w = _fit(rotated, w0, loss)
    w_rot = _fit(rotated, u @ w0 @ v.T, loss_rotated)
    # a coordinate whose moments are pure rounding (~1e-16 of gradients ~1e2) moves by up to
    # lr * (1e-14 / eps) per update: ~1e-12 .. 1e-9 over the run; plain AdamW differs by ~1e-1
    assert torch.allclose(u @ w @ v.T, w_rot, rtol=0, atol=1e-7)
    assert not torch.allclose(w, w0, atol=1e-3)  # it moved


def test_plain_adam_does_depend_on_the_coordinates():
    """The counterpart of the invariance test: the same check fails for AdamW."""
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 3, generator=gen, dtype=torch.float64),
               torch.randn(4, 7, generator=gen, dtype=torch.float64),
               torch.randn(6, 7, generator=gen, dtype=torch.float64))
    u, v = _orthogonal(3, gen), _orthogonal(4, gen)
    w0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def loss(w):
        return 0.5 * (a @ w @ b - c).square().sum()

    def adamw(q):
        return torch.optim.AdamW(q, lr=1e-2, eps=1e-4)

    w = _fit(adamw, w0, loss)
    w_rot = _fit(adamw, u @ w0 @ v.T, lambda x: loss(u.T @ x @ v))
    assert not torch.allclose(u @ w @ v.T, w_rot, rtol=0, atol=1e-3)


@props(15)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), steps=st.integers(1, 25),
       freq=st.integers(1, 4))
def test_bases_stay_orthonormal(rows, cols, steps, freq):
    torch.manual_seed(0)
    (p,), opt = _train(lambda q: RotatedAdamW(q, precondition_frequency=freq),
                       [torch.randn(rows, cols, dtype=torch.float64)], steps)
    st_ = opt.state[p]
    for side, n in (("L", rows), ("R", cols)):
        q = st_[f"Q_{side}"]
        assert q.shape == (n, n)
        assert torch.allclose(q.T @ q, torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_checkpoint_resumes_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(3)]
    full, _ = _train(lambda q: RotatedAdamW(q, precondition_frequency=3), params, 8)
    first, opt = _train(lambda q: RotatedAdamW(q, precondition_frequency=3), params, 5)
    saved = opt.state_dict()
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = RotatedAdamW(resumed, precondition_frequency=3)
    opt2.load_state_dict(saved)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # replay the gradient stream up to where the first run stopped
        for p in resumed:
            torch.randn(p.shape, generator=gen)
    for _ in range(3):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=gen)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"precondition_frequency": 0},
                                               "precondition_frequency"),
    ({"shampoo_beta": 1.5}, "shampoo_beta"), ({"max_dim": 0}, "max_dim"),
    ({"decoupled_weight_decay": 1}, "decoupled_weight_decay")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RotatedAdamW([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=name):
        RotatedAdamW([{"params": [torch.zeros(2, requires_grad=True)], **kwargs}])


# ------------------------------------------------------------------ the transform and method


def _ctx():
    return StageContext(staleness=(0, 1), update_every=1, stage=0, num_stages=2)


def test_transform_converts_adam_over_the_same_groups():
    m = torch.nn.Linear(3, 2)
    user = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(user, step_size=1, gamma=0.5)
    new = BasisRotation(precondition_frequency=7).prepare(user, _ctx())
    assert isinstance(new, RotatedAdamW)
    g = new.param_groups[0]
    assert g is user.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["decoupled_weight_decay"],
            g["precondition_frequency"]) == (3e-3, (0.8, 0.95), 0.1, True, 7)
    user.step()  # what a scheduler sees
    sched.step()
    assert new.param_groups[0]["lr"] == 1.5e-3
    assert BasisRotation().prepare(new, _ctx()) is new  # idempotent
    adam = BasisRotation().prepare(torch.optim.Adam(m.parameters(), weight_decay=0.1), _ctx())
    assert adam.param_groups[0]["decoupled_weight_decay"] is False


def test_transform_refuses_what_it_cannot_convert():
    m = torch.nn.Linear(3, 2)
    for opt in (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                torch.optim.AdamW(m.parameters(), amsgrad=True),
                torch.optim.Adam(m.parameters(), maximize=True)):
        with pytest.raises(ValueError, match="basis rotation converts Adam or AdamW"):
            BasisRotation().prepare(opt, _ctx())
    used = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 3)).sum().backward()
    used.step()
    with pytest.raises(ValueError, match="must be fresh"):
        BasisRotation().prepare(used, _ctx())
    with pytest.raises(ValueError, match="precondition_frequency"):
        BasisRotation(precondition_frequency=0)


def _simulate(method, make):
    """Three steps of a 3-stage MLP in the simulator: (weights, losses, simulator)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    ms = mlp_stages(5, 8, 3, 3, seed=1)
    sim = PipelineSimulator(ms, make, method=method, n_microbatches=4)
    losses = [v for _ in range(3) for v in sim.step(x, y)]
    return [p.detach().clone() for m in ms for p in m.parameters()], losses, sim


def test_basis_rotation_method_trains_rotated_adam_on_weight_stashing():
    """The method is pipedream (weight stashing) with the converted optimizer: equal, bit for
    bit, to pipedream given RotatedAdamW directly."""
    wa, la, sim = _simulate("basis-rotation", lambda p: torch.optim.AdamW(p, lr=1e-2))
    wb, lb, _ = _simulate("pipedream", lambda p: RotatedAdamW(p, lr=1e-2))
    assert all(isinstance(w.optimizer.optimizer, RotatedAdamW) for w in sim.workers)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    assert get_method("basis-rotation").source.startswith("Jung")


@props(15)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), wd=st.sampled_from([0.0, 0.1]),
       warm=st.integers(1, 6), s=st.integers(1, 6), freq=st.integers(1, 3))
def test_prediction_under_a_constant_gradient_is_the_future(rows, cols, wd, warm, s, freq):
    """RotatedAdamW's own rule (the default): with a constant gradient the bases and moments
    stop changing, so predicting ``s`` updates ahead lands on the weights ``s`` updates later
    (up to rounding, amplified by at most about 1 / eps)."""
    from predictopt import PredictiveOptimizer
    from predictopt.basis_rotation import RotatedAdamRule
    from predictopt.prediction import predict

    gen = torch.Generator().manual_seed(rows * 10 + cols)
    grads = [torch.randn(rows, cols, generator=gen, dtype=torch.float64),
             torch.randn(cols, generator=gen, dtype=torch.float64)]
    ps = [torch.randn(g.shape, generator=gen, dtype=torch.float64).requires_grad_()
          for g in grads]
    opt = PredictiveOptimizer(RotatedAdamW(ps, lr=1e-2, eps=1e-4, weight_decay=wd,
                                           precondition_frequency=freq), steps=s)
    assert isinstance(opt.rule, RotatedAdamRule)

    def step():
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()

    for _ in range(warm):
        step()
    pred = predict(opt, s)
    stale = [p.detach().clone() for p in ps]
    for _ in range(s):
        step()
    for p, w in zip(ps, stale):
        assert torch.allclose(pred[p], p, rtol=0, atol=1e-10)
        assert not torch.allclose(w, p, rtol=0, atol=1e-6)  # the weights did move


def test_lightning_rebuilds_rotated_adamw_per_stage():
    """Under the Lightning strategy (which keeps the user's optimizer class) a user returns
    RotatedAdamW from configure_optimizers; every stage gets one with the same settings."""
    from lightning_plugin.optim import rebuild_optimizer

    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    user = RotatedAdamW([*a.parameters(), *b.parameters()], lr=2e-3, precondition_frequency=5,
                        max_dim=64)
    stage = rebuild_optimizer(user, list(b.parameters()))
    assert type(stage) is RotatedAdamW
    g = stage.param_groups[0]
    assert [id(p) for p in g["params"]] == [id(p) for p in b.parameters()]
    assert (g["lr"], g["precondition_frequency"], g["max_dim"]) == (2e-3, 5, 64)


def test_a_users_rotated_adamw_under_pipeoptim_basis_rotation_dl_is_the_converted_run():
    """Where the optimizer must stay the user's (Lightning), returning RotatedAdamW and choosing
    pipeoptim-basis-rotation-dl gives the run of the method on plain AdamW (which it converts),
    bit for bit: BasisRotation keeps a RotatedAdamW it is given."""
    wa, la, _ = _simulate("pipeoptim-basis-rotation-dl", lambda p: RotatedAdamW(p, lr=1e-2))
    wb, lb, _ = _simulate("pipeoptim-basis-rotation-dl", lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))


def test_bfloat16_matrices_rotate_in_float32():
    """eigh and qr have no 16-bit kernels: a bfloat16 matrix keeps its covariances, bases and
    moments in float32 and follows the float32 run closely (a bfloat16 first moment would not:
    its rounding in directions without curvature yet, divided by their nearly zero second
    moment, throws the weights far away)."""
    torch.manual_seed(0)
    w = torch.randn(6, 4).bfloat16()
    grads = [torch.randn(6, 4).bfloat16() for _ in range(6)]  # the same stream for both runs

    def run(dtype):
        p = w.to(dtype, copy=True).requires_grad_()
        opt = RotatedAdamW([p], lr=1e-2, precondition_frequency=2)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return p, opt

    p16, opt16 = run(torch.bfloat16)
    p32, _ = run(torch.float32)
    st_ = opt16.state[p16]
    assert p16.dtype == torch.bfloat16
    assert all(st_[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "GG_L", "GG_R",
                                                       "Q_L", "Q_R"))
    # bfloat16 weights are rounded to 8 significant bits after each of the 6 steps: a relative
    # bound of 2 ulps at the bottom of a binade (an absolute 0.02 was under 1.5 ulps for
    # weights above 2, and failed on some CPUs by that much); moments kept in bfloat16 do not
    # even run (eigh has no bfloat16 kernel) or, as the docstring says, land far away
    torch.testing.assert_close(p16.float(), p32, rtol=2**-6, atol=2**-8)
    assert not torch.allclose(p16.float(), w.float(), atol=1e-3)  # it moved
