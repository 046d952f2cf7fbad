"""The PredictiveOptimizer contract: API, errors, hooks, schedulers, checkpoints, AMP, pickling."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import predictopt
from predictopt import PredictiveOptimizer, predict
from predictopt.rules import OBSERVED_KEY, ObservedUpdateRule, PredictionRule
from predictopt.testing import check_rule


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, opt, n, predicted=True, start=0):
    losses = []
    for t in range(start, start + n):
        x, y = _batch(t)
        ctx = opt.predicted() if predicted else _null()
        with ctx:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ construction and errors
def test_is_an_optimizer_and_shares_the_wrapped_objects():
    m = _model()
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt = PredictiveOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    _train(m, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert opt.param_groups is inner.param_groups  # still the same object after a load
    assert opt.state is inner.state


@pytest.mark.parametrize("bad", [None, "adam", nn.Linear(2, 2), [torch.zeros(2)]])
def test_rejects_non_optimizers_naming_what_was_passed(bad):
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer.*got"):
        PredictiveOptimizer(bad)


def test_rejects_wrapping_a_wrapper():
    opt = PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already"):
        PredictiveOptimizer(opt)


@pytest.mark.parametrize(("steps", "exc"), [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                            ("2", TypeError)])
def test_rejects_bad_steps(steps, exc):
    with pytest.raises(exc, match="steps must be an int >= 0"):
        PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), steps=steps)


def test_rejects_unknown_rule_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"rule must be .*'adam'.*got 'nope'"):
        PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), rule="nope")
    with pytest.raises(TypeError, match="rule must be"):
        PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), rule=3)


def test_bad_arguments_change_nothing():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), steps=2)
    _train(m, opt, 2)
    w, sd = _weights(m), copy.deepcopy(opt.state_dict())
    for bad in (-3, 2.0):
        with pytest.raises((ValueError, TypeError)):
            opt.predict_(bad)
    with pytest.raises(ValueError, match="lrs must hold"):
        opt.predict_(2, lrs=[[1e-2]])
    assert not opt.is_predicted
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))
    new_sd = opt.state_dict()
    for k in sd["state"]:
        for n, v in sd["state"][k].items():
            assert torch.equal(v, new_sd["state"][k][n])


# ------------------------------------------------------------------ prediction semantics
def test_predicted_block_gives_gradients_at_the_predicted_weights():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                              steps=3)
    _train(m, opt, 3)
    expected = predict(opt, 3)
    twin = _model()
    with torch.no_grad():
        for q, p in zip(twin.parameters(), m.parameters()):
            q.copy_(expected[p])
    x, y = _batch(99)
    nn.functional.cross_entropy(twin(x), y).backward()
    real = _weights(m)
    with opt.predicted():
        for p in m.parameters():
            assert torch.equal(p, expected[p])
        nn.functional.cross_entropy(m(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(real, m.parameters()))
    for p, q in zip(m.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_nesting_raises_and_restore_requires_prediction():
    opt = PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9))
    with opt.predicted():
        with pytest.raises(RuntimeError, match="do not nest"):
            with opt.predicted():
                pass
        assert opt.is_predicted
    with pytest.raises(RuntimeError, match="not predicted"):
        opt.restore_()


def test_step_while_predicted_restores_then_updates_the_real_weights():
    m1, m2 = _model(), _model()
    o1 = PredictiveOptimizer(torch.optim.Adam(m1.parameters(), lr=1e-2), steps=2)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    for t in range(4):
        x, y = _batch(t)
        nn.functional.cross_entropy(m2(x), y).backward()
        for p, q in zip(m1.parameters(), m2.parameters()):
            p.grad = q.grad.clone()
        o1.predict_()
        o1.step()  # restores first
        assert not o1.is_predicted
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_backward_after_the_block_fails_loudly():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2))
    _train(m, opt, 2)
    x, y = _batch(5)
    with opt.predicted():
        loss = nn.functional.cross_entropy(m(x), y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_steps_zero_wrapper_equals_bare_training_bitwise():
    m1, m2 = _model(), _model()
    o1 = PredictiveOptimizer(torch.optim.AdamW(m1.parameters(), lr=1e-2), steps=0)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    l1 = _train(m1, o1, 5)
    l2 = _train(m2, o2, 5, predicted=False)
    assert all(torch.equal(a, b) for a, b in zip(l1, l2))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_predict_on_a_fresh_optimizer_returns_current_values():
    m = _model()
    opt = torch.optim.Adam(m.parameters())
    out = predict(opt, 4)
    for p in m.parameters():
        assert torch.equal(out[p], p) and not out[p].requires_grad
    assert len(opt.state) == 0  # no state created by looking


def test_observed_rule_records_only_params_with_gradients():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = PredictiveOptimizer(torch.optim.SGD([a, b], lr=0.5), steps=1)
    a.grad = torch.full((3,), 2.0)
    opt.step()
    assert torch.equal(opt.state[a][OBSERVED_KEY], torch.full((3,), 2.0))
    assert OBSERVED_KEY not in opt.state.get(b, {})
    assert torch.equal(predict(opt, 2)[a], a.detach() - 2 * 0.5 * 2.0)


# ------------------------------------------------------------------ optimizer protocol
def test_step_hooks_fire_once_per_step_and_global_hooks_once():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    h = register_optimizer_step_post_hook(
        lambda o, a, k: calls.append("global"))
    try:
        _train(m, opt, 2)
    finally:
        h.remove()
    assert calls == ["pre", "post", "global"] * 2


def test_state_dict_hooks_registered_on_the_wrapper_fire():
    opt = PredictiveOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(len(sd["param_groups"])))
    opt.state_dict()
    assert seen == [1]


def test_checkpoints_interchange_with_the_bare_optimizer_and_resume_bitwise():
    m_ref = _model()
    ref = PredictiveOptimizer(torch.optim.Adam(m_ref.parameters(), lr=1e-2), steps=2)
    _train(m_ref, ref, 6)

    m = _model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2), steps=2)
    _train(m, opt, 3)
    ckpt = pickle.loads(pickle.dumps((m.state_dict(), opt.state_dict())))
    # wrapper checkpoint -> bare optimizer -> wrapper again
    m2 = _model(1)
    m2.load_state_dict(ckpt[0])
    bare = torch.optim.Adam(m2.parameters(), lr=1e-2)
    bare.load_state_dict(ckpt[1])
    resumed = PredictiveOptimizer(torch.optim.Adam(m2.parameters(), lr=1e-2), steps=2)
    resumed.load_state_dict(bare.state_dict())
    _train(m2, resumed, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(m_ref.parameters(), m2.parameters()))


def test_observed_state_survives_a_checkpoint():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), steps=2)
    _train(m, opt, 3)
    before = predict(opt, 2)
    opt2 = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), steps=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    after = predict(opt2, 2)
    assert all(torch.equal(before[p], after[p]) for p in m.parameters())


def test_pickle_and_deepcopy_round_trip():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), steps=2)
    torch.optim.lr_scheduler.StepLR(opt, 1)  # patches opt.step on the instance
    _train(m, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, PredictiveOptimizer)
        assert clone.steps == 2 and type(clone.rule) is type(opt.rule)
        assert clone.param_groups is clone.optimizer.param_groups
        sd, sd2 = opt.state_dict(), clone.state_dict()
        assert sd["param_groups"] == sd2["param_groups"]
    with opt.predicted():
        with pytest.raises(RuntimeError, match="while predicted"):
            copy.deepcopy(opt)


def test_add_param_group_and_zero_grad_delegate():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.SGD(m[0].parameters(), lr=0.1))
    opt.add_param_group({"params": m[2].parameters(), "lr": 0.01})
    assert len(opt.optimizer.param_groups) == 2
    _train(m, opt, 1, predicted=False)
    assert all(p.grad is None for p in m.parameters())


def test_unknown_optimizer_gets_the_generic_rule_with_one_warning():
    class MySGD(torch.optim.Optimizer):
        def __init__(self, params, lr=0.1):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-g["lr"])

    with pytest.warns(UserWarning, match="no prediction rule for MySGD"):
        PredictiveOptimizer(MySGD(_model().parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = PredictiveOptimizer(MySGD(_model().parameters()))
    assert isinstance(opt.rule, ObservedUpdateRule)
    check_rule(lambda ps: MySGD(ps, lr=0.01), constant_gradient=True)


def test_register_rule_for_a_third_party_optimizer():
    class Signum(torch.optim.SGD):
        pass

    class SignRule(PredictionRule):
        name = "sign-momentum"

        def directions(self, group, params, states):
            ps = [p for p, st in zip(params, states) if st.get("momentum_buffer") is not None]
            bufs = [st["momentum_buffer"] for st in states if st.get("momentum_buffer") is not None]
            return ps, [b.sign() for b in bufs]

    predictopt.register_rule("sign-momentum-test", SignRule(), optimizers=[Signum])
    with pytest.raises(ValueError, match="registered already"):
        predictopt.register_rule("sign-momentum-test", SignRule())
    opt = PredictiveOptimizer(Signum(_model().parameters(), lr=0.1, momentum=0.9))
    assert isinstance(opt.rule, SignRule)
    assert "sign-momentum-test" in predictopt.available_rules()
    check_rule(lambda ps: Signum(ps, lr=0.01, momentum=0.9))


# ------------------------------------------------------------------ LR schedulers and AMP
def _scheduler(name, opt):
    S = torch.optim.lr_scheduler
    return {
        "step": lambda: S.StepLR(opt, step_size=1, gamma=0.5),
        "lambda": lambda: S.LambdaLR(opt, lambda e: 1.0 / (e + 1)),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=0.1, total_steps=20),
        "plateau": lambda: S.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    }[name]()


@pytest.mark.parametrize("name", ["step", "lambda", "onecycle", "plateau"])
def test_lr_schedulers_reach_the_wrapped_optimizer_also_after_load(name):
    def run(opt, sched, n):
        for _ in range(n):
            if isinstance(opt, PredictiveOptimizer):
                with opt.predicted():
                    pass
            opt.step()
            sched.step(1.0) if name == "plateau" else sched.step()

    m1, m2 = _model(), _model()
    o1 = PredictiveOptimizer(torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9))
    s1 = _scheduler(name, o1)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s2 = _scheduler(name, o2)
    run(o1, s1, 3)
    run(o2, s2, 3)
    assert o1.optimizer.param_groups[0]["lr"] == o2.param_groups[0]["lr"] != 0.1
    o1.load_state_dict(copy.deepcopy(o1.state_dict()))
    run(o1, s1, 2)
    run(o2, s2, 2)
    assert o1.optimizer.param_groups[0]["lr"] == o2.param_groups[0]["lr"]


def test_grad_scaler_steps_and_a_skipped_step_changes_nothing():
    m = _model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for t in range(2):
        x, y = _batch(t)
        with opt.predicted():
            scaler.scale(nn.functional.cross_entropy(m(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    w, sd = _weights(m), copy.deepcopy(opt.state_dict())
    for p in m.parameters():
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))
    new = opt.state_dict()["state"]
    for k, st in sd["state"].items():
        assert torch.equal(st[OBSERVED_KEY], new[k][OBSERVED_KEY])
    assert scaler.get_scale() == 2.0
