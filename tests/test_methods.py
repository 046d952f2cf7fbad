"""The method registry and the per-stage transforms: one suite every method goes through."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.data import mlp_stages
from predictopt.pipeline import (
    PB_METHODS,
    Method,
    PipelineSimulator,
    StageContext,
    StageWorker,
    available_methods,
    get_method,
    register_method,
)
from predictopt.pipeline import methods as methods_mod
from predictopt.pipeline.transforms import (
    AdaptiveMomentum,
    DelayCompensation,
    DelayScaledLR,
    DelayScaledMomentum,
    NesterovMomentum,
    QuasiHyperbolicMomentum,
    SpikeCompensation,
)
from predictopt.spike import SpikeCompensatedSGD
from tests._hyp import props

torch.set_num_threads(1)

IN, HID, OUT = 5, 8, 3
PIPELINE_METHODS = [m for m in available_methods()
                    if get_method(m).schedules is None and not get_method(m).staleness_free]


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def accepts(method: str, make) -> bool:
    try:
        PipelineSimulator(mlp_stages(IN, HID, OUT, 2), make, method=method, n_microbatches=4)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, IN, generator=gen), torch.randint(0, OUT, (16,), generator=gen)


def weights(stages):
    return [p.detach().clone() for m in stages for p in m.parameters()]


def train(method, x, y, *, stages=3, make=adamw, steps=3, schedule="1F1B", n=4, **kw):
    ms = mlp_stages(IN, HID, OUT, stages, seed=1)
    sim = PipelineSimulator(ms, make, method=method, schedule=schedule, n_microbatches=n, **kw)
    losses = []
    for _ in range(steps):
        losses += sim.step(x, y)
    return weights(ms), losses, sim


# ------------------------------------------------------------------ registry


def test_registry_names_and_values():
    names = available_methods()
    for required in ("sequential", "gpipe", "pipedream", "pipedream-2bw", "spectrain", "xpipe",
                     "pipeoptim", "pipeoptim-lean", "nesterov", "pipemare", "dc-asgd",
                     *PB_METHODS):
        assert required in names
        assert get_method(required).name == required
    m = get_method("pipeoptim")
    assert get_method(m) is m and str(m) == "pipeoptim" and m.predicts
    with pytest.raises(ValueError, match="method must be one of .*pipeoptim"):
        get_method("no-such-method")
    with pytest.raises(ValueError, match="registered already"):
        register_method(get_method("pipedream"))
    with pytest.raises(TypeError, match="Method"):
        register_method("pipedream")  # type: ignore[arg-type]


def test_method_fields_are_checked():
    with pytest.raises(ValueError, match="forward must be one of"):
        Method("x", forward="stashed")
    with pytest.raises(ValueError, match="backward must be one of"):
        Method("x", backward="old")
    with pytest.raises(TypeError, match="transforms"):
        Method("x", transforms=("lr",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        Method("")


@pytest.mark.parametrize("every", [1, 3])
def test_method_calibrate_fits_a_gain_at_each_horizon_of_the_stage(batch, every):
    """calibrate=True is the user's PredictiveOptimizer(calibrate=True) fitted at the stage's
    positive horizons (with the method's calibration_every), bit for bit; a stage that predicts
    nothing (D = 0) and a method that does not predict are not calibrated; a predicate sees the
    stage optimizer; bad values are errors naming the field."""
    from predictopt import PredictiveOptimizer

    x, y = batch
    cal = get_method("pipeoptim").with_(name="pipeoptim-cal-test", calibrate=True,
                                        calibration_every=every)
    wa, la, sim = train(cal, x, y, steps=4)
    horizons = [sorted({h for h in w.horizons if h > 0}) for w in sim.workers]
    assert horizons[0] and not horizons[-1]
    for w, hs in zip(sim.workers, horizons):
        assert w.optimizer.calibrate == bool(hs)
        assert w.optimizer.calibration_horizons == (tuple(hs) if hs else None)
        assert w.optimizer.calibration_every == (every if hs else 1)
    it = iter(horizons)

    def wrapped(ps):
        hs = next(it)
        return PredictiveOptimizer(adamw(ps), steps=max(hs, default=1), calibrate=bool(hs),
                                   calibration_horizons=tuple(hs) or None,
                                   calibration_every=every)

    wb, lb, _ = train("pipeoptim", x, y, make=wrapped, steps=4)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    wc, _, _ = train("pipeoptim", x, y, steps=4)
    assert not all(torch.equal(a, c) for a, c in zip(wa, wc))
    seen = []
    pred = cal.with_(calibrate=lambda opt: seen.append(type(opt)) or False)
    wd, _, _ = train(pred, x, y, steps=4)
    assert all(torch.equal(a, d) for a, d in zip(wc, wd)) and seen[0] is torch.optim.AdamW
    assert not get_method("pipedream").with_(calibrate=True).calibrates(adamw([x]))
    with pytest.raises(TypeError, match="calibrate"):
        Method("x", forward="predicted", calibrate="yes")  # type: ignore[arg-type]


def test_a_new_method_is_one_object(batch, monkeypatch):
    """Registering a value is all it takes: the simulator runs it by name."""
    monkeypatch.setattr(methods_mod, "_REGISTRY", dict(methods_mod._REGISTRY))
    mine = get_method("pipedream").with_(name="mine", transforms=(DelayScaledLR(power=2.0),))
    register_method(mine)
    x, y = batch
    w_name, l_name, sim = train("mine", x, y)
    w_obj, l_obj, _ = train(mine, x, y)
    assert sim.method == "mine" and sim.spec is mine
    assert l_name == l_obj and all(torch.equal(a, b) for a, b in zip(w_name, w_obj))


# ------------------------------------------------------------------ the shared suite


# pipedream-2bw lags one update by design, with or without a pipeline: it has no undelayed twin
@pytest.mark.parametrize("method", [m for m in PIPELINE_METHODS
                                    if get_method(m).forward != "previous"])
def test_every_method_without_delay_is_its_staleness_free_twin(batch, method):
    """One stage has no delay: every method then trains exactly as the staleness-free run with
    the same transforms and cadence (its forward, backward and prediction add nothing)."""
    x, y = batch
    spec = get_method(method)
    for make in (adamw, sgd):
        if not accepts(method, make):
            continue
        # a correction of the backward's weights only acts after updates in flight: none here
        kept = tuple(t for t in spec.transforms
                     if not getattr(t, "corrects_backward_weights", False))
        twin = spec.with_(name="twin", forward="current", backward="forward", transforms=kept,
                          staleness_free=spec.cadence.kind == "microbatch")
        wa, la, _ = train(spec, x, y, stages=1, make=make)
        wb, lb, _ = train(twin, x, y, stages=1, make=make)
        assert la == lb
        assert all(torch.equal(a, b) for a, b in zip(wa, wb))


@pytest.mark.parametrize("method", PIPELINE_METHODS)
def test_every_method_is_deterministic_and_learns(batch, method):
    x, y = batch
    assert accepts(method, adamw) or accepts(method, sgd)
    for make in (adamw, sgd):
        if not accepts(method, make):
            continue
        wa, la, sim = train(method, x, y, make=make, steps=4)
        wb, lb, _ = train(method, x, y, make=make, steps=4)
        assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
        assert all(torch.isfinite(w).all() for w in wa)
        assert sum(w.num_updates for w in sim.workers) > 0


@pytest.mark.parametrize("method", PIPELINE_METHODS)
def test_every_method_runs_on_a_zero_bubble_schedule(batch, method):
    x, y = batch
    make = adamw if accepts(method, adamw) else sgd
    _, losses, sim = train(method, x, y, stages=4, schedule="ZBVZeroBubble", steps=2, make=make)
    assert len(losses) == 8 and all(w.num_backwards == 8 for w in sim.workers)


# ------------------------------------------------------------------ transforms


def ctx(delay: int = 3, num_stages: int = 4) -> StageContext:
    return StageContext(staleness=(0, delay), update_every=1, stage=0, num_stages=num_stages)


def test_delay_scaled_lr_factor():
    assert DelayScaledLR().lr_scale(ctx(3), 0) == 0.25
    assert DelayScaledLR(power=2.0).lr_scale(ctx(3), 10) == 1 / 16
    assert DelayScaledLR(offset=0.0).lr_scale(ctx(0), 0) == 1.0
    annealed = DelayScaledLR(anneal_updates=10)
    assert annealed.lr_scale(ctx(3), 0) == 0.25 and annealed.lr_scale(ctx(3), 10) == 1.0
    assert annealed.lr_scale(ctx(3), 5) == pytest.approx(0.5)
    for bad in ({"power": -1.0}, {"offset": float("nan")}, {"anneal_updates": 0}):
        with pytest.raises(ValueError):
            DelayScaledLR(**bad)


@props(25)
@given(lr=st.floats(1e-4, 1e-1), delay=st.integers(0, 5), steps=st.integers(1, 3))
def test_delay_scaled_lr_is_the_optimizer_at_the_scaled_rate(lr, delay, steps):
    """The update is torch's at lr * factor, bit for bit (same trajectory as pipedream with the
    scaled rate), and the optimizer's lr (what schedulers set and checkpoints store) is
    untouched."""
    table = list(range(delay + 1))  # all forwards, then all backwards: s(i) = i

    def run(method, rate):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        w = StageWorker(m, torch.optim.AdamW(m.parameters(), lr=rate), staleness=table,
                        method=method)
        x = torch.randn(4, 3)
        for _ in range(steps):
            outs = [w.forward(i, x + i) for i in table]
            for i in table:
                w.backward(i, loss=outs[i].square().mean())
        return m, w

    dl = get_method("pipedream").with_(name="dl", transforms=(DelayScaledLR(),))
    m1, w1 = run(dl, lr)
    m2, _ = run("pipedream", lr * (1.0 / (1.0 + delay)))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert w1.optimizer.param_groups[0]["lr"] == lr


def test_delay_scaled_lr_reaches_the_prediction():
    """A predicting method predicts with the learning rate the updates will use."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    spec = get_method("pipeoptim").with_(name="po-dl", transforms=(DelayScaledLR(),))
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), method=spec,
                    staleness=[0, 1, 1])  # two updates in flight at most
    x = torch.randn(4, 3)
    out = w.forward(0, x)
    w.backward(0, loss=out.square().mean())
    buf = {p: w.optimizer.state[p]["momentum_buffer"].clone() for p in m.parameters()}
    real = {p: p.detach().clone() for p in m.parameters()}
    seen = {}
    handle = m.register_forward_pre_hook(lambda mod, a: seen.update(
        weight=mod.weight.detach().clone()))
    w.forward(1, x)
    handle.remove()
    factor = w.lr_scale()
    assert factor == 0.5
    expected = real[m.weight] - 1 * (0.1 * factor) * buf[m.weight]
    assert torch.equal(seen["weight"], expected)


