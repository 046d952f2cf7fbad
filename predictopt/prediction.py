r"""The prediction engine: applies a rule's directions to the weights with ``_foreach`` kernels.

For every parameter group, split by device and dtype, the rule (see `predictopt.rules`)
returns directions $D$ per unit learning rate; the engine forms

$$
\hat w = a\,w - C\,D
$$

with $a$ and $C$ from the future learning rates $\eta_1..\eta_s$ and the
decoupled decay $\lambda$ (`coefficients`). `predict` returns new tensors and
changes nothing; `predict_` writes the prediction into the parameters and returns the saved
real values, which `restore_` copies back bit for bit (never "adding the step back":
``w - x + x != w`` in floating point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .rules import PredictionRule, Quotient, _check_steps, _value, get_rule

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import PredictiveOptimizer

__all__ = ["coefficients", "predict", "predict_", "restore_"]

# One entry per (group, device, dtype) bucket: parameters, directions, a, C.
Plan = list[tuple[list[Tensor], "list[Tensor] | Quotient", float, float]]


def coefficients(lrs: Sequence[float], decay: float = 0.0) -> tuple[float, float]:
    r"""The coefficients $(a, C)$ of $\hat w = a w - C D$ for the given future lrs.

    Each future update is $w \leftarrow (1-\eta_j\lambda) w - \eta_j D$, so
    $a = \prod_j (1-\eta_j\lambda)$ and $C_j = (1-\eta_j\lambda) C_{j-1} + \eta_j$.
    With equal learning rates and $\lambda = 0$, $a = 1$ and $C = s\eta$
    exactly (computed as one product, not a sum of ``s`` terms).

    Args:
        lrs: The learning rates of the ``s`` future updates.
        decay: The decoupled weight decay $\lambda$.
    """
    lrs = [float(x) for x in lrs]
    if not lrs:
        return 1.0, 0.0
    if decay == 0.0 and all(x == lrs[0] for x in lrs):
        return 1.0, len(lrs) * lrs[0]
    a, c = 1.0, 0.0
    for lr in lrs:
        f = 1.0 - lr * decay
        a, c = a * f, c * f + lr
    return a, c


def _unwrap(optimizer: Any, rule: Any) -> tuple[Optimizer, PredictionRule]:
    inner = getattr(optimizer, "_predictopt_inner", None)
    if inner is not None:
        return inner, (optimizer.rule if rule is None else get_rule(rule, inner))
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or a PredictiveOptimizer, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer, get_rule(rule, optimizer)


def plan(optimizer: Optimizer, rule: PredictionRule, steps: int,
         lrs: Sequence[Sequence[float]] | None = None, scales: Sequence[float] | None = None
         ) -> Plan:
    """The work of one prediction: per group and (device, dtype), params, directions, a and C.

    Args:
        optimizer: The bare optimizer whose state the rule reads.
        rule: The rule.
        steps: The horizon ``s``.
        lrs: Per group, the ``s`` future learning rates (default: ``s`` times the current lr).
        scales: Per group, a factor applied to ``C`` (calibrated prediction); default 1.
    """
    out: Plan = []
    if steps == 0:
        return out
    for gi, group in enumerate(optimizer.param_groups):
        params = group["params"]
        group_lrs = lrs[gi] if lrs is not None else [_value(group["lr"])] * steps
        a, c = coefficients(group_lrs, rule.decoupled_decay(group))
        if scales is not None:
            c *= scales[gi]
        if c == 0.0 and a == 1.0:
            continue
        grouped = _group_tensors_by_device_and_dtype([params])
        for (_device, _dtype), ((ps,), _idx) in grouped.items():
            states = [optimizer.state.get(p, {}) for p in ps]
            ps_d, ds = rule.directions(group, ps, states)
            if ps_d:
                out.append((ps_d, ds, a, c))
    return out


@torch.no_grad()
def predict(optimizer: Optimizer | PredictiveOptimizer, steps: int, *,
            rule: str | PredictionRule | None = None,
            lrs: Sequence[Sequence[float]] | None = None) -> dict[Tensor, Tensor]:
    r"""The predicted value of every parameter, $\hat w(s)$, changing nothing.

    Args:
        optimizer: A bare ``torch.optim.Optimizer`` or a `PredictiveOptimizer` (whose
            rule is then used unless ``rule`` is given).
        steps: The horizon ``s >= 0``.
        rule: A rule name or object; default: the wrapper's rule, else the optimizer's default.
        lrs: Per parameter group, the ``s`` future learning rates (schedule-aware prediction).

    Returns:
        A dict from each parameter to a tensor without autograd history: a new tensor holding
        $\hat w$ where the rule has a direction, else ``p.detach()`` (the current value,
        sharing storage). Feed it to `torch.func.functional_call`.
    """
    steps = _check_steps(steps)
    inner, rule_obj = _unwrap(optimizer, rule)
    if lrs is not None:
        _check_group_lrs(lrs, inner, steps)
    elif inner is not optimizer:
        lrs = optimizer._future_lrs(steps)
    result: dict[Tensor, Tensor] = {
        p: p.detach() for g in inner.param_groups for p in g["params"]
    }
    scales = getattr(optimizer, "_calibration_scales", lambda: None)()
    for ps, ds, a, c in plan(inner, rule_obj, steps, lrs, scales):
        out = _copy(ps)
        _apply_(out, ds, a, c)
        result.update(zip(ps, out))
    return result


def _apply_(targets: list[Tensor], ds: list[Tensor] | Quotient, a: float, c: float) -> None:
    # The one place the prediction is computed, in place on ``targets`` (the parameters, or an
    # exact copy of them for predict()), so predict() and predict_() agree bit for bit: torch's
    # in-place and out-of-place foreach kernels round differently in low precision.
    if a != 1.0:
        torch._foreach_mul_(targets, a)
    if isinstance(ds, Quotient):
        torch._foreach_addcdiv_(targets, ds.numerators, ds.denominators,
                                [-c / q for q in ds.divisors])
    else:
        torch._foreach_add_(targets, ds, alpha=-c)


def _copy(ps: list[Tensor]) -> list[Tensor]:
    return torch._foreach_mul(ps, 1.0)  # exact copy (x * 1.0 == x bit for bit), one kernel


@torch.no_grad()
def predict_(optimizer: Optimizer, rule: PredictionRule, steps: int,
             lrs: Sequence[Sequence[float]] | None = None,
             scales: Sequence[float] | None = None) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Write the prediction into the parameters in place; return ``(params, saved)`` pairs.

    Holds one copy of the predicted parameters (the saved real values) until `restore_`;
    while computing, a rule may hold one more (Adam's denominators), freed on return.
    The in-place writes bump the parameters' version counters, so an autograd graph built on
    the predicted weights cannot silently be back-propagated after the restore.
    """
    saved = []
    for ps, ds, a, c in plan(optimizer, rule, steps, lrs, scales):
        real = _copy(ps)
        _apply_(ps, ds, a, c)
        saved.append((ps, real))
    return saved


@torch.no_grad()
def restore_(saved: list[tuple[list[Tensor], list[Tensor]]]) -> None:
    """Copy the saved real values back into the parameters, bit for bit."""
    for ps, real in saved:
        torch._foreach_copy_(ps, real)


def _check_group_lrs(lrs: Sequence[Sequence[float]], optimizer: Optimizer, steps: int) -> None:
    if len(lrs) != len(optimizer.param_groups) or any(len(x) != steps for x in lrs):
        raise ValueError(
            f"lrs must hold, for each of the {len(optimizer.param_groups)} parameter groups, "
            f"a sequence of {steps} learning rates (one per predicted step)"
        )
