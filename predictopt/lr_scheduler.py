r"""REX learning-rate schedule (Chen et al. 2021) with an optional linear warm-up.

REX ("Reflected EXponential") decays the learning rate from ``max_lr`` to ``min_lr`` as

$$
\eta(t) = \eta_{\min} + (\eta_{\max} - \eta_{\min}) \frac{1 - z}{1 - z/2},
\qquad z = t / T,
$$

where ``t`` counts optimizer updates since the end of the warm-up and ``T`` is the length of the
decay phase. It stays close to ``max_lr`` longer than a linear decay and drops faster at the end.

Two entry points are provided:

* `rex_lr`, a pure function that evaluates the schedule at any step. Code that needs the
  learning rates of *future* updates (for example a weight predictor spanning ``s`` updates, which
  should sum the next ``s`` learning rates rather than multiply the current one by ``s``) can call
  it without touching a scheduler.
* `REX`, a regular `torch.optim.lr_scheduler.LRScheduler` built on `rex_lr`,
  stepped once per optimizer update.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["REX", "rex_lr", "future_lrs"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}"
        )
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_lr_value(name: str, value: Any) -> float:
    """Return ``value`` as a finite, non-negative ``float`` (1-element tensors are accepted)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a float or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a finite float >= 0, got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return value


def _check_schedule(total_steps: Any, warmup_steps: Any) -> tuple[int, int]:
    """Validate ``total_steps`` (int >= 1) and ``warmup_steps`` (int, 0 <= . < total_steps)."""
    total_steps = _check_int("total_steps", total_steps, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps must satisfy 0 <= warmup_steps < total_steps={total_steps}, "
            f"got {warmup_steps}"
        )
    return total_steps, warmup_steps


def rex_lr(
    step: int,
    total_steps: int,
    max_lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
) -> float:
    r"""Evaluate the REX schedule (with linear warm-up) at a given step.

    ``step`` is the 0-based index of an optimizer update: the value returned is the learning
    rate that update uses (``REX`` sets it after ``step`` calls of ``scheduler.step()``). With
    ``W = warmup_steps`` and ``T = total_steps - W``:

    $$
    \eta(\text{step}) =
    \begin{cases}
    \eta_{\max} \cdot \dfrac{\text{step} + 1}{W}
    & 0 \le \text{step} < W \quad\text{(warm-up)} \\[2ex]
    \eta_{\min} + (\eta_{\max} - \eta_{\min}) \dfrac{1 - z}{1 - z/2},
    \; z = \dfrac{\text{step} - W}{T}
    & W \le \text{step} \le \text{total\_steps} \\[2ex]
    \eta_{\min} & \text{step} \ge \text{total\_steps}
    \end{cases}
    $$

    Warm-up therefore starts at ``max_lr / W`` on the first update (never at 0, which would
    waste an update) and reaches ``max_lr`` exactly on update ``W - 1``; the decay phase starts
    at ``max_lr`` again on update ``W`` (``z = 0``), so ``max_lr`` is used twice when
    ``W > 0``. The warm-up ramps from 0 regardless of ``min_lr``. The value at
    ``step == total_steps`` is ``min_lr`` (``z = 1``): after ``total_steps`` updates and as many
    scheduler steps the optimizer is left at ``min_lr``, while the last update of a run of
    exactly ``total_steps`` updates uses ``rex_lr(total_steps - 1)``, which is above ``min_lr``
    (the same convention as `torch.optim.lr_scheduler.PolynomialLR`).

    Numerics: the decay factor is computed as ``2 (T - t) / (2T - t)`` (same value as
    ``(1 - z) / (1 - z/2)``) from exact integers, so it is a single correctly rounded division;
    the result is then non-increasing in ``step`` in floating point, exactly ``max_lr`` at
    ``z = 0``, exactly ``min_lr`` at ``z >= 1``, and clamped to ``[min_lr, max_lr]``.

    Args:
        step: 0-based index of the optimizer update (int >= 0).
        total_steps: total number of updates of the schedule, warm-up included (int >= 1).
        max_lr: peak learning rate (float >= 0; a 1-element tensor is accepted).
        min_lr: final learning rate, ``0 <= min_lr <= max_lr``.
        warmup_steps: number of linear warm-up updates, ``0 <= warmup_steps < total_steps``.

    Returns:
        The learning rate of update ``step`` as a Python float.

    Raises:
        TypeError: if an integer argument is not an int or a rate is not a real number.
        ValueError: if an argument is out of its accepted range.
    """
    step = _check_int("step", step, 0)
    total_steps, warmup_steps = _check_schedule(total_steps, warmup_steps)
    max_lr = _check_lr_value("max_lr", max_lr)
    min_lr = _check_lr_value("min_lr", min_lr)
    if min_lr > max_lr:
        raise ValueError(f"min_lr must satisfy 0 <= min_lr <= max_lr={max_lr}, got {min_lr}")
    return _rex_unchecked(step, total_steps, max_lr, min_lr, warmup_steps)