def test_nesterov_momentum_is_torch_nadam(batch):
    x, y = batch
    spec = Method("nag", transforms=(NesterovMomentum(),), staleness_free=True)

    def nadam(p):
        return torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)

    wa, la, sim = train(spec, x, y, stages=2)
    wb, lb, _ = train("sequential", x, y, stages=2, make=nadam)
    assert isinstance(sim.workers[0].optimizer.optimizer, torch.optim.NAdam)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    nag_sgd = train(spec, x, y, stages=2, make=sgd)
    ref_sgd = train("sequential", x, y, stages=2,
                    make=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True))
    assert nag_sgd[1] == ref_sgd[1]
    beta = NesterovMomentum(beta1=0.99).prepare(adamw(torch.nn.Linear(2, 2).parameters()), ctx())
    assert beta.param_groups[0]["betas"] == (0.99, 0.999)
    with pytest.raises(ValueError, match="Nesterov momentum converts"):
        NesterovMomentum().prepare(torch.optim.RMSprop(torch.nn.Linear(2, 2).parameters()),
                                   ctx())


def test_conversions_need_a_fresh_optimizer():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="fresh"):
        NesterovMomentum().prepare(opt, ctx())
    s = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    s.step()
    with pytest.raises(ValueError, match="fresh"):
        SpikeCompensation().prepare(s, ctx())


