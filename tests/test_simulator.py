"""Tests for predictopt.pipeline.semantics (StageWorker) and predictopt.pipeline.simulator."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from predictopt import PredictiveOptimizer, predict
from predictopt.data import DATASETS, load_dataset, mlp_stages
from predictopt.pipeline import (
    METHODS,
    SUPPORTED_SCHEDULES,
    FirstMomentRule,
    PipelineSimulator,
    StageWorker,
    default_update_every,
    global_order,
    simulate,
    staleness,
    train,
)
from predictopt.rules import get_rule
from tests._hyp import props

torch.set_num_threads(1)

IN, HID, OUT = 5, 8, 3


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(48, IN, generator=gen), torch.randint(0, OUT, (48,), generator=gen)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def weights(stages) -> list[torch.Tensor]:
    return [p.detach().clone() for m in stages for p in m.parameters()]


def assert_same(a_stages, a_losses, b_stages, b_losses) -> None:
    for p, q in zip(weights(a_stages), weights(b_stages), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(torch.tensor(a_losses, dtype=torch.float64),
                       torch.tensor(b_losses, dtype=torch.float64))


def run_sim(method, x, y, *, num_stages=4, n=4, steps=3, make=adamw, seed=1, **kw):
    stages = mlp_stages(IN, HID, OUT, num_stages, seed=seed)
    sim = PipelineSimulator(stages, make, method=method, n_microbatches=n, **kw)
    losses = []
    for _ in range(steps):
        losses += sim.step(x, y)
    return stages, losses, sim


# ------------------------------------------------------------------ hand-written references


def plain_loop(x, y, *, num_stages=4, n=4, steps=3, make=adamw, accumulate=False):
    """Per micro-batch: forward through all stages, loss, backward, step every optimizer (or,
    with ``accumulate``, sum the micro-batch gradients, divide by n and step once per batch)."""
    stages = mlp_stages(IN, HID, OUT, num_stages, seed=1)
    opts = [make(m.parameters()) for m in stages]
    losses = []
    size = x.shape[0] // n
    for _ in range(steps):
        for xi, yi in zip(x.split(size), y.split(size)):
            h = xi
            for m in stages:
                h = m(h)
            loss = F.cross_entropy(h, yi)
            loss.backward()
            losses.append(float(loss.detach()))
            if not accumulate:
                for o in opts:
                    o.step()
                    o.zero_grad()
        if accumulate:
            for m in stages:
                for p in m.parameters():
                    p.grad.div_(n)
            for o in opts:
                o.step()
                o.zero_grad()
    return stages, losses


def stash_reference(x, y, *, schedule, method, num_stages=4, n=8, steps=2, make=adamw,
                    update_every=1):
    """An independent executor of ``global_order``: every forward runs on a deep copy of the
    stage module holding the weights the method prescribes (PipeDream: the current ones,
    PipeOptim: ``predict(opt, s)``, 2BW: the version one update older than the synchronous
    one, from a history of all versions); gradients are copied back at the backward."""
    stages = mlp_stages(IN, HID, OUT, num_stages, seed=1)
    spr = 2 if num_stages > 1 and schedule not in ("GPipe", "1F1B") else 1
    ranks = num_stages // spr
    table = staleness(schedule, ranks, n, stages_per_rank=spr, update_every=update_every)
    order = global_order(schedule, ranks, n, stages_per_rank=spr)
    opts = [PredictiveOptimizer(make(m.parameters()), steps=max(1, max(table[k])),
                                calibrate=False) for k, m in enumerate(stages)]
    history = [[weights([m])] for m in stages]  # every version of every stage
    done = [0] * num_stages
    size = x.shape[0] // n
    losses_all = []
    for _ in range(steps):
        xs, ys = x.split(size), y.split(size)
        saved, acts, grads, losses = {}, {}, {}, [None] * n
        for a in order:
            k, i = a.stage, a.microbatch
            if a.kind == "F":
                clone = copy.deepcopy(stages[k])
                if method == "pipeoptim":
                    pred = predict(opts[k], table[k][i])
                    vals = [pred[p] for p in stages[k].parameters()]
                elif method == "pipedream-2bw":
                    ideal = len(history[k]) - 1 + table[k][i]
                    vals = history[k][max(ideal - 1, 0)]
                else:
                    vals = weights([stages[k]])
                with torch.no_grad():
                    for q, v in zip(clone.parameters(), vals):
                        q.copy_(v)
                inp = xs[i] if k == 0 else acts.pop((k - 1, i)).detach().requires_grad_()
                out = clone(inp)
                saved[(k, i)] = (clone, inp, out)
                if k == num_stages - 1:
                    losses[i] = F.cross_entropy(out, ys[i])
                else:
                    acts[(k, i)] = out
            else:
                assert a.kind == "B"
                clone, inp, out = saved.pop((k, i))
                if k == num_stages - 1:
                    losses[i].backward()
                else:
                    out.backward(grads.pop((k + 1, i)))
                if k > 0:
                    grads[(k, i)] = inp.grad
                for p, q in zip(stages[k].parameters(), clone.parameters()):
                    p.grad = q.grad if p.grad is None else p.grad + q.grad
                done[k] += 1
                if done[k] % update_every == 0:
                    if update_every > 1:
                        for p in stages[k].parameters():
                            p.grad.div_(update_every)
                    opts[k].step()
                    opts[k].zero_grad()
                    history[k].append(weights([stages[k]]))
        losses_all += [float(v.detach()) for v in losses]
    return stages, losses_all


# ------------------------------------------------------------------ bitwise equivalences


@pytest.mark.parametrize("make", [adamw, sgd_momentum], ids=["adamw", "sgd-momentum"])
def test_sequential_equals_plain_loop(batch, make):
    x, y = batch
    a_stages, a_losses, _ = run_sim("sequential", x, y, make=make)
    b_stages, b_losses = plain_loop(x, y, make=make)
    assert_same(a_stages, a_losses, b_stages, b_losses)


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_gpipe_equals_accumulation_loop(batch, schedule):
    # Each stage completes its backwards in micro-batch order 0..n-1 under these schedules, the
    # same order in which loss.backward() accumulates into .grad in the plain loop; both then
    # divide by n once: bit for bit.
    x, y = batch
    a_stages, a_losses, sim = run_sim("gpipe", x, y, schedule=schedule)
    b_stages, b_losses = plain_loop(x, y, accumulate=True)
    assert_same(a_stages, a_losses, b_stages, b_losses)
    assert all(w.num_updates == 3 for w in sim.workers)


@pytest.mark.parametrize("method", ["pipedream", "pipeoptim", "pipeoptim-lean", "spectrain"])
def test_one_stage_pipeline_equals_sequential(batch, method):
    x, y = batch
    a = run_sim(method, x, y, num_stages=1, schedule="1F1B")
    b = run_sim("sequential", x, y, num_stages=1)
    assert a[2].max_staleness == 0
    assert_same(a[0], a[1], b[0], b[1])


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "InterleavedZeroBubble"])
def test_pipeoptim_with_zero_horizon_equals_pipedream(batch, schedule):
    x, y = batch
    zeros = {k: [0] * 8 for k in range(4)}
    a = run_sim("pipeoptim", x, y, n=8, schedule=schedule, horizons=zeros)
    b = run_sim("pipedream", x, y, n=8, schedule=schedule)
    assert b[2].max_staleness > 0
    assert_same(a[0], a[1], b[0], b[1])
    c = run_sim("pipeoptim", x, y, n=8, schedule=schedule)  # real prediction differs
    assert any(not torch.equal(p, q) for p, q in zip(weights(a[0]), weights(c[0])))


@pytest.mark.parametrize(
    "method,schedule,update_every",
    [("pipedream", "1F1B", 1), ("pipedream", "Interleaved1F1B", 1), ("pipeoptim", "1F1B", 1),
     ("pipeoptim", "LoopedBFS", 1), ("pipedream-2bw", "1F1B", 4),
     ("pipedream-2bw", "1F1B", 8)],
)
def test_matches_deepcopy_reference(batch, method, schedule, update_every):
    x, y = batch
    a = run_sim(method, x, y, n=8, steps=2, schedule=schedule,
                **({"update_every": update_every} if method == "pipedream-2bw" else {}))
    b = stash_reference(x, y, schedule=schedule, method=method, update_every=update_every)
    assert_same(a[0], a[1], b[0], b[1])


def test_split_backward_equals_full_backward(batch):
    # InterleavedZeroBubble runs I/W, Interleaved1F1B runs B; same placement, and with gpipe
    # semantics the order of completions per stage is 0..n-1 in both.
    x, y = batch
    a = run_sim("gpipe", x, y, n=4, schedule="InterleavedZeroBubble")
    b = run_sim("gpipe", x, y, n=4, schedule="Interleaved1F1B")
    assert_same(a[0], a[1], b[0], b[1])


def test_determinism(batch):
    x, y = batch
    for method in ("pipeoptim", "spectrain", "xpipe"):
        a = run_sim(method, x, y, n=8, schedule="ZBVZeroBubble")
        b = run_sim(method, x, y, n=8, schedule="ZBVZeroBubble")
        assert_same(a[0], a[1], b[0], b[1])


# ------------------------------------------------------------------ action accounting


def _valid(schedule: str, ranks: int, n: int) -> bool:
    if schedule == "1F1B":
        return n >= ranks
    if schedule == "DualPipeV":
        return n >= 2 * ranks
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n // ranks)
        return n % rounds == 0
    return True


@props(40)
@given(schedule=st.sampled_from(SUPPORTED_SCHEDULES), ranks=st.integers(1, 3),
       n=st.integers(1, 8), method=st.sampled_from(METHODS))
def test_every_action_once_and_update_counts(schedule, ranks, n, method):
    assume(_valid(schedule, ranks, n))
    spr = 1 if schedule in ("GPipe", "1F1B") else 2
    num_stages = ranks * spr
    stages = [torch.nn.Linear(2, 2) for _ in range(num_stages)]
    try:
        try:
            sim = PipelineSimulator(stages, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5),
                                    method=method, schedule=schedule, n_microbatches=n)
        except ValueError as exc:  # a method for Adam only (basis rotation): run it with AdamW
            if "converts Adam" not in str(exc):
                raise
            sim = PipelineSimulator(stages, lambda p: torch.optim.AdamW(p, lr=0.1),
                                    method=method, schedule=schedule, n_microbatches=n)
    except ValueError as exc:  # e.g. pipedream-2bw whose table needs a third buffer
        assert method == "pipedream-2bw" and "buffers" in str(exc)
        return
    log: Counter = Counter()
    for k, w in enumerate(sim.workers):
        for name in ("forward", "backward", "backward_input", "backward_weight"):
            fn = getattr(w, name)

            def wrapped(mb, *a, _fn=fn, _name=name, _k=k, **kw):
                log[(_k, _name, mb)] += 1
                return _fn(mb, *a, **kw)

            setattr(w, name, wrapped)
    x, y = torch.randn(2 * n, 2), torch.randint(0, 2, (2 * n,))
    steps = 2
    for _ in range(steps):
        losses = sim.step(x, y)
        assert len(losses) == n
    u = sim.update_every
    assert u == default_update_every(method, num_stages, n)
    for k, w in enumerate(sim.workers):
        for i in range(n):
            assert log[(k, "forward", i)] == steps
            full, split_i, split_w = (log[(k, a, i)] for a in
                                      ("backward", "backward_input", "backward_weight"))
            assert split_i == split_w  # every I is completed by its W
            assert full + split_w == steps  # completed backwards: B, or W after I
        assert w.num_forwards == w.num_backwards == steps * n
        assert w.num_updates == steps * n // u
        assert w.in_flight == []
        assert all(p.grad is None for p in w.params)  # zeroed after the last update


# ------------------------------------------------------------------ StageWorker contract


def _worker(method="pipedream", staleness_=(0, 0), **kw):
    m = torch.nn.Linear(3, 2)
    return StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), method=method,
                       staleness=list(staleness_), **kw)


def test_worker_detects_order_mismatch():
    w = _worker(staleness_=(0, 0))
    x = torch.randn(4, 3)
    w.forward(0, x)
    out1 = w.forward(1, x)
    w.backward(0, grad_output=torch.ones(4, 2))  # updates: mb 1 is one update stale, not 0
    with pytest.raises(RuntimeError, match="staleness"):
        w.backward(1, grad_output=torch.ones_like(out1))


def test_worker_call_order_errors():
    w = _worker(staleness_=(0, 0))
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="no pending forward"):
        w.backward(0, grad_output=torch.ones(4, 2))
    out = w.forward(0, x)
    with pytest.raises(RuntimeError, match="forwarded already"):
        w.forward(0, x)
    with pytest.raises(RuntimeError, match="backward_input first"):
        w.backward_weight(0)
    with pytest.raises(ValueError, match="exactly one"):
        w.backward(0)
    grads = w.backward_input(0, grad_output=torch.ones_like(out))
    assert grads[0] is not None and grads[0].shape == x.shape  # input_grads defaults to True
    with pytest.raises(RuntimeError, match="call backward_weight"):
        w.backward(0, grad_output=torch.ones_like(out))
    w.backward_weight(0)
    assert w.num_updates == 1
    with pytest.raises(ValueError, match="mb"):
        w.forward(5, x)


def test_worker_returns_input_grads_and_split_equals_full():
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    m2.load_state_dict(m1.state_dict())
    w1 = StageWorker(m1, torch.optim.SGD(m1.parameters(), lr=0.1), method="pipedream",
                     staleness=[0])
    w2 = StageWorker(m2, torch.optim.SGD(m2.parameters(), lr=0.1), method="pipedream",
                     staleness=[0])
    x, g = torch.randn(4, 3, requires_grad=True), torch.randn(4, 2)
    expected = g @ m1.weight.detach()
    w1.forward(0, x)
    (gi1,) = w1.backward(0, grad_output=g)
    w2.forward(0, x)
    (gi2,) = w2.backward_input(0, grad_output=g)
    w2.backward_weight(0)
    assert torch.equal(gi1, gi2) and torch.equal(gi1, expected)
    assert x.grad is None  # the worker detaches its inputs
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_first_stage_inputs_get_no_grad():
    w = _worker(staleness_=(0,), input_grads=False)
    w.forward(0, torch.randn(2, 3))
    assert w.backward(0, grad_output=torch.ones(2, 2)) == (None,)


def test_2bw_uses_previous_version():
    # u = n = 2, all s = 0: step t runs on W(t-1): W1 = W0 - g(W0), W2 = W1 - g(W0).
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.5), method="pipedream-2bw",
                    staleness=[0, 0], update_every=2)
    x = torch.ones(1, 1)
    seen = []
    for _ in range(3):
        for i in range(2):
            out = w.forward(i, x)
            seen.append(float(out.detach()))
            w.backward(i, loss=out.sum())  # d/dW = 1
    # W0 = 1, W1 = 0.5, W2 = 0.0; forwards of step t see W(t-1) (W(-1) = W0)
    assert seen == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]

    # the second version is public state: read, validated on write, and used by the next forward
    prev = w.previous_version
    assert prev is not None and torch.equal(prev[0], torch.zeros(1, 1))  # W2, before W3
    with pytest.raises(ValueError, match="previous_version must hold 1 tensors"):
        w.previous_version = [torch.zeros(2, 2)]
    assert torch.equal(w.previous_version[0], prev[0])  # unchanged by the rejected write
    w.previous_version = [torch.full((1, 1), 7.0)]
    assert float(w.forward(0, x).detach()) == 7.0
    with pytest.raises(RuntimeError, match="between steps"):
        w.previous_version = None


def test_first_moment_rule():
    p = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    rule = FirstMomentRule()
    for _ in range(2):
        p.grad = torch.full((3,), 2.0)
        sgd.step()
    ps, ds = rule.directions(sgd.param_groups[0], [p], [sgd.state[p]])
    assert torch.equal(ds[0], sgd.state[p]["momentum_buffer"])
    q = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([q], lr=0.1)
    q.grad = torch.full((3,), 2.0)
    adam.step()
    _, ds = rule.directions(adam.param_groups[0], [q], [adam.state[q]])
    assert torch.allclose(ds[0], torch.full((3,), 2.0))  # bias-corrected first moment
    assert "first-moment" in __import__("predictopt").available_rules()
    # without a first moment: the optimizer's own rule (here SGD's observed update)
    r = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.SGD([r], lr=0.1)
    m = torch.nn.Linear(1, 1)
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), method="spectrain",
                    staleness=[0])
    assert isinstance(w.rule, FirstMomentRule) and w.rule.fallback is get_rule(None, plain)
    assert w.optimizer.steps == 1 and w.rule.observes(w.optimizer.param_groups[0])


def test_method_rules():
    m = torch.nn.Linear(1, 1)
    x = StageWorker(m, torch.optim.AdamW(m.parameters()), method="xpipe", staleness=[0, 0],
                    update_every=2)
    assert x.rule is get_rule("adam")
    x = StageWorker(m, torch.optim.Adamax(m.parameters()), method="xpipe", staleness=[0])
    assert x.rule is get_rule("adamax")
    x = StageWorker(m, torch.optim.RMSprop(m.parameters()), method="pipeoptim", staleness=[2])
    assert x.rule is get_rule("rmsprop") and x.optimizer.steps == 2
    x = StageWorker(m, torch.optim.RMSprop(m.parameters()), method="pipedream", staleness=[2])
    assert x.rule is None and x.optimizer.steps == 0


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "async"}, "method"),
        ({"schedule": "Nope"}, "schedule"),
        ({"n_microbatches": 0}, "n_microbatches"),
        ({"num_ranks": 3}, "num_ranks"),
        ({"method": "gpipe", "update_every": 2}, "update_every"),
        ({"method": "pipedream", "update_every": 2}, "update_every"),
        ({"method": "xpipe", "update_every": 3}, "update_every"),
        ({"method": "pipedream-2bw", "update_every": 2}, "update_every"),
        ({"method": "pipedream", "horizons": {0: [0] * 4}}, "horizons"),
        ({"method": "gpipe", "rule": "adam"}, "rule"),
        ({"method": "pipeoptim", "horizons": {7: [0] * 4}}, "horizons"),
        ({"schedule": "Interleaved1F1B", "stages": 3}, "stages"),
        ({"stages": []}, "stages"),
        ({"schedule": "1F1B", "n_microbatches": 2}, "rejects"),
    ],
)
def test_simulator_bad_arguments(kwargs, match):
    kwargs = dict(kwargs)
    num = kwargs.pop("stages", 4)
    stages = num if isinstance(num, list) else mlp_stages(IN, HID, OUT, num)
    args = {"method": "pipeoptim", "n_microbatches": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        PipelineSimulator(stages, adamw, **args)


def test_step_and_train_bad_arguments(batch):
    x, y = batch
    sim = PipelineSimulator(mlp_stages(IN, HID, OUT, 2), adamw, method="pipedream",
                            n_microbatches=4)
    with pytest.raises(ValueError, match="multiple of n_microbatches"):
        sim.step(x[:10], y[:10])
    with pytest.raises(ValueError, match="same batch size"):
        sim.step(x[:8], y[:4])
    with pytest.raises(ValueError, match="epochs"):
        train(sim, x, y, epochs=0, microbatch_size=2)
    with pytest.raises(ValueError, match="exceeds"):
        train(sim, x, y, epochs=1, microbatch_size=100)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "nope"}, "method"),
        ({"staleness": []}, "staleness"),
        ({"staleness": [0, -1]}, "staleness"),
        ({"method": "gpipe", "staleness": [0, 1], "update_every": 2}, "staleness"),
        ({"method": "gpipe", "staleness": [0, 0], "update_every": 1}, "update_every"),
        ({"method": "pipedream-2bw", "staleness": [0, 2], "update_every": 2}, "buffers"),
        ({"update_every": 3, "staleness": [0, 0]}, "update_every"),
        ({"method": "pipeoptim", "horizons": [0]}, "horizons"),
        ({"method": "pipedream", "rule": "adam"}, "rule"),
        ({"method": "pipeoptim", "rule": "no-such-rule"}, "rule"),
    ],
)
def test_worker_bad_arguments(kwargs, match):
    m = torch.nn.Linear(2, 2)
    args = {"method": "pipedream", "staleness": [0, 0], **kwargs}
    with pytest.raises(ValueError, match=match):
        StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), **args)


def test_worker_rejects_foreign_parameters():
    m = torch.nn.Linear(2, 2)
    other = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="not parameters of module"):
        StageWorker(m, torch.optim.SGD([*m.parameters(), other], lr=0.1), method="pipedream",
                    staleness=[0])


# ------------------------------------------------------------------ data and helpers


@pytest.mark.parametrize("name", DATASETS)
def test_load_dataset(name):
    ds = load_dataset(name)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.long
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == ds.num_features
    assert int(ds.y_train.max()) == ds.num_classes - 1
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(ds.num_features), atol=1e-4)
    again = load_dataset(name)
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)


def test_data_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("iris", test_fraction=1.5)
    with pytest.raises(ValueError, match="num_stages"):
        mlp_stages(4, 8, 3, 0)
    with pytest.raises(ValueError, match="activation"):
        mlp_stages(4, 8, 3, 2, activation="sigmoidish")


def test_mlp_stages_seeded_and_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = mlp_stages(4, 8, 3, 3, seed=5), mlp_stages(4, 8, 3, 3, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(a) == 3 and isinstance(a[-1], torch.nn.Linear)
    for p, q in zip(weights(a), weights(b)):
        assert torch.equal(p, q)


def test_simulate_and_train_converge():
    ds = load_dataset("iris")
    res = simulate(mlp_stages(4, 16, 3, 2), lambda p: torch.optim.Adam(p, lr=1e-2), ds.x_train,
                   ds.y_train, method="pipeoptim", n_microbatches=4, microbatch_size=6,
                   epochs=8)
    assert len(res.losses) == 8 * (ds.x_train.shape[0] // 24)
    assert sum(res.losses[-5:]) / 5 < 0.5 * sum(res.losses[:5]) / 5
    _, acc = res.simulator.loss_and_accuracy(ds.x_test, ds.y_test)
    assert acc > 0.8


class _Split(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(IN, 4)

    def forward(self, x):
        h = self.lin(x)
        return h, (h > 0).to(torch.int64)  # the second output carries no graph


class _Join(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, OUT)

    def forward(self, h, mask):
        return self.lin(torch.tanh(h) * mask)


def _split_join():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return [_Split(), _Join()]


def test_tuple_outputs_between_stages(batch):
    x, y = batch
    stages = _split_join()
    sim = PipelineSimulator(stages, adamw, method="sequential", n_microbatches=4)
    losses = sim.step(x, y) + sim.step(x, y)
    ref = _split_join()
    opts = [adamw(m.parameters()) for m in ref]
    ref_losses = []
    for _ in range(2):
        for xi, yi in zip(x.split(12), y.split(12)):
            loss = F.cross_entropy(ref[1](*ref[0](xi)), yi)
            loss.backward()
            ref_losses.append(float(loss.detach()))
            for o in opts:
                o.step()
                o.zero_grad()
    assert_same(stages, losses, ref, ref_losses)
    piped = PipelineSimulator(_split_join(), adamw, method="pipeoptim", n_microbatches=4)
    assert len(piped.step(x, y)) == 4 and piped.max_staleness == 1


# ------------------------------------------------------------------ pipeoptim-lean


def _lean_stage() -> tuple[torch.nn.Module, StageWorker, list[dict[str, torch.Tensor]], list]:
    gen = torch.Generator().manual_seed(5)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    seen: list[dict[str, torch.Tensor]] = []  # gradients of every update, by parameter name
    names = {p: n for n, p in m.named_parameters()}
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        {names[p]: p.grad.clone() for g in o.param_groups for p in g["params"]}))
    w = StageWorker(m, opt, method="pipeoptim-lean", staleness=[1, 0])
    return m, w, seen, names


def test_lean_backward_uses_the_current_weights():
    """F(0) on the prediction, F(1), B(1) updates, B(0): the activations are F(0)'s, the
    weights B(0) differentiates through are the ones after the update (checked against the chain
    rule written out), and they differ from the forward's (so ``pipeoptim`` would differ)."""
    m, w, seen, _ = _lean_stage()
    gen = torch.Generator().manual_seed(6)
    x0, x1 = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    w.forward(0, x1)  # one warm-up micro-batch pair so Adam has state to predict from
    w.forward(1, x1)
    w.backward(1, grad_output=torch.ones(5, 3, dtype=torch.float64))
    w.backward(0, grad_output=torch.ones(5, 3, dtype=torch.float64))
    pred = {n: v.detach().clone() for n, v in
            zip(w.param_names, (predict(w.optimizer, 1)[p] for p in w.params))}
    out0 = w.forward(0, x0)
    w.forward(1, x1)
    w.backward(1, grad_output=torch.ones(5, 3, dtype=torch.float64))  # update: W changes
    current = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(5, 3)
    w.backward(0, grad_output=g)
    # the chain rule: h from the forward (predicted weights), W2 of the backward = current
    h = torch.tanh(x0 @ pred["0.weight"].T + pred["0.bias"])
    assert torch.allclose(out0.detach(), h @ pred["2.weight"].T + pred["2.bias"], rtol=0,
                          atol=1e-13)
    g_pre = (g @ current["2.weight"]) * (1 - h * h)
    expect = {"2.weight": g.T @ h, "2.bias": g.sum(0), "0.weight": g_pre.T @ x0,
              "0.bias": g_pre.sum(0)}
    got = seen[-1]
    for name, value in expect.items():
        assert torch.allclose(got[name], value, rtol=1e-12, atol=1e-12), name
    g_pre_forward = (g @ pred["2.weight"]) * (1 - h * h)  # what pipeoptim would compute
    assert not torch.allclose(got["0.weight"], g_pre_forward.T @ x0, rtol=1e-6, atol=0)