def _rex_unchecked(
    step: int, total_steps: int, max_lr: float, min_lr: float, warmup_steps: int
) -> float:
    """The math of `rex_lr`, without argument validation."""
    if step < warmup_steps:
        # (step + 1) / W is exactly 1.0 at step = W - 1, so the ramp ends exactly on max_lr.
        return max_lr * ((step + 1) / warmup_steps)
    t = step - warmup_steps
    horizon = total_steps - warmup_steps
    if t <= 0:
        return max_lr
    if t >= horizon:
        return min_lr
    factor = (2 * (horizon - t)) / (2 * horizon - t)
    lr = min_lr + (max_lr - min_lr) * factor
    return min(max_lr, max(min_lr, lr))


class REX(LRScheduler):
    r"""REX learning-rate scheduler with optional linear warm-up, stepped once per update.

    For every parameter group, with ``max_lr`` the group's ``initial_lr`` (its ``lr`` when the
    scheduler is created) and ``step`` the number of ``scheduler.step()`` calls so far
    (`last_epoch`), the group's learning rate is
    ``rex_lr(step, total_steps, max_lr, min_lr, warmup_steps)`` (see `rex_lr`):

    $$
    \eta = \eta_{\min} + (\eta_{\max} - \eta_{\min}) \frac{1 - z}{1 - z/2},
    \quad z = \frac{\text{step} - W}{\text{total\_steps} - W},
    $$

    after a linear warm-up ``eta_max * (step + 1) / W`` over the first ``W = warmup_steps``
    updates; it stays at ``min_lr`` once ``step >= total_steps``. Call ``scheduler.step()`` after
    every ``optimizer.step()``.

    The schedule is computed in closed form from `base_lrs` (changes made to
    ``group["lr"]`` by hand are overwritten at the next step), and `rex_lr_at` evaluates
    it at any future step without changing anything.

    Args:
        optimizer: wrapped optimizer.
        total_steps: total number of optimizer updates of the schedule, warm-up included
            (int >= 1).
        min_lr: final learning rate, a float or one per parameter group, each within
            ``[0, initial lr of its group]``. Default: 0.
        warmup_steps: number of linear warm-up updates, ``0 <= warmup_steps < total_steps``.
            Default: 0.
        last_epoch: index of the last step, ``-1`` to start a new schedule (default); only use
            another value when resuming, which requires ``initial_lr`` in every group.

    Raises:
        TypeError: if ``total_steps``, ``warmup_steps`` or ``last_epoch`` is not an int, or a
            ``min_lr`` is not a real number.
        ValueError: if an argument is out of range, or ``min_lr`` is a sequence whose length
            differs from the number of parameter groups. All checks run before the optimizer
            is touched.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sched = REX(opt, total_steps=1000, warmup_steps=50, min_lr=1e-4)
        >>> for batch in loader:
        ...     loss_fn(model(batch)).backward()
        ...     opt.step()
        ...     opt.zero_grad()
        ...     sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        *,
        min_lr: float | Sequence[float] = 0.0,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        total_steps, warmup_steps = _check_schedule(total_steps, warmup_steps)
        last_epoch = _check_int("last_epoch", last_epoch, -1)
        groups = optimizer.param_groups
        if isinstance(min_lr, Sequence) and not isinstance(min_lr, str):
            if len(min_lr) != len(groups):
                raise ValueError(
                    f"min_lr must be a float or a sequence with one value per parameter group "
                    f"({len(groups)}), got {len(min_lr)} values"
                )
            min_lrs = [_check_lr_value(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            min_lrs = [_check_lr_value("min_lr", min_lr)] * len(groups)
        for i, (group, lo) in enumerate(zip(groups, min_lrs, strict=True)):
            if last_epoch == -1:
                peak = group.get("initial_lr", group["lr"])
            elif "initial_lr" in group:
                peak = group["initial_lr"]
            else:
                continue  # LRScheduler.__init__ raises its KeyError before changing anything.
            peak = _check_lr_value(f"param_groups[{i}] initial lr", peak)
            if lo > peak:
                raise ValueError(
                    f"min_lr must satisfy 0 <= min_lr <= lr of its parameter group; "
                    f"param_groups[{i}] has lr={peak} but min_lr={lo}"
                )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lrs = min_lrs
        super().__init__(optimizer, last_epoch)

    def rex_lr_at(self, step: int) -> list[float]:
        """Return the learning rate of every parameter group at update ``step``.

        Pure: neither the scheduler nor the optimizer changes. ``rex_lr_at(self.last_epoch)``
        is the rate currently in effect; ``rex_lr_at(self.last_epoch + j)`` is the rate the
        ``j``-th update from now will use.

        Args:
            step: 0-based index of the optimizer update (int >= 0).

        Returns:
            One float per parameter group.
        """
        step = _check_int("step", step, 0)
        return [
            _rex_unchecked(step, self.total_steps, float(base), lo, self.warmup_steps)
            for base, lo in zip(self.base_lrs, self.min_lrs, strict=True)
        ]

    def _values(self) -> list[float | Tensor]:
        out: list[float | Tensor] = []
        step = max(self.last_epoch, 0)
        for group, base, lo in zip(
            self.optimizer.param_groups, self.base_lrs, self.min_lrs, strict=True
        ):
            value = _rex_unchecked(step, self.total_steps, float(base), lo, self.warmup_steps)
            current = group["lr"]
            if isinstance(current, Tensor):
                out.append(current.new_full(current.shape, value))
            else:
                out.append(value)
        return out

    def get_lr(self) -> list[float | Tensor]:
        """Return the learning rates for step `last_epoch` (closed form, see class doc).

        Returns:
            One learning rate per parameter group, of the same type as ``group["lr"]``.
        """
        return self._values()

    def _get_closed_form_lr(self) -> list[float | Tensor]:
        """Return the learning rates for step `last_epoch` from `base_lrs`.

        Returns:
            One learning rate per parameter group, of the same type as ``group["lr"]``.
        """
        return self._values()


class _ProxyOptimizer:
    """Stands in for an optimizer inside a copy of a scheduler: hyper-parameters only."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = groups
        self._opt_called = True

        def step(*_a: Any, **_k: Any) -> None:
            return None

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self.step = step