def test_spike_compensation_is_idempotent():
    m = torch.nn.Linear(2, 2)
    first = SpikeCompensation().prepare(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                        ctx(3))
    assert isinstance(first, SpikeCompensatedSGD) and first.param_groups[0]["delay"] == 3
    again = SpikeCompensation().prepare(first, ctx(5))
    assert again is first and first.param_groups[0]["delay"] == 5


def test_adaptive_momentum_follows_the_delay():
    m = torch.nn.Linear(2, 2)
    opt = AdaptiveMomentum(0.99).prepare(torch.optim.AdamW(m.parameters()), ctx(3, 4))
    (g,) = AdaptiveMomentum(0.99).group_values(ctx(3, 4), opt)
    assert g["betas"][0] == pytest.approx(0.9 + 3 * 0.09 / 4)
    assert opt.param_groups[0]["betas"][0] == 0.9  # the group keeps the user's beta1
    with pytest.raises(ValueError, match="number of stages"):
        AdaptiveMomentum().prepare(torch.optim.AdamW(m.parameters()),
                                   StageContext((0, 1), 1, None, None))


# ------------------------------------------------------------------ delay-scaled momentum


def _dm_values(t, optimizer, delay):
    return t.group_values(ctx(delay), optimizer)


@props(50)
@given(mu=st.floats(0.0, 0.999), tau=st.floats(0.0, 0.9), delay=st.integers(0, 64),
       power=st.floats(0.0, 2.0))
def test_delay_scaled_momentum_keeps_the_effective_step(mu, tau, delay, power):
    """SGD: 1 - mu_D = (1 - mu) / (1 + D)^p and the steady-state ratio of buffer to gradient,
    (1 - tau) / (1 - mu), is the user's; Adam's beta1 follows the same horizon; the groups
    themselves keep the user's values."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=mu or 0.5, dampening=tau)
    mu = opt.param_groups[0]["momentum"]
    t = DelayScaledMomentum(power=power)
    assert t.prepare(opt, ctx(delay)) is opt
    f = (1 + delay) ** -power
    vals = _dm_values(t, opt, delay)
    if f == 1.0:
        assert vals is None
        return
    (g,) = vals
    assert g["momentum"] == pytest.approx(1 - (1 - mu) * f, rel=1e-12, abs=1e-15)
    assert (1 - g["dampening"]) / (1 - g["momentum"]) == pytest.approx(
        (1 - tau) / (1 - mu), rel=1e-9)
    assert opt.param_groups[0]["momentum"] == mu and opt.param_groups[0]["dampening"] == tau
    (a,) = _dm_values(t, torch.optim.AdamW([p]), delay)
    assert 1 - a["betas"][0] == pytest.approx(0.1 * f, rel=1e-9) and a["betas"][1] == 0.999


def test_delay_scaled_momentum_steady_state_of_sgd():
    """Under a constant gradient the scaled SGD's steps converge to the user's SGD's steps."""
    a, b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)), \
        torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    user = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    scaled = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    scaled.param_groups[0].update(_dm_values(DelayScaledMomentum(), scaled, 3)[0])
    assert scaled.param_groups[0]["momentum"] == pytest.approx(0.975)
    for _ in range(2000):
        a.grad = b.grad = torch.ones(1, dtype=torch.float64)
        before = (a.detach().clone(), b.detach().clone())
        user.step()
        scaled.step()
    step_user, step_scaled = before[0] - a.detach(), before[1] - b.detach()
    torch.testing.assert_close(step_scaled, step_user, rtol=1e-9, atol=0)
    assert float(step_user) == pytest.approx(1.0)  # lr / (1 - mu)


def test_delay_scaled_momentum_muon_parts_and_undelayed_stages():
    from predictopt.combined import CombinedOptimizer

    m = torch.nn.Linear(4, 4)
    muon = getattr(torch.optim, "Muon", None)
    if muon is not None:
        comb = CombinedOptimizer([muon([m.weight], lr=0.01, momentum=0.95),
                                  torch.optim.AdamW([m.bias], lr=0.01)])
        t = DelayScaledMomentum()
        t.prepare(comb, ctx(4))
        assert _dm_values(t, comb, 4) is None  # a stage with Muon keeps every part's momentum
        muon_v, adam_v = _dm_values(DelayScaledMomentum(muon=True), comb, 4)
        assert muon_v["momentum"] == pytest.approx(0.99)
        assert adam_v["betas"][0] == pytest.approx(0.98)
        # the parts on their own: Adam is scaled, Muon alone is left as it is by default
        assert _dm_values(t, comb.optimizers[1], 4)[0]["betas"][0] == pytest.approx(0.98)
        assert _dm_values(t, comb.optimizers[0], 4) is None
    sgd = torch.optim.SGD([m.weight], lr=0.1)  # no momentum: its group is left (empty dict)
    comb = CombinedOptimizer([sgd, torch.optim.AdamW([m.bias], lr=0.01)])
    assert _dm_values(DelayScaledMomentum(), comb, 4)[0] == {}
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    assert _dm_values(DelayScaledMomentum(), opt, 0) is None  # D = 0: the optimizer as it is


def _per_stage(make, delays, values):
    """``make`` for the simulator whose k-th optimizer has ``values(delay_k)`` set in its
    groups from the start (what the transform sets during every update and prediction)."""
    it = iter(delays)

    def build(params):
        opt = make(params)
        for g in opt.param_groups:
            g.update(values(opt, next(it)))
        return opt
    return build


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
])
def test_delay_scaled_momentum_in_the_pipeline_is_the_per_stage_optimizer(make, batch):
    """pipeoptim-dm (and the default) equal, bit for bit, pipeoptim (resp. the default's other
    transforms) on optimizers built with each stage's scaled momentum: the steps, the
    predictions (Adam's bias correction) and QH's correction all see the scaled values; and
    the groups (what checkpoints store) keep the user's values."""
    x, y = batch
    t = DelayScaledMomentum()

    def values(opt, d):
        return _dm_values(t, opt, d)[0] if d else {}

    default = get_method("pipeoptim-qh-dm-dl")
    others = default.with_(name="default-without-dm-test", transforms=tuple(
        x for x in default.transforms if not isinstance(x, DelayScaledMomentum)))
    for with_dm, without in (("pipeoptim-dm", "pipeoptim"), ("pipeoptim-qh-dm-dl", others)):
        wa, la, sim = train(with_dm, x, y, make=make, steps=4)
        wb, lb, _ = train(without, x, y, make=_per_stage(make, (2, 1, 0), values), steps=4)
        assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb)), with_dm
        fresh = make([torch.nn.Parameter(torch.ones(1))]).param_groups[0]
        for w in sim.workers:
            g = w.optimizer.param_groups[0]
            assert (g.get("momentum"), g.get("dampening"), g.get("betas")) == (
                fresh.get("momentum"), fresh.get("dampening"), fresh.get("betas"))