def test_lean_keeps_no_weight_copy_per_microbatch(monkeypatch):
    """With micro-batches in flight, ``pipeoptim`` keeps alive every prediction its backward
    reads (autograd saved the weight matrices; a bias is not needed and dies after the
    forward); ``pipeoptim-lean`` keeps none."""
    import gc
    import weakref

    from predictopt.pipeline import semantics

    alive: dict[str, list[bool]] = {}
    for method in ("pipeoptim", "pipeoptim-lean"):
        refs: list[weakref.ref] = []
        real_predict = semantics.predict

        def recording_predict(*args, _real=real_predict, _refs=refs, **kwargs):
            out = _real(*args, **kwargs)
            _refs.extend(weakref.ref(v) for v in out.values() if v.dim() == 2)
            return out

        monkeypatch.setattr(semantics, "predict", recording_predict)
        m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                        method=method, staleness=[2, 1, 0])
        x = torch.randn(5, 4)
        for _ in range(2):  # step 1 builds momentum; step 2's forwards predict
            refs.clear()
            outs = [w.forward(i, x) for i in range(3)]
            gc.collect()
            alive[method] = [r() is not None for r in refs]
            for i in (2, 1, 0):
                w.backward(i, grad_output=torch.ones_like(outs[i]))
        monkeypatch.undo()
    assert alive["pipeoptim"] and all(alive["pipeoptim"])
    assert alive["pipeoptim-lean"] and not any(alive["pipeoptim-lean"])