def future_lrs(scheduler: Any, steps: int) -> list[list[float]]:
    r"""The learning rates of the next ``steps`` updates under ``scheduler``, per parameter group.

    The next update uses the current ``lr``; each later one the ``lr`` after one more
    ``scheduler.step()`` (the usual one scheduler step per optimizer update). Computed on a deep
    copy of the scheduler whose optimizer is replaced by a stand-in holding deep copies of the
    hyper-parameters (also of a Tensor ``lr``, which schedulers update in place with ``fill_``),
    so neither the scheduler nor the optimizer changes. Schedulers that need a
    metric (``ReduceLROnPlateau``) cannot be looked ahead: the current ``lr`` is repeated.

    Returns:
        ``lrs[g][j]``: the learning rate of group ``g`` at the ``j``-th future update
        ($\eta_{j+1}$ in `predictopt.coefficients`).
    """
    import copy
    import warnings

    from torch.optim.lr_scheduler import ReduceLROnPlateau

    optimizer = scheduler.optimizer
    current = [float(g["lr"]) for g in optimizer.param_groups]
    if steps <= 0:
        return [[] for _ in current]
    if isinstance(scheduler, ReduceLROnPlateau):
        return [[lr] * steps for lr in current]
    # Deep copies of the hyper-parameters: a Tensor ``lr`` (or ``betas``) is ``fill_``-ed in place
    # by the scheduler's ``step()``, so sharing it would change the real optimizer's lr.
    groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
              for g in optimizer.param_groups]
    proxy = _ProxyOptimizer(groups)
    memo: dict[int, Any] = {id(optimizer): proxy}
    inner = getattr(optimizer, "_predictopt_inner", None)
    if inner is not None:
        memo[id(inner)] = proxy
    clone = copy.deepcopy(scheduler, memo)
    out = [[lr] for lr in current]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps - 1):
            clone.step()
            for row, g in zip(out, proxy.param_groups):
                row.append(float(g["lr"]))
    return out