def _muon_adamw(params):
    from predictopt.combined import CombinedOptimizer

    params = list(params)
    mats = [p for p in params if p.ndim == 2]
    return CombinedOptimizer([
        torch.optim.Muon(mats, lr=2e-2, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([p for p in params if p.ndim != 2], lr=1e-2, weight_decay=1e-2)])


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")
def test_with_muon_the_default_is_pipeoptim_qh_dl_bit_for_bit(batch):
    """A stage with Muon keeps every part's momentum: the default equals pipeoptim-qh-dl on
    Muon + AdamW stages bit for bit, and differs from it with muon=True."""
    x, y = batch
    wa, la, _ = train("pipeoptim-qh-dm-dl", x, y, make=_muon_adamw, steps=4)
    wb, lb, _ = train("pipeoptim-qh-dl", x, y, make=_muon_adamw, steps=4)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    both = Method("dm-muon-test", forward="predicted",
                  transforms=(DelayScaledMomentum(muon=True),
                              QuasiHyperbolicMomentum(0.5, strict=False), DelayScaledLR()))
    wc, _, _ = train(both, x, y, make=_muon_adamw, steps=4)
    assert not all(torch.equal(a, c) for a, c in zip(wa, wc))


def test_delay_scaled_momentum_is_set_for_each_update_from_the_current_groups():
    """The step sees 1 - (1 - mu) / (1 + D) of the group's current mu (what a scheduler set),
    the group keeps mu outside the update, and a failed update leaves it as it was."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    seen = []
    opt.register_step_pre_hook(
        lambda o, *_: seen.append((o.param_groups[0]["momentum"], o.param_groups[0]["dampening"])))
    w = StageWorker(m, opt, method="pipeoptim-dm", staleness=[0, 1])  # D = 1
    x = torch.randn(4, 3)
    for mu in (0.9, 0.8):  # the second as a scheduler with cycle_momentum would set it
        opt.param_groups[0]["momentum"] = mu
        o0, o1 = w.forward(0, x), w.forward(1, x)
        w.backward(0, grad_output=torch.ones_like(o0))
        w.backward(1, grad_output=torch.ones_like(o1))
        assert opt.param_groups[0]["momentum"] == mu and opt.param_groups[0]["dampening"] == 0
    assert [pytest.approx(v) for v in seen] == [(0.95, 0.5)] * 2 + [(0.9, 0.5)] * 2

    def boom(*_):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(boom)
    o0 = w.forward(0, x)
    with pytest.raises(RuntimeError, match="boom"):
        w.backward(0, grad_output=torch.ones_like(o0))
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["dampening"] == 0
    handle.remove()


def test_delay_scaled_momentum_errors_name_the_argument():
    p = torch.nn.Parameter(torch.ones(2))
    for bad, name in (({"power": -1.0}, "power"), ({"offset": 0.5}, "offset"),
                      ({"delays": "x"}, "delays")):
        with pytest.raises(ValueError, match=name):
            DelayScaledMomentum(**bad)
    with pytest.raises(TypeError, match="strict"):
        DelayScaledMomentum(strict=1)
    with pytest.raises(TypeError, match="muon"):
        DelayScaledMomentum(muon=1)
    for opt in (torch.optim.RMSprop([p], lr=0.1),
                torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)):
        with pytest.raises(ValueError, match="momentum SGD .without nesterov.*got"):
            DelayScaledMomentum().prepare(opt, ctx())
    plain = torch.optim.SGD([p], lr=0.1)  # no momentum: nothing to scale, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DelayScaledMomentum().prepare(plain, ctx()) is plain
    assert plain.param_groups[0]["momentum"] == 0
    rms = torch.optim.RMSprop([p], lr=0.1)
    with pytest.warns(UserWarning, match="keeps its momentum"):
        assert DelayScaledMomentum(strict=False).prepare(rms, ctx()) is rms
    with pytest.raises(ValueError, match="stage index"):
        DelayScaledMomentum(delays="1f1b").prepare(torch.optim.AdamW([p]),
                                                   StageContext((0, 1), 1, None, None))


def _qh_reference_adamw(p, grads, lr, nu, wd=0.0):
    """QH-AdamW written out (Ma & Yarats' QHAdam with nu2 = 1, decoupled decay)."""
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * (nu * m_hat + (1 - nu) * g) / (v_hat.sqrt() + eps)
    return p


@props(25)
@given(nu=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]), steps=st.integers(1, 5),
       seed=st.integers(0, 100))