# ------------------------------------------------------------------ memory held by the worker


def test_completed_backward_leaves_no_gradient_in_the_graph():
    """A caller may keep the loss (torch's schedules keep every micro-batch's loss until the
    step ends): the graph it reaches must not hold a weight gradient per micro-batch."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), method="gpipe",
                    staleness=[0, 0, 0], update_every=3)
    x = torch.randn(5, 4, requires_grad=True)
    losses = []
    for i in range(3):
        loss = w.forward(i, x).square().mean()
        losses.append(loss)
        w.backward(i, loss=loss)

    def accumulate_nodes(fn, seen):
        if fn is None or fn in seen:
            return
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            accumulate_nodes(nxt, seen)

    nodes: set = set()
    for loss in losses:
        accumulate_nodes(loss.grad_fn, nodes)
    variables = [n.variable for n in nodes if hasattr(n, "variable")]
    assert len(variables) >= 3 * 4  # every micro-batch's weight leaves are still reachable
    assert all(v.grad is None for v in variables)
    assert all(p.grad is None for p in m.parameters())  # zeroed by the update


def test_forwards_between_two_updates_share_one_stash():
    """pipedream-2bw keeps two weight buffers (the previous version and a copy of the current
    one), not one copy per micro-batch: at every version the forwards that do not run on the
    real weights use at most two storages, and the previous version is the last stash."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, IN, generator=gen), torch.randint(0, OUT, (16,), generator=gen)
    stages = mlp_stages(IN, HID, OUT, 4, seed=0)
    sim = PipelineSimulator(stages, lambda p: torch.optim.SGD(p, lr=0.1), method="pipedream-2bw",
                            schedule="1F1B", n_microbatches=8, update_every=4)
    assert sim.staleness[0] == [0, 0, 0, 0, 1, 1, 1, 0]
    worker, real = sim.workers[0], stages[0][0].weight
    seen: dict[int, list[int]] = {}

    def hook(mod, args):
        ptr = mod.weight.untyped_storage().data_ptr()
        if ptr != real.untyped_storage().data_ptr():
            seen.setdefault(worker.num_updates, []).append(ptr)

    stages[0][0].register_forward_pre_hook(hook)
    for _ in range(3):
        sim.step(x, y)
    assert max(len(ptrs) for ptrs in seen.values()) >= 7  # versions with many such forwards
    assert all(len(set(ptrs)) <= 2 for ptrs in seen.values())
    # the previous version the s = 0 forwards use after an update is the stash of before
    assert any(set(seen[v]) & set(seen[v + 1]) for v in seen if v + 1 in seen)


@pytest.mark.parametrize("method", ["pipedream", "pipeoptim"])
def test_a_copy_dies_with_its_backward_even_if_the_loss_is_kept(method, monkeypatch):
    """Stashed and predicted weights are referenced by autograd's saved tensors only: once the
    micro-batch's backward has run they are freed, although the caller keeps its loss."""
    import gc
    import weakref

    from predictopt.pipeline import semantics

    refs: list[weakref.ref] = []
    real_weights = semantics.StageWorker._weights

    def recording_weights(self, mb):
        vals = real_weights(self, mb)
        refs.extend(weakref.ref(v) for v in vals
                    if v.untyped_storage().data_ptr() not in
                    {p.untyped_storage().data_ptr() for p in self.params})
        return vals

    monkeypatch.setattr(semantics.StageWorker, "_weights", recording_weights)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), method=method,
                    staleness=[1, 0])
    x = torch.randn(5, 4)
    kept = []
    for _ in range(2):
        refs.clear()
        losses = [w.forward(i, x).square().mean() for i in range(2)]
        w.backward(1, loss=losses[1])
        w.backward(0, loss=losses[0])
        kept += losses
        gc.collect()
        assert refs, "micro-batch 0 runs on a copy"
        assert not any(r() is not None for r in refs)
