"""Property checks for prediction rules, for users who register a rule of their own.

One call runs the whole suite on an optimizer factory::

    from predictopt.testing import check_rule
    check_rule(lambda params: MyOptimizer(params, lr=1e-2), rule="my-rule")

Each check raises ``AssertionError`` with a message saying what broke. The hypothesis strategies
(`shapes`, `dtypes`, `learning_rates`, `horizons`) draw the inputs the
project's own suite uses; hypothesis is imported only when they are called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .optimizer import PredictiveOptimizer
from .prediction import predict
from .rules import PredictionRule

__all__ = [
    "make_params",
    "run_updates",
    "check_restore_exact",
    "check_steps_zero_identity",
    "check_predict_is_pure",
    "check_after_zero_grad",
    "check_constant_gradient_exact",
    "check_direction",
    "check_rule",
    "shapes",
    "dtypes",
    "learning_rates",
    "horizons",
]

OptimizerFactory = Callable[[list[Tensor]], Optimizer]


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float32,
                seed: int = 0) -> list[Tensor]:
    """Leaf tensors requiring grad with the given shapes, drawn from a seeded normal."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for s in shapes]


def run_updates(opt: Optimizer, params: Sequence[Tensor], n: int, seed: int = 0,
                grad: Callable[[int, Tensor], Tensor] | None = None) -> None:
    """``n`` optimizer steps with seeded random gradients (or ``grad(step, param)``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(n):
        for p in params:
            g = (grad(t, p) if grad is not None else
                 torch.randn(p.shape, generator=gen, dtype=torch.float64))
            p.grad = g.to(p.dtype)
        opt.step()


def _clone(ts: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().clone() for t in ts]


def _state_snapshot(opt: Optimizer) -> list[dict[str, Any]]:
    return [
        {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in st.items()}
        for st in (opt.state.get(p, {}) for g in opt.param_groups for p in g["params"])
    ]


def _assert_equal_lists(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not torch.equal(x, y):
            raise AssertionError(f"{what}: tensor {i} differs (max abs diff "
                                 f"{(x.double() - y.double()).abs().max().item():.3e})")


def _assert_equal_states(a: list[dict], b: list[dict], what: str) -> None:
    if len(a) != len(b):
        raise AssertionError(f"{what}: number of states differs")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.keys() != y.keys():
            raise AssertionError(f"{what}: state {i} keys {sorted(x)} != {sorted(y)}")
        for k in x:
            if isinstance(x[k], Tensor):
                if not torch.equal(x[k], y[k]):
                    raise AssertionError(f"{what}: state {i}[{k!r}] differs")
            elif x[k] != y[k]:
                raise AssertionError(f"{what}: state {i}[{k!r}] {x[k]!r} != {y[k]!r}")


def check_restore_exact(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                        steps: int = 2, updates: int = 3, rule: str | PredictionRule | None = None,
                        calibrate: bool = True) -> None:
    """After ``predict_``/``restore_`` (and after a ``predicted()`` block that raised) the
    parameters are bit-for-bit the real ones, and gradients computed inside are kept."""
    opt = PredictiveOptimizer(make_optimizer(params), steps=steps, rule=rule, calibrate=calibrate)
    run_updates(opt, params, updates)
    real = _clone(params)
    opt.predict_()
    if not opt.is_predicted:
        raise AssertionError("is_predicted is False after predict_()")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.restore_()
    _assert_equal_lists(real, params, "restore_ after predict_")
    if not all(torch.equal(p.grad, torch.ones_like(p)) for p in params):
        raise AssertionError("gradients set while predicted were not kept")
    try:
        with opt.predicted():
            raise KeyError("boom")
    except KeyError:
        pass
    _assert_equal_lists(real, params, "restore after an exception inside predicted()")
    if opt.is_predicted:
        raise AssertionError("still predicted after leaving predicted()")


def check_steps_zero_identity(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                              updates: int = 5, rule: str | PredictionRule | None = None,
                              calibrate: bool = True) -> None:
    """A wrapper with ``steps=0`` follows the bare optimizer bit for bit (weights and state)."""
    twin = [p.detach().clone().requires_grad_() for p in params]
    wrapped = PredictiveOptimizer(make_optimizer(params), steps=0, rule=rule, calibrate=calibrate)
    bare = make_optimizer(twin)
    gen = torch.Generator().manual_seed(7)
    for _ in range(updates):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                 for p in params]
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with wrapped.predicted():
            pass
        wrapped.step()
        bare.step()
        _assert_equal_lists(params, twin, "steps=0 wrapper vs bare optimizer")
    _assert_equal_states(_state_snapshot(wrapped), _state_snapshot(bare), "steps=0 state")


def check_predict_is_pure(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                          steps: int = 3, updates: int = 3,
                          rule: str | PredictionRule | None = None,
                          calibrate: bool = True) -> None:
    """``predict()`` and a ``predicted()`` round trip change neither weights nor optimizer state,
    and ``predict()`` agrees bit for bit with the in-place prediction."""
    opt = PredictiveOptimizer(make_optimizer(params), steps=steps, rule=rule, calibrate=calibrate)
    run_updates(opt, params, updates)
    real, state = _clone(params), _state_snapshot(opt)
    out = predict(opt, steps)
    _assert_equal_lists(real, params, "predict() changed the weights")
    _assert_equal_states(state, _state_snapshot(opt), "predict() changed the optimizer state")
    with opt.predicted():
        _assert_equal_lists([out[p] for p in params], params, "predict() vs predicted()")
    _assert_equal_states(state, _state_snapshot(opt), "predicted() changed the optimizer state")
    zero = predict(opt, 0)
    _assert_equal_lists([zero[p] for p in params], params, "predict(steps=0) is not identity")


def check_after_zero_grad(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                          steps: int = 2, rule: str | PredictionRule | None = None,
                          calibrate: bool = True) -> None:
    """Prediction reads state, not ``.grad``: it is the same before and after
    ``zero_grad(set_to_none=True)``."""
    opt = PredictiveOptimizer(make_optimizer(params), steps=steps, rule=rule, calibrate=calibrate)
    run_updates(opt, params, 3)
    before = predict(opt, steps)
    opt.zero_grad(set_to_none=True)
    after = predict(opt, steps)
    _assert_equal_lists([before[p] for p in params], [after[p] for p in params],
                        "prediction changed after zero_grad(set_to_none=True)")


def check_constant_gradient_exact(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                                  steps: int = 3, warmup: int = 2, ulps: float = 16.0,
                                  rule: str | PredictionRule | None = None,
                                  calibrate: bool = True) -> None:
    """Under a constant gradient the prediction equals the weights ``steps`` updates later, up to
    rounding: at most ``ulps * (steps + 1)`` units of the dtype's epsilon times the magnitude
    (calibrated or not: with an exact rule the fitted gain is 1 up to rounding)."""
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    opt = PredictiveOptimizer(make_optimizer(params), steps=steps, rule=rule, calibrate=calibrate)
    const = lambda t, p: gs[next(i for i, q in enumerate(params) if q is p)]  # noqa: E731
    run_updates(opt, params, warmup, grad=const)
    pred = predict(opt, steps)
    pred = [pred[p].clone() for p in params]
    run_updates(opt, params, steps, grad=const)
    for i, (a, p) in enumerate(zip(pred, params)):
        scale = max(a.abs().max().item(), p.detach().abs().max().item(), 1.0)
        tol = ulps * (steps + 1) * torch.finfo(p.dtype).eps * scale
        err = (a.double() - p.detach().double()).abs().max().item()
        if err > tol:
            raise AssertionError(f"constant gradient: prediction {i} is off by {err:.3e} "
                                 f"(tolerance {tol:.3e}) after {steps} steps")


def check_rule(make_optimizer: OptimizerFactory, *, rule: str | PredictionRule | None = None,
               shapes: Sequence[tuple[int, ...]] = ((3, 4), (5,), (2, 2, 2)),
               dtype: torch.dtype = torch.float32, steps: int = 2,
               constant_gradient: bool = False, seed: int = 0) -> None:
    """Run every property check on fresh parameters (see the module docstring), on the
    uncalibrated rule (the formulas themselves) and, where it can differ, calibrated."""
    checks: list[Callable[..., None]] = [check_restore_exact, check_predict_is_pure,
                                         check_after_zero_grad]
    for calibrate in (False, True):
        for check in checks:
            check(make_optimizer, make_params(shapes, dtype, seed), steps=steps, rule=rule,
                  calibrate=calibrate)
        if dtype != torch.bfloat16:
            check_direction(make_optimizer, make_params(shapes, dtype, seed), rule=rule,
                            calibrate=calibrate)
        if constant_gradient:
            check_constant_gradient_exact(make_optimizer, make_params(shapes, dtype, seed),
                                          steps=steps, rule=rule, calibrate=calibrate)
    check_steps_zero_identity(make_optimizer, make_params(shapes, dtype, seed), rule=rule)


# --------------------------------------------------------------------------- strategies
def shapes(max_tensors: int = 4, max_dims: int = 3, max_side: int = 5, min_dims: int = 0) -> Any:
    """Hypothesis strategy: a list of tensor shapes with ``min_dims..max_dims`` dimensions
    (scalars included by default; ``min_dims=max_dims=2`` for matrix-only optimizers)."""
    from hypothesis import strategies as st

    shape = st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)
    return st.lists(shape, min_size=1, max_size=max_tensors)


def dtypes(include_bfloat16: bool = True) -> Any:
    """Hypothesis strategy: floating dtypes of parameters."""
    from hypothesis import strategies as st

    options = [torch.float32, torch.float64] + ([torch.bfloat16] if include_bfloat16 else [])
    return st.sampled_from(options)


def learning_rates(low: float = 1e-4, high: float = 1e-1) -> Any:
    """Hypothesis strategy: learning rates, log-uniform-ish in ``[low, high]``."""
    from hypothesis import strategies as st

    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def horizons(max_steps: int = 8) -> Any:
    """Hypothesis strategy: prediction horizons ``s`` in ``[0, max_steps]``."""
    from hypothesis import strategies as st

    return st.integers(0, max_steps)


def check_direction(make_optimizer: OptimizerFactory, params: list[Tensor], *,
                    warmup: int = 5, rule: str | PredictionRule | None = None,
                    calibrate: bool = True) -> None:
    """Under a constant gradient, the one-step prediction moves the weights the way the next real
    update does: positive inner product of predicted and actual displacement, for every tensor.
    Catches sign errors (e.g. ``maximize``) that the exactness checks cannot see for rules that
    are not exact."""
    gen = torch.Generator().manual_seed(11)
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    opt = PredictiveOptimizer(make_optimizer(params), steps=1, rule=rule, calibrate=calibrate)
    const = lambda t, p: gs[next(i for i, q in enumerate(params) if q is p)]  # noqa: E731
    run_updates(opt, params, warmup, grad=const)
    before = _clone(params)
    pred = predict(opt, 1)
    pred = [pred[p].clone() for p in params]
    run_updates(opt, params, 1, grad=const)
    for i, (a, b, p) in enumerate(zip(pred, before, params)):
        dot = ((a.double() - b.double()) * (p.detach().double() - b.double())).sum().item()
        if dot <= 0:
            raise AssertionError(f"prediction {i} points away from the real update (dot {dot:.3e})")