def test_quasi_hyperbolic_momentum_matches_its_formula(nu, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(steps)]
    p0 = torch.randn(6, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
    bare = torch.nn.Parameter(p0.clone())
    bare_opt = torch.optim.AdamW([bare], lr=0.01, weight_decay=0.1)
    qh = QuasiHyperbolicMomentum(nu)
    qh.prepare(opt, ctx())
    from predictopt.pipeline.methods import UpdateContext

    for g in grads:
        p.grad = g.clone()
        opt.step()
        qh.after_step(ctx(), UpdateContext(opt, [p], 0))
        bare.grad = g.clone()
        bare_opt.step()
    expected = _qh_reference_adamw(p0, grads, 0.01, nu, wd=0.1)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    if nu == 1.0:
        assert torch.equal(p.detach(), bare.detach())


@props(25)
@given(nu=st.sampled_from([0.0, 0.5, 1.0]), steps=st.integers(1, 5), seed=st.integers(0, 100))
def test_quasi_hyperbolic_momentum_for_sgd(nu, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(steps)]
    p0 = torch.randn(4, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    qh = QuasiHyperbolicMomentum(nu)
    from predictopt.pipeline.methods import UpdateContext

    ref, b = p0.clone(), None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        qh.after_step(ctx(), UpdateContext(opt, [p], 0))
        b = g.clone() if b is None else 0.9 * b + g
        ref = ref - 0.05 * (nu * b + (1 - nu) * g / (1 - 0.9))
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)
    plain = torch.optim.SGD([p], lr=0.1)  # no momentum: the formula is SGD itself
    assert qh.prepare(plain, ctx()) is plain


def _run_qh(qh, make, p0, grads, delay):
    """The weights after ``make``'s optimizer steps on ``grads``, each followed by ``qh``'s
    correction on a stage of delay ``delay``."""
    from predictopt.pipeline.methods import UpdateContext

    p = torch.nn.Parameter(p0.clone())
    opt = make([p])
    qh.prepare(opt, ctx(delay))
    for g in grads:
        p.grad = g.clone()
        opt.step()
        qh.after_step(ctx(delay), UpdateContext(opt, [p], 0))
    return p.detach()


@props(30)
@given(nu=st.sampled_from([0.0, 0.5, 1.0]), delay=st.integers(0, 15),
       power=st.sampled_from([0.0, 0.5, 1.0, 2.0]), wd=st.sampled_from([0.0, 1e-2]),
       steps=st.integers(1, 4), seed=st.integers(0, 100))
def test_quasi_hyperbolic_sgd_fresh_power_matches_its_formula(nu, delay, power, wd, steps, seed):
    """Momentum SGD with sgd_fresh_power = q: eta [nu b + (1 - nu) c g~ / (1 + D)^q], the L2
    term part of g~; q = 0 is the plain transform bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(steps)]
    p0 = torch.randn(4, generator=gen, dtype=torch.float64)
    def run(qh):
        return _run_qh(qh, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9,
                                                      weight_decay=wd), p0, grads, delay)

    got = run(QuasiHyperbolicMomentum(nu, sgd_fresh_power=power))
    ref, b = p0.clone(), None
    for g in grads:
        gt = g + wd * ref  # torch's step: the L2 term at the weights before it
        b = gt.clone() if b is None else 0.9 * b + gt
        after = ref - 0.05 * b
        # QH's fresh term, its L2 part at the weights after the step (those before are gone)
        ref = ref - 0.05 * nu * b - 0.05 * (1 - nu) * (g + wd * after) / (1 - 0.9) / (
            1 + delay) ** power
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if power == 0.0 or delay == 0:
        assert torch.equal(got, run(QuasiHyperbolicMomentum(nu)))


@props(30)
@given(nu=st.sampled_from([0.0, 0.5, 1.0]), delay=st.integers(0, 15),
       power=st.sampled_from([0.0, 0.5, 1.0, 2.0]), wd=st.sampled_from([0.0, 0.1]),
       steps=st.integers(1, 4), seed=st.integers(0, 100))
def test_quasi_hyperbolic_adam_fresh_power_matches_its_formula(nu, delay, power, wd, steps,
                                                              seed):
    """AdamW with adam_fresh_power = q: eta [nu m^ + (1 - nu) g / (1 + D)^q] / (sqrt(v^) + eps)
    after the decoupled decay; q = 0 (or D = 0) is the plain transform bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(steps)]
    p0 = torch.randn(6, generator=gen, dtype=torch.float64)
    def run(qh):
        return _run_qh(qh, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=wd), p0,
                       grads, delay)

    got = run(QuasiHyperbolicMomentum(nu, adam_fresh_power=power))
    fresh = (1 + delay) ** -power
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        p = p * (1 - 0.01 * wd)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        p = p - 0.01 * (nu * m_hat + (1 - nu) * fresh * g) / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(got, p, rtol=1e-12, atol=1e-12)
    if power == 0.0 or delay == 0:
        assert torch.equal(got, run(QuasiHyperbolicMomentum(nu)))


