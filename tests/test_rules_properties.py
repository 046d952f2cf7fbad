"""The shared property suite: every optimizer in the catalogue through the same checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt import testing
from tests._hyp import props
from tests.catalog import MATRIX_ONLY, OPTIMIZERS

warnings.filterwarnings("ignore", message="predictopt has no prediction rule")

PROPS = props(6)


def shapes_for(name):
    """The shapes strategy for an optimizer of the catalogue (matrices only for Muon)."""
    if name in MATRIX_ONLY:
        return testing.shapes(min_dims=2, max_dims=2)
    return testing.shapes()


def _shapes(draw, name):
    return draw(shapes_for(name))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@PROPS
@given(data=st.data(), dtype=testing.dtypes(), lr=testing.learning_rates(),
       steps=st.integers(1, 6), seed=st.integers(0, 2**16), calibrate=st.booleans())
def test_restore_and_purity(name, data, dtype, lr, steps, seed, calibrate):
    factory, _ = OPTIMIZERS[name]
    shapes = _shapes(data.draw, name)
    make = lambda ps: factory(ps, lr)  # noqa: E731
    kw = {"steps": steps, "calibrate": calibrate}
    testing.check_restore_exact(make, testing.make_params(shapes, dtype, seed), **kw)
    testing.check_predict_is_pure(make, testing.make_params(shapes, dtype, seed), **kw)
    testing.check_after_zero_grad(make, testing.make_params(shapes, dtype, seed), **kw)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@PROPS
@given(data=st.data(), dtype=testing.dtypes(), lr=testing.learning_rates(),
       seed=st.integers(0, 2**16))
def test_steps_zero_is_the_bare_optimizer(name, data, dtype, lr, seed):
    factory, _ = OPTIMIZERS[name]
    testing.check_steps_zero_identity(lambda ps: factory(ps, lr),
                                      testing.make_params(_shapes(data.draw, name), dtype, seed))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@PROPS
@given(data=st.data(), lr=testing.learning_rates(1e-4, 1e-2), seed=st.integers(0, 2**16),
       calibrate=st.booleans())
def test_prediction_points_the_way_of_the_next_update(name, data, lr, seed, calibrate):
    factory, _ = OPTIMIZERS[name]
    testing.check_direction(lambda ps: factory(ps, lr),
                            testing.make_params(_shapes(data.draw, name), torch.float64, seed),
                            calibrate=calibrate)


EXACT = sorted(n for n, (_, exact) in OPTIMIZERS.items() if exact)


@pytest.mark.parametrize("name", EXACT)
@PROPS
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]),
       lr=testing.learning_rates(), steps=st.integers(1, 8), warmup=st.integers(1, 5),
       seed=st.integers(0, 2**16), calibrate=st.booleans())
def test_constant_gradient_is_exact(name, data, dtype, lr, steps, warmup, seed, calibrate):
    factory, _ = OPTIMIZERS[name]
    testing.check_constant_gradient_exact(lambda ps: factory(ps, lr),
                                          testing.make_params(_shapes(data.draw, name), dtype,
                                                              seed),
                                          steps=steps, warmup=warmup, calibrate=calibrate)


def test_exactness_claims_of_the_catalogue():
    """The optimizers stated exact under a constant gradient (``tests/catalog.py``)."""
    assert EXACT == sorted(["sgd", "sgd-plain-maximize", "adam", "adam-amsgrad", "adam-maximize",
                            "adamw", "adamw-amsgrad", "adamax", "adamax-maximize", "adafactor",
                            "adafactor-wd", "adafactor-maximize", "adafactor-foreach",
                            "muon-sgd"])


@pytest.mark.parametrize("name", ["radam", "radam-decoupled", "nadam", "nadam-decoupled",
                                  "nadam-maximize"])
@PROPS
@given(shapes=testing.shapes(), dtype=st.sampled_from([torch.float32, torch.float64]),
       lr=testing.learning_rates(), warmup=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_step_dependent_rules_are_exact_for_one_step(name, shapes, dtype, lr, warmup, seed):
    """RAdam's and NAdam's updates change with the step count; their rules predict the *next*
    update's (RAdam: regime and rectification, also at t = 5 -> 6 where it turns adaptive;
    NAdam: mu_{t+1}, mu_{t+2}, the momentum product): the one-step prediction is exact under a
    constant gradient."""
    factory, _ = OPTIMIZERS[name]
    testing.check_constant_gradient_exact(lambda ps: factory(ps, lr),
                                          testing.make_params(shapes, dtype, seed),
                                          steps=1, warmup=warmup)


def test_radam_regime_switch_is_covered():
    """The case CI once drew (last update momentum SGD, next one rectified; decay and gradient
    nearly cancel): pinned so the example is always run."""
    factory, _ = OPTIMIZERS["radam-decoupled"]
    testing.check_constant_gradient_exact(lambda ps: factory(ps, 0.0078125),
                                          testing.make_params([(4, 5), ()], torch.float64, 9033),
                                          steps=1, warmup=5)
    testing.check_direction(lambda ps: factory(ps, 0.0078125),
                            testing.make_params([(4, 5), ()], torch.float64, 9033))


@pytest.mark.parametrize("name", ["adam", "adamax", "adam-amsgrad"])
@PROPS
@given(steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_observed_rule_exact_when_updates_are_constant(name, steps, seed):
    """The generic rule is exact for any optimizer whose update is constant."""
    factory, _ = OPTIMIZERS[name]
    testing.check_constant_gradient_exact(lambda ps: factory(ps, 1e-2),
                                          testing.make_params([(4, 3), (2,)], seed=seed),
                                          steps=steps, rule="observed")


def test_constant_gradient_check_can_fail():
    """The exactness check rejects a rule that is not exact (momentum SGD drifts)."""
    factory, _ = OPTIMIZERS["sgd-momentum"]
    with pytest.raises(AssertionError, match="constant gradient"):
        testing.check_constant_gradient_exact(lambda ps: factory(ps, 0.1),
                                              testing.make_params([(5,)]), steps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_rule_runs_whole_suite(dtype):
    testing.check_rule(lambda ps: torch.optim.AdamW(ps, lr=1e-2), dtype=dtype,
                       constant_gradient=dtype != torch.bfloat16)


def test_several_param_groups_use_their_own_hyperparameters():
    ps = testing.make_params([(3,), (4,)])
    opt = torch.optim.Adam([{"params": [ps[0]], "lr": 0.1}, {"params": [ps[1]], "lr": 0.01}])
    testing.run_updates(opt, ps, 3)
    from predictopt import predict

    pred = predict(opt, 2)
    for p, lr in zip(ps, (0.1, 0.01)):
        st_ = opt.state[p]
        t = st_["step"].item()
        denom = st_["exp_avg_sq"].sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8
        expected = p.detach() - 2 * lr * (st_["exp_avg"] / (1 - 0.9**t)) / denom
        torch.testing.assert_close(pred[p], expected, rtol=1e-6, atol=1e-7)
