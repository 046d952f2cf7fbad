"""Tests for fine-grained Pipelined Backpropagation (predictopt.pipeline.pb) in the simulator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from predictopt.cli import main
from predictopt.data import mlp_stages
from predictopt.pipeline import (
    PB_METHODS,
    PipelineSimulator,
    pb_delays,
    pb_global_order,
    pb_local_orders,
    pb_staleness,
    pb_ticks,
    simulate,
    train,
)
from predictopt.spike import SpikeCompensatedSGD

LR = 0.05


def sgd(p):
    return torch.optim.SGD(p, lr=LR, momentum=0.9)


def data(n=24, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def run(method, x, y, *, num_stages=3, epochs=2, seed=0, **kw):
    stages = mlp_stages(x.shape[1], 6, 3, num_stages, activation="tanh", seed=seed)
    sim = PipelineSimulator(stages, kw.pop("make", sgd), method=method,
                            n_microbatches=x.shape[0], **kw)
    losses = train(sim, x, y, epochs=epochs, microbatch_size=1, per_microbatch=True)
    return sim, losses


def params(sim):
    return [p.detach().clone() for m in sim.stages for p in m.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------
# the order
# ---------------------------------------------------------------------------------------------

SIZES = [(k, n) for k in (1, 2, 3, 4, 5) for n in (1, 2, 5, 13)]


def test_delays():
    assert pb_delays(1) == [0]
    assert pb_delays(4) == [6, 4, 2, 0]
    with pytest.raises(ValueError):
        pb_delays(0)


@pytest.mark.parametrize("k,n", SIZES)
def test_updates_between_forward_and_backward(k, n):
    # Counted independently of pb_staleness: the B actions of stage s strictly between F(s, i)
    # and B(s, i) in the stage's local order (each B is followed by one update).
    delays = pb_delays(k)
    for s, acts in pb_local_orders(k, n).items():
        pos = {(a.kind, a.microbatch): j for j, a in enumerate(acts)}
        for i in range(n):
            between = acts[pos[("F", i)] + 1:pos[("B", i)]]
            assert sum(a.kind == "B" for a in between) == min(i, delays[s])
            assert all(a.microbatch < i for a in between if a.kind == "B")
    assert pb_staleness(k, n) == {s: [min(i, delays[s]) for i in range(n)] for s in range(k)}


@pytest.mark.parametrize("k,n", SIZES)
def test_every_action_once_at_its_tick(k, n):
    ticks = pb_ticks(k, n)
    assert len(ticks) == n + 2 * k - 2
    counts = Counter((a.kind, a.stage, a.microbatch) for t in ticks for a in t)
    assert set(counts.values()) == {1}
    assert set(counts) == {(kind, s, i) for kind in "FB" for s in range(k) for i in range(n)}
    for t, acts in enumerate(ticks):
        for a in acts:
            assert t == (a.microbatch + a.stage if a.kind == "F"
                         else a.microbatch + 2 * k - 2 - a.stage)
        for s in range(k):  # at most one F then one B per stage and tick (F first)
            assert [a.kind for a in acts if a.stage == s] in ([], ["F"], ["B"], ["F", "B"])


@pytest.mark.parametrize("k,n", SIZES)
def test_dependencies_respected(k, n):
    order = pb_global_order(k, n)
    at = {(a.kind, a.stage, a.microbatch): j for j, a in enumerate(order)}
    for s in range(k):
        for i in range(n):
            if s > 0:
                assert at[("F", s, i)] > at[("F", s - 1, i)]
            if s < k - 1:
                assert at[("B", s, i)] > at[("B", s + 1, i)]
            assert at[("B", s, i)] > at[("F", s, i)]


def test_steady_state_overlaps_forward_and_backward_of_different_samples():
    ticks = pb_ticks(4, 20)
    tick = ticks[10]  # steady state: every stage runs one F and one B
    assert [str(a) for a in tick] == ["0F10", "0B4", "1F9", "1B5", "2F8", "2B6", "3F7", "3B7"]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_pb_one_stage_equals_per_sample_momentum_sgd():
    x, y = data()
    sim, losses = run("pb", x, y, num_stages=1, epochs=2)
    assert sim.max_staleness == 0 and sim.spec.forward == "current"
    assert sim.spec.backward == "forward" and not sim.spec.predicts
    (model,) = mlp_stages(x.shape[1], 6, 3, 1, activation="tanh", seed=0)
    opt = sgd(model.parameters())
    ref = []
    for epoch in range(2):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        for j in perm:
            loss = F.cross_entropy(model(x[j:j + 1]), y[j:j + 1])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref.append(float(loss.detach()))
    assert losses == ref
    assert_bitwise(params(sim), [p.detach() for p in model.parameters()])


def test_pb_sc_without_delay_equals_pb():
    x, y = data()
    a, la = run("pb", x, y, num_stages=1)
    b, lb = run("pb-sc", x, y, num_stages=1)
    assert isinstance(b.workers[0].optimizer.optimizer, SpikeCompensatedSGD)
    assert la == lb
    assert_bitwise(params(a), params(b))


@pytest.mark.parametrize("pair", [("pb-lwp", "pb"), ("pb-sc-lwp", "pb-sc")])
def test_lwp_with_zero_horizons_equals_no_prediction(pair):
    x, y = data()
    zeros = {k: [0] * x.shape[0] for k in range(3)}
    a, la = run(pair[0], x, y, horizons=zeros)
    b, lb = run(pair[1], x, y)
    assert la == lb
    assert_bitwise(params(a), params(b))
    c, lc = run(pair[0], x, y)  # the real prediction changes the result
    assert lc != lb


def test_generic_pipedream_on_pb_schedule_equals_pb():
    x, y = data()
    a, la = run("pipedream", x, y, schedule="pb")
    b, lb = run("pb", x, y)
    assert a.schedule == b.schedule == "PB"
    assert la == lb
    assert_bitwise(params(a), params(b))


@pytest.mark.parametrize("stashed", ["pb", "pb-sc", "pb-lwp", "pb-sc-lwp"])
def test_lean_twins_differ_only_in_the_backward_weights(stashed):
    """Each ``-lean`` method runs the same forwards as its stashed twin until the first backward
    that reads weights updated since its forward (the first stage's first delayed sample): the
    per-sample losses of the first stream agree up to there and then part; and with one stage
    (no delay) the twins are identical bit for bit."""
    x, y = data()
    one_a, la = run(stashed, x, y, num_stages=1, epochs=1)
    one_b, lb = run(stashed + "-lean", x, y, num_stages=1, epochs=1)
    assert la == lb
    assert_bitwise(params(one_a), params(one_b))
    a, la = run(stashed, x, y, num_stages=3, epochs=1)
    b, lb = run(stashed + "-lean", x, y, num_stages=3, epochs=1)
    assert la[0] == lb[0]  # the first sample's forward precedes every update
    assert la != lb and any(not torch.equal(u, v) for u, v in zip(params(a), params(b)))
    assert [w.method for w in b.workers] == [stashed + "-lean"] * 3
    assert all(w.spec.backward == "current" for w in b.workers)
    assert all(w.spec.forward == ("predicted" if "lwp" in stashed else "current")
               for w in b.workers)
    expect_h = (lambda w: w.staleness) if "lwp" in stashed else (lambda w: [0] * len(w.staleness))
    assert all(w.horizons == expect_h(w) for w in b.workers)


def test_spike_compensation_uses_stage_delays():
    x, y = data()
    sim, _ = run("pb-sc", x, y, num_stages=4, epochs=1)
    for w, d in zip(sim.workers, [6, 4, 2, 0]):
        opt = w.optimizer.optimizer
        assert isinstance(opt, SpikeCompensatedSGD)
        assert [g["delay"] for g in opt.param_groups] == [d]
        assert opt.param_groups[0]["lr"] == LR and opt.param_groups[0]["momentum"] == 0.9
    assert sim.max_staleness == 6
    assert [w.num_updates for w in sim.workers] == [x.shape[0]] * 4


@pytest.mark.parametrize("method", ["pb", "pb-lwp", "pb-lean", "pb-lwp-lean"])
def test_forward_weights_are_stashed_or_linearly_predicted(method):
    # Record the weight every forward of stage 0 runs on, with the real weight and the velocity
    # at that moment: pb uses w, pb-lwp w - lr * min(i, D_0) * v.
    x, y = data(n=12)
    stages = mlp_stages(x.shape[1], 6, 3, 3, activation="tanh", seed=0)
    lin = stages[0][0]
    real = lin.weight
    sim = PipelineSimulator(stages, sgd, method=method, n_microbatches=12)
    opt = sim.workers[0].optimizer.optimizer
    seen = []

    def hook(mod, args):
        buf = opt.state.get(real, {}).get("momentum_buffer")
        seen.append((mod.weight.detach().clone(), real.detach().clone(),
                     None if buf is None else buf.clone()))

    lin.register_forward_pre_hook(hook)
    sim.step(x, y)
    assert len(seen) == 12
    for i, (used, w, v) in enumerate(seen):
        s = min(i, 4)
        if method in ("pb", "pb-lean") or v is None:
            assert torch.equal(used, w)
        else:
            torch.testing.assert_close(used, w - LR * s * v, rtol=1e-6, atol=1e-7)
            assert s == 0 or not torch.equal(used, w)


@pytest.mark.parametrize("method", PB_METHODS)
def test_deterministic(method):
    x, y = data()
    a, la = run(method, x, y)
    b, lb = run(method, x, y)
    assert la == lb
    assert_bitwise(params(a), params(b))


def test_simulate_defaults_to_pb_schedule_and_step_means():
    x, y = data()
    stages = mlp_stages(x.shape[1], 6, 3, 2, seed=0)
    res = simulate(stages, sgd, x, y, method="pb-sc-lwp", n_microbatches=12, microbatch_size=1,
                   epochs=2)
    assert res.simulator.schedule == "PB" and len(res.losses) == 4  # 2 streams per epoch
    assert res.simulator.staleness == {0: [0, 1, 2] + [2] * 9, 1: [0] * 12}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "pb", "schedule": "1F1B"}, "schedule 'PB' only"),
        ({"method": "gpipe", "schedule": "PB"}, "updates after every backward"),
        ({"method": "pb", "make": lambda p: torch.optim.AdamW(p, 1e-3)}, "momentum SGD"),
        ({"method": "pb", "make": lambda p: torch.optim.SGD(p, 0.1)}, "momentum > 0"),
        ({"method": "pb-sc", "make": lambda p: torch.optim.SGD(p, 0.1, momentum=0.9,
                                                               nesterov=True)}, "nesterov"),
        ({"method": "pb", "update_every": 2}, "update_every"),
        ({"method": "pb-lwp", "rule": "sgd"}, "rule"),
        ({"method": "pb", "horizons": {0: [0] * 4}}, "horizons"),
        ({"method": "pb-sc-lean", "horizons": {0: [0] * 4}}, "horizons"),
        ({"method": "pb-x"}, "method must be one of"),
    ],
)
def test_rejects_bad_configurations(kwargs, match):
    kwargs = dict(kwargs)
    make = kwargs.pop("make", sgd)
    with pytest.raises(ValueError, match=match):
        PipelineSimulator([nn.Linear(3, 3), nn.Linear(3, 3)], make, n_microbatches=4, **kwargs)


# ---------------------------------------------------------------------------------------------
# predictopt compare
# ---------------------------------------------------------------------------------------------


def test_compare_runs_pb_methods(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "mlp", "--dataset", "iris", "--stages", "2", "--epochs", "1",
               "--methods", "sequential,pb-sync," + ",".join(PB_METHODS),
               "--microbatch-size", "4",
               "--microbatches", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pb-sc-lwp" in text and "sgd 0.005" in text  # default pb lr: 0.02 / 4
    data_ = json.loads((out / "results.json").read_text())
    cfg, res = data_["config"], data_["methods"]
    assert cfg["pb_lr"] == pytest.approx(0.005) and cfg["pb_optimizer"] == "sgd"
    assert cfg["pb_stream_length"] == cfg["steps_per_epoch"] * 16
    assert res["sequential"]["optimizer"] == "adamw"
    for m in PB_METHODS:
        r = res[m]
        assert r["optimizer"] == "sgd" and r["schedule"] == "PB" and r["max_staleness"] == 2
        assert len(r["train_loss_curve"]) == cfg["steps_per_epoch"]
        assert r["updates_per_stage"] == cfg["pb_stream_length"]
        assert 0.0 <= r["test_accuracy"] <= 1.0
    sync = res["pb-sync"]  # the reference: per-sample momentum SGD without delay
    assert sync["max_staleness"] == 0 and sync["optimizer"] == "sgd"
    assert sync["updates_per_stage"] == cfg["pb_stream_length"]


def test_compare_pb_lr_option_and_unknown_method(tmp_path, capsys):
    rc = main(["compare", "--task", "mlp", "--dataset", "iris", "--stages", "2", "--epochs", "1",
               "--methods", "pb", "--pb-lr", "0.003", "--microbatch-size", "4",
               "--microbatches", "4", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["pb_lr"] == 0.003
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "mlp", "--methods", "pb,pb-foo", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--methods" in capsys.readouterr().err