def test_quasi_hyperbolic_fresh_powers_are_per_kind_and_check_their_arguments():
    """sgd_fresh_power leaves Adam as it is and adam_fresh_power momentum SGD, bit for bit; bad
    arguments are errors naming them, at construction or at prepare."""
    from predictopt.pipeline.methods import UpdateContext

    def run(qh, make):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = make([p])
        for _ in range(3):
            p.grad = torch.randn(5)
            opt.step()
            qh.after_step(ctx(3), UpdateContext(opt, [p], 0))
        return p.detach()

    adamw_ = lambda ps: torch.optim.AdamW(ps, lr=0.01)  # noqa: E731
    sgdm = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731
    plain = QuasiHyperbolicMomentum(0.5)
    assert torch.equal(run(plain, adamw_),
                       run(QuasiHyperbolicMomentum(0.5, sgd_fresh_power=1.0), adamw_))
    assert torch.equal(run(plain, sgdm),
                       run(QuasiHyperbolicMomentum(0.5, adam_fresh_power=1.0), sgdm))
    assert not torch.equal(run(plain, adamw_),
                           run(QuasiHyperbolicMomentum(0.5, adam_fresh_power=1.0), adamw_))
    for bad in ({"sgd_fresh_power": -1.0}, {"sgd_fresh_power": float("inf")},
                {"sgd_fresh_power": True}, {"adam_fresh_power": -0.5},
                {"adam_fresh_power": float("nan")}, {"adam_fresh_power": "1"},
                {"delays": "gpipe"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QuasiHyperbolicMomentum(0.5, **bad)
    no_stage = StageContext(staleness=(0,), update_every=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    for kw in ({"sgd_fresh_power": 1.0}, {"adam_fresh_power": 1.0}):
        twin = QuasiHyperbolicMomentum(0.5, delays="1f1b", **kw)
        with pytest.raises(ValueError, match="1f1b"):
            twin.prepare(opt, no_stage)
    twin = QuasiHyperbolicMomentum(0.5, adam_fresh_power=1.0, delays="1f1b")
    assert twin._fresh_factor(ctx(0, num_stages=4), "adam") == 0.25  # stage 0 of 4: D = 3
    assert twin._fresh_factor(ctx(0, num_stages=4), "sgd") == 1.0


def test_delay_scaled_lr_kind_flags_keep_those_optimizers_at_their_rate(batch):
    """momentum_sgd=False / adam=False: momentum SGD (not Nesterov, not plain SGD) / Adam and
    AdamW (not NAdam) keep their rate in the update and in the prediction. The default is its
    former composition bit for bit where it did not change: with NAdam (whose whole update it
    scales) and, without its calibration, with momentum SGD."""
    p = [torch.nn.Parameter(torch.ones(2))]
    t = DelayScaledLR(momentum_sgd=False, adam=False)
    assert not t.scales_lr_of(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert not t.scales_lr_of(torch.optim.AdamW(p, lr=0.1))
    assert not t.scales_lr_of(torch.optim.Adam(p, lr=0.1))
    assert t.scales_lr_of(torch.optim.SGD(p, lr=0.1))
    assert t.scales_lr_of(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    assert t.scales_lr_of(torch.optim.NAdam(p, lr=0.1))
    assert DelayScaledLR(momentum_sgd=False).scales_lr_of(torch.optim.AdamW(p, lr=0.1))
    assert DelayScaledLR(adam=False).scales_lr_of(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    for flag in ("momentum_sgd", "adam", "muon"):
        with pytest.raises(TypeError, match=flag):
            DelayScaledLR(**{flag: 0})
    x, y = batch
    former = Method("former-default-test", forward="predicted",
                    transforms=(DelayScaledMomentum(strict=False),
                                QuasiHyperbolicMomentum(0.5, strict=False, sgd_fresh_power=1.0),
                                DelayScaledLR(momentum_sgd=False)))
    uncalibrated = get_method("pipeoptim-qh-dm-dl").with_(name="uncal-test", calibrate=False)
    nadam = lambda ps: torch.optim.NAdam(ps, lr=1e-2, momentum_decay=0.0)  # noqa: E731
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    with pytest.warns(UserWarning, match="quasi-hyperbolic"):
        wa, la, _ = train("pipeoptim-qh-dm-dl", x, y, make=nadam, steps=4)
        wb, lb, _ = train(former, x, y, make=nadam, steps=4)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    wa, la, sim = train(uncalibrated, x, y, make=sgd, steps=4)
    wb, lb, _ = train(former, x, y, make=sgd, steps=4)
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    wc, _, _ = train("pipeoptim-qh-dm-dl", x, y, make=sgd, steps=4)
    assert not all(torch.equal(a, c) for a, c in zip(wa, wc))  # the calibration acts
    for make in (adamw, sgd):
        _, _, sim = train("pipeoptim-qh-dm-dl", x, y, make=make, steps=2)
        first = sim.workers[0]
        assert first.context.delay > 0 and first.lr_scale() < 1.0
        assert first._lr_mask() == [False] * len(first.optimizer.param_groups)
        assert first._future_lrs(2, first.lr_scale()) == [
            [g["lr"]] * 2 for g in first.optimizer.param_groups]


def test_splits_update_and_the_default_calibrates_those_stages_only():
    """The default splits (and calibrates the prediction of) Adam, AdamW and momentum SGD
    stages, not NAdam, Nesterov SGD, plain SGD, RMSprop or Muon stages."""
    from predictopt.combined import CombinedOptimizer
    from predictopt.pipeline.catalog import splits_update

    p = [torch.nn.Parameter(torch.ones(2))]
    q = [torch.nn.Parameter(torch.ones(3, 2))]
    yes = [torch.optim.Adam(p), torch.optim.AdamW(p), torch.optim.SGD(p, lr=0.1, momentum=0.9)]
    no = [torch.optim.NAdam(p), torch.optim.SGD(p, lr=0.1), torch.optim.RMSprop(p),
          torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)]
    if hasattr(torch.optim, "Muon"):
        no.append(CombinedOptimizer([torch.optim.Muon(q), torch.optim.AdamW(p)]))
    default = get_method("pipeoptim-qh-dm-dl")
    assert all(splits_update(o) and default.calibrates(o) for o in yes)
    assert not any(splits_update(o) or default.calibrates(o) for o in no)
    assert not get_method("sequential-qh-dm-dl").calibrates(yes[0])  # predicts nothing
    kinds = [QuasiHyperbolicMomentum.split_kind(o, o) for o in yes]
    assert kinds == ["adam", "adam", "sgd"]
    if hasattr(torch.optim, "Muon"):  # the Adam part of a Muon stage keeps the whole update
        combined = no[-1]
        assert QuasiHyperbolicMomentum.split_kind(combined.optimizers[1], combined) is None
        assert QuasiHyperbolicMomentum.split_kind(combined.optimizers[1]) == "adam"


def test_quasi_hyperbolic_momentum_elsewhere_raises_or_warns():
    """strict: an optimizer it does not apply to is an error at construction, naming it;
    strict=False: a warning, and the optimizer updates exactly as it does alone."""
    p = torch.nn.Parameter(torch.ones(3))
    for opt in (torch.optim.RMSprop([p], lr=0.1, momentum=0.9),
                torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)):
        with pytest.raises(ValueError, match=f"quasi-hyperbolic.*got {type(opt).__name__}"):
            QuasiHyperbolicMomentum(0.5).prepare(opt, ctx())
    with pytest.raises(TypeError, match="strict"):
        QuasiHyperbolicMomentum(0.5, strict=1)
    from predictopt.pipeline.methods import UpdateContext

    qh = QuasiHyperbolicMomentum(0.5, strict=False)
    q = torch.nn.Parameter(torch.ones(3))
    bare = torch.optim.RMSprop([q], lr=0.1, momentum=0.9)
    opt = torch.optim.RMSprop([p], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="updates as it is"):
        assert qh.prepare(opt, ctx()) is opt
    for g in (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -1.0])):
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        qh.after_step(ctx(), UpdateContext(opt, [p], 0))
        bare.step()
    assert torch.equal(p, q)


def test_quasi_hyperbolic_delay_split_is_spike_compensation_for_sgd():
    qh = QuasiHyperbolicMomentum("delay")
    assert qh._nu({"momentum": 0.9}, ctx(3)) == pytest.approx(0.9 ** 3)
    assert qh._nu({"betas": (0.8, 0.99)}, ctx(0)) == 1.0


def test_delay_compensation_formula():
    """DC-ASGD: g + lam * g * g * (w_now - w_fwd); adaptive lam = lam0 / sqrt(EMA g^2)."""
    from predictopt.pipeline.methods import UpdateContext

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w_fwd = torch.tensor([0.5, 2.5])
    g = torch.tensor([0.2, -0.4])
    dc = DelayCompensation(lam=2.0, adaptive=False)
    grads = [g.clone()]
    dc.correct_gradients(ctx(), UpdateContext(torch.optim.SGD([p], lr=0.1), [p], 0), 0, grads,
                         [w_fwd])
    assert torch.equal(grads[0], g + 2.0 * g * g * (p.detach() - w_fwd))
    dca = DelayCompensation(lam=2.0, adaptive=True, beta=0.5, eps=1e-7)
    state: dict = {}
    up = UpdateContext(torch.optim.SGD([p], lr=0.1), [p], 0, state=state)
    grads = [g.clone()]
    dca.correct_gradients(ctx(), up, 0, grads, [w_fwd])
    lam = 2.0 / (g * g + 1e-7).sqrt()
    torch.testing.assert_close(grads[0], g + lam * g * g * (p.detach() - w_fwd))
    assert torch.equal(state[p]["dc_mean_square"], g * g)
    grads = [g.clone()]
    dca.correct_gradients(ctx(), up, 0, grads, [p.detach()])  # no delay: only the EMA moves
    assert torch.equal(grads[0], g)


def test_dc_asgd_keeps_forward_weights_only_until_the_backward(batch):
    x, y = batch
    _, losses, sim = train("dc-asgd", x, y, stages=3)
    assert all(not w.in_flight for w in sim.workers)
    assert all(len(w.transform_state) > 0 for w in sim.workers)


def test_worker_rejects_a_conversion_of_a_wrapped_optimizer():
    from predictopt import PredictiveOptimizer

    m = torch.nn.Linear(2, 2)
    opt = PredictiveOptimizer(torch.optim.AdamW(m.parameters()), steps=1)
    with pytest.raises(ValueError, match="converts the stage optimizer"):
        StageWorker(m, opt, method="nesterov", staleness=[0, 1])


def test_a_scheduler_of_the_original_optimizer_reaches_a_converted_one():
    """Conversions keep the group dicts: a scheduler built on the user's optimizer still sets
    the learning rate the converted optimizer uses."""
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    w = StageWorker(m, opt, method="nesterov", staleness=[0])
    new = w.optimizer.optimizer
    assert isinstance(new, torch.optim.NAdam) and new.param_groups[0] is opt.param_groups[0]
    assert new.param_groups[0]["betas"][0] == 0.99
    sched.step()
    assert new.param_groups[0]["lr"] == 0.05
    s = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sc = SpikeCompensation().prepare(s, ctx(2))
    assert sc.param_groups[0] is s.param_groups[0] and sc.param_groups[0]["delay"] == 2


def test_after_update_hooks_see_the_optimizers_own_learning_rate():
    """A scheduler stepped once per update from ``after_update`` follows its own schedule while
    every update uses lr * factor: the same weights, bit for bit, as the unscaled method with a
    learning rate and a schedule halved."""

    def run(method, lr):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        w = StageWorker(m, opt, method=method, staleness=[0, 1])
        seen = []
        w.after_update.append(lambda worker: (sched.step(),
                                              seen.append(opt.param_groups[0]["lr"])))
        x = torch.randn(4, 3)
        for _ in range(2):
            outs = [w.forward(i, x + i) for i in range(2)]
            for i in range(2):
                w.backward(i, loss=outs[i].square().mean())
        return m, seen

    spec = get_method("pipedream").with_(name="dl", transforms=(DelayScaledLR(),))
    m1, seen = run(spec, 0.1)  # delay 1: factor 1/2
    m2, _ = run("pipedream", 0.05)
    assert seen == [0.05, 0.025, 0.0125, 0.00625]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _qh_plain(opt, nu):
    """The correction written per parameter (the plain reference of the foreach version)."""
    with torch.no_grad():
        for group in opt.param_groups:
            lr, sign = group["lr"], (-1.0 if group.get("maximize") else 1.0)
            for p in group["params"]:
                g = p.grad * sign
                st = opt.state[p]
                if "betas" in group:
                    b1, b2 = group["betas"]
                    t = float(st["step"])
                    v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
                    if not isinstance(opt, torch.optim.AdamW) and group["weight_decay"]:
                        g = g + group["weight_decay"] * p
                    denom = (v / (1 - b2 ** t)).sqrt() + group["eps"]
                    p -= lr * (1 - nu) * (g - st["exp_avg"] / (1 - b1 ** t)) / denom
                else:
                    mu, tau = group["momentum"], group["dampening"]
                    g = g + group["weight_decay"] * p
                    p -= lr * (1 - nu) * ((1 - tau) * g / (1 - mu) - st["momentum_buffer"])


def _qh_against_plain(make, shapes, workspace=None):
    """Three steps of ``make``'s optimizer with ``QuasiHyperbolicMomentum(0.3)`` after each,
    against the plain per-parameter formula (`_qh_plain`) on a copy; the optimizer used."""
    from predictopt.pipeline.methods import UpdateContext

    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64))
         for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = make(a), make(b)
    qh = QuasiHyperbolicMomentum(0.3)
    for _ in range(3):
        grads = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
        for ps, opt in ((a, oa), (b, ob)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        qh.after_step(ctx(), UpdateContext(oa, a, 0, workspace=workspace))
        _qh_plain(ob, 0.3)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)
    return oa


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True, maximize=True),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, maximize=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.98, dampening=0.8, weight_decay=0.01),
])
def test_quasi_hyperbolic_foreach_equals_the_plain_reference(make):
    _qh_against_plain(make, [(3, 4), (5,), (2, 2, 2)])


def test_discrepancy_correction_reads_the_extrapolated_weights_in_the_backward():
    """PipeMare: a backward ``lag`` updates after its forward reads w - lag * delta, delta the
    EMA of the stage's updates; with one linear layer the input gradient shows it."""
    from predictopt.pipeline.transforms import DiscrepancyCorrection

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2, bias=False)
    spec = Method("pm", backward="current", transforms=(DiscrepancyCorrection(gamma=0.5),))
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), method=spec,
                    staleness=[0, 1], input_grads=True)
    x = torch.randn(4, 3)
    out0 = w.forward(0, x)
    out1 = w.forward(1, x)
    w0 = m.weight.detach().clone()
    w.backward(0, grad_output=torch.ones_like(out0))  # update 1: delta = 0.5 * (w1 - w0)
    delta = 0.5 * (m.weight.detach() - w0)
    expect = torch.ones(4, 2) @ (m.weight.detach() - 1 * delta)  # lag 1
    (g,) = w.backward(1, grad_output=torch.ones_like(out1))
    torch.testing.assert_close(g, expect, rtol=0, atol=1e-7)
    assert not torch.allclose(g, torch.ones(4, 2) @ m.weight.detach())
    with pytest.raises(ValueError, match="backward = 'current'"):
        StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1),
                    method=spec.with_(name="bad", backward="forward"), staleness=[0])


def test_a_scheduler_inside_a_scaled_update_is_reported_and_after_update_is_exact():
    """A method that scales the lr for its updates (delay-scaled lr) restores it after each; a
    scheduler hooked to ``optimizer.step`` steps inside that window and reads the scaled lr:
    the worker warns once. Stepped from ``after_update`` it sees the user's lr, and the lr
    after k updates is the schedule's own."""
    import warnings

    from predictopt.pipeline import PipelineSimulator

    def run(hook: str) -> PipelineSimulator:
        sim = PipelineSimulator(mlp_stages(4, 8, 3, 3, seed=0),
                                lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                method="qh-dl", n_microbatches=4,
                                loss_fn=torch.nn.functional.cross_entropy)
        for w in sim.workers:
            inner = w.optimizer.optimizer if hasattr(w.optimizer, "optimizer") else w.optimizer
            sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
            if hook == "step":
                inner.register_step_post_hook(lambda *_a, s=sched: s.step())
            else:
                w.after_update.append(lambda _w, s=sched: s.step())
        sim.step(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)),
                 torch.arange(8) % 3)
        return sim

    with pytest.warns(UserWarning, match="scheduler hooked to optimizer.step"):
        run("step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim = run("after_update")
    for w in sim.workers:
        assert w.optimizer.param_groups[0]["lr"] == 0.1 * 0.5 ** w.num_updates


@pytest.mark.parametrize("method", ["qh-dl", "error-feedback"])
def test_an_after_step_correction_skips_an_update_the_optimizer_skipped(method):
    """GradScaler (and Lightning's 16-bit precision) skip the optimizer step of an overflowed
    batch; an after-step correction (quasi-hyperbolic momentum, error feedback) must skip
    with it: the weights stay as they were, finite, and the next update runs as usual."""
    from predictopt.pipeline import PipelineSimulator

    torch.manual_seed(0)
    sim = PipelineSimulator(mlp_stages(4, 8, 3, 2, seed=0),
                            lambda ps: torch.optim.AdamW(ps, lr=0.01),
                            method=method, n_microbatches=2,
                            loss_fn=torch.nn.functional.cross_entropy)
    x, y = torch.randn(4, 4), torch.arange(4) % 3
    sim.step(x, y)  # momentum state exists: the correction would move the weights
    inner = [w.optimizer.optimizer for w in sim.workers]
    before = [p.detach().clone() for w in sim.workers for p in w.params]
    for o in inner:
        o.step = lambda *a, **k: None  # what GradScaler does with an inf gradient
    sim.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(before, [p for w in sim.workers
                                                        for p in w.params]))
    for o in inner:
        del o.step
    sim.step(x, y)
    after = [p for w in sim.workers for p in w.params]
    assert all(torch.isfinite(p).all() for p in after)
    assert not all(torch.equal(p, q) for p, q in zip(before, after))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon: torch >= 2.9")
@pytest.mark.parametrize("muon", [False, True])
def test_delay_scaled_lr_leaves_muon_at_its_rate_unless_asked(muon):
    """DelayScaledLR scales the Adam part of a combined Muon + AdamW stage optimizer for the
    update and, by default, not the Muon part; with muon=True both. After the update both
    groups hold the user's lr again."""
    from predictopt.combined import CombinedOptimizer
    from predictopt.pipeline import StageWorker
    from predictopt.pipeline.methods import Method

    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    mats = [mod[0].weight, mod[1].weight]
    rest = [mod[0].bias, mod[1].bias]
    muon_part = torch.optim.Muon(mats, lr=0.02, adjust_lr_fn="match_rms_adamw")
    adam_part = torch.optim.AdamW(rest, lr=0.01)
    seen: dict[str, float] = {}
    muon_part.register_step_pre_hook(lambda o, *_: seen.update(muon=o.param_groups[0]["lr"]))
    adam_part.register_step_pre_hook(lambda o, *_: seen.update(adam=o.param_groups[0]["lr"]))
    method = Method(f"dl-test-{muon}", staleness_free=True,
                    transforms=(DelayScaledLR(delays="1f1b", muon=muon),))
    w = StageWorker(mod, CombinedOptimizer([muon_part, adam_part]), method=method,
                    staleness=[0], update_every=1, stage=0, num_stages=4)  # D = 3
    x = torch.randn(2, 4)
    out = w.forward(0, x)
    w.backward(0, torch.ones_like(out))
    assert seen["adam"] == pytest.approx(0.01 / 4)
    assert seen["muon"] == pytest.approx(0.02 / 4 if muon else 0.02)
    assert muon_part.param_groups[0]["lr"] == 0.02 and adam_part.param_groups[0]["lr"] == 0.01
    with pytest.raises(TypeError, match="muon"):
        DelayScaledLR(muon=1)


@pytest.mark.parametrize("use_workspace", [False, True])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
])
def test_quasi_hyperbolic_large_tensors_in_place_equal_the_plain_reference(make, use_workspace):
    """Tensors above the per-tensor threshold take the in-place path (one reused denominator
    buffer); beside small ones, the result is the plain formula's."""
    from predictopt.pipeline.transforms import _PER_TENSOR_NUMEL
    from predictopt.workspace import Workspace

    ws = Workspace() if use_workspace else None
    oa = _qh_against_plain(make, [(2 * _PER_TENSOR_NUMEL // 100, 100), (7,),
                                  (_PER_TENSOR_NUMEL + 3,)], ws)
    if use_workspace and "betas" in oa.param_groups[0]:
        assert ws.nbytes > 0  # the denominator came from the workspace
