r"""Spike Compensation for momentum SGD with delayed gradients (Kosson et al. 2021).

In a pipelined (asynchronous) run, the gradient a stage applies at update ``t`` was computed on
weights ``D`` updates old: it *arrives* ``D`` updates late. With plain momentum SGD

$$
v_t = m v_{t-1} + g_t, \qquad w_{t+1} = w_t - \eta v_t,
$$

a gradient that arrives ``D`` updates late misses the ``D`` momentum-decayed contributions
``1 + m + ... + m^{D-1}`` that it would already have made, and then keeps contributing
``m^j`` instead of ``m^{D+j}``. Spike Compensation ("Pipelined Backpropagation at Scale",
Kosson et al., 2021) fixes both with two coefficients, applying a *spike* of the missed amount at
arrival and scaling the velocity so that the tail matches:

$$
w_{t+1} = w_t - \eta\,(a\,v_t + b\,g_t), \qquad
a = m^D, \qquad b = \frac{1 - m^D}{1 - m} = \sum_{i=0}^{D-1} m^i.
$$

Why these coefficients (one gradient ``g`` arriving at update ``t``, all others zero): at arrival
``v_t`` contains ``g`` once, so the update is ``eta (a + b) g = eta (1 - m^{D+1}) / (1 - m) g =
eta (1 + m + ... + m^D) g``, the total undelayed momentum SGD would have applied over the ``D + 1``
updates from the gradient's computation to its arrival. ``j`` updates later ``v_{t+j}`` holds
``m^j g`` and ``g_{t+j}`` is zero, so the update is ``eta m^{D+j} g``, exactly the undelayed
update ``D + j`` steps after the gradient. From arrival on, the cumulative displacement equals
that of undelayed momentum SGD; only the timing of the first ``D`` contributions differs.

This module provides `spike_coefficients` and `SpikeCompensatedSGD`, a
`torch.optim.SGD` subclass with a per-group ``delay``. Linear Weight Prediction (forward on
``w_t - eta D v_t``) is the matching predictor and is not part of this module.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer

try:  # private helper; used only to choose the default implementation like torch.optim.SGD.
    from torch.optim.optimizer import _default_to_fused_or_foreach
except ImportError:  # pragma: no cover - older/newer torch without the helper
    _default_to_fused_or_foreach = None

__all__ = ["SpikeCompensatedSGD", "spike_coefficients"]

ParamsT = Any  # an iterable of tensors, of (name, tensor) pairs, or of param-group dicts


def _check_momentum(momentum: Any, where: str = "momentum") -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"{where} must be a float in [0, 1), got {momentum!r} of type {type(momentum).__name__}"
        )
    momentum = float(momentum)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where} must be a float in [0, 1), got {momentum!r}")
    return momentum


def _check_delay(delay: Any, where: str = "delay") -> int:
    if isinstance(delay, bool) or not isinstance(delay, numbers.Integral):
        raise TypeError(
            f"{where} must be an int >= 0, got {delay!r} of type {type(delay).__name__}"
        )
    delay = operator.index(delay)
    if delay < 0:
        raise ValueError(f"{where} must be an int >= 0, got {delay}")
    return delay


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    r"""Return the Spike Compensation coefficients ``(a, b)`` for momentum ``m`` and delay ``D``.

    $$
    a = m^D, \qquad b = \frac{1 - m^D}{1 - m} = \sum_{i=0}^{D-1} m^i,
    $$

    so that the update ``eta (a v_t + b g_t)`` gives a gradient delayed by ``D`` updates the
    contribution ``eta (1 - m^{D+1}) / (1 - m)`` at arrival and ``eta m^{D+j}`` ``j`` updates
    later (see the module docstring). ``D = 0`` gives ``(1.0, 0.0)``, plain momentum SGD;
    ``m = 0`` gives ``(1.0, 0.0)`` for ``D = 0`` and ``(0.0, 1.0)`` otherwise, plain SGD either
    way (``v_t = g_t``).

    Args:
        momentum: momentum factor ``m`` in ``[0, 1)``.
        delay: gradient delay ``D`` in updates, an int >= 0.

    Returns:
        ``(a, b)`` as Python floats.

    Raises:
        TypeError: if ``momentum`` is not a real number or ``delay`` not an int.
        ValueError: if ``momentum`` is outside ``[0, 1)`` or ``delay`` is negative.
    """
    m = _check_momentum(momentum)
    d = _check_delay(delay)
    if d == 0:
        return 1.0, 0.0
    a = m**d
    return a, (1.0 - a) / (1.0 - m)


def _check_lr_like(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float >= 0 or a 1-element tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float >= 0, got {value!r} of type {type(value).__name__}"
        )
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")


def _check_group(group: dict[str, Any], where: str, impl_flags: bool = True) -> None:
    """Validate the options of one parameter group (raises before anything is changed).

    ``impl_flags=False`` skips ``fused`` / ``differentiable``, which only select an
    implementation and are reset when a saved state is loaded.
    """
    if "lr" in group:
        _check_lr_like(f"{where}lr", group["lr"])
    if "weight_decay" in group:
        _check_lr_like(f"{where}weight_decay", group["weight_decay"])
    if "momentum" in group:
        _check_momentum(group["momentum"], f"{where}momentum")
    if "delay" in group:
        _check_delay(group["delay"], f"{where}delay")
    if group.get("dampening", 0) != 0:
        raise ValueError(
            f"{where}dampening must be 0 (Spike Compensation assumes v_t = m v_(t-1) + g_t), "
            f"got {group['dampening']!r}"
        )
    if group.get("nesterov", False):
        raise ValueError(f"{where}nesterov must be False (not supported with Spike Compensation)")
    if not impl_flags:
        return
    if group.get("fused"):
        raise ValueError(f"{where}fused must be None or False (no fused kernel exists)")
    if group.get("differentiable", False):
        raise ValueError(f"{where}differentiable must be False (not supported)")


class SpikeCompensatedSGD(SGD):
    r"""Momentum SGD with Spike Compensation for gradients delayed by ``delay`` updates.

    For each parameter group with momentum ``m``, delay ``D``, learning rate ``eta`` and L2
    weight decay ``lambda``:

    $$
    g_t &\leftarrow \pm\nabla f(w_t) + \lambda w_t \quad(\text{minus if maximize}) \\
    v_t &\leftarrow m v_{t-1} + g_t \quad(v_1 = g_1) \\
    w_{t+1} &\leftarrow w_t - \eta\,(a v_t + b g_t), \quad
    a = m^D,\; b = \frac{1 - m^D}{1 - m}.
    $$

    The delayed gradient thereby contributes ``eta (1 - m^{D+1}) / (1 - m)`` at arrival (the
    total that undelayed momentum SGD would have applied over the ``D + 1`` updates since it was
    computed) and ``eta m^{D+j}`` ``j`` updates later (what undelayed momentum SGD applies then),
    see `spike_coefficients` and the module docstring.

    It is a `torch.optim.SGD` subclass: the velocity is stored as
    ``state[p]["momentum_buffer"]`` exactly as SGD does, parameter groups carry SGD's keys
    (``dampening`` = 0, ``nesterov`` = False) plus ``delay``, and a state dict loads into
    `torch.optim.SGD` (and vice versa; a loaded group without ``delay`` gets the default).
    With ``delay = 0`` (or ``momentum = 0``) the step is bit-for-bit that of
    ``torch.optim.SGD(momentum=m, nesterov=False, dampening=0)`` with the same ``foreach``.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of parameter-group
            dicts; a group may set ``lr``, ``momentum``, ``delay``, ``weight_decay``,
            ``maximize``, ``foreach``.
        lr: learning rate ``eta`` (float >= 0 or 1-element tensor).
        momentum: momentum factor ``m`` in ``[0, 1)``. Default: 0.9.
        delay: gradient delay ``D`` (int >= 0) of the stage these parameters belong to, usually
            set per parameter group. Default: 0.
        weight_decay: L2 penalty ``lambda`` added to the gradient (float >= 0). Default: 0.
        dampening: must be 0; accepted only so that SGD-style call sites keep working.
        nesterov: must be False; accepted for the same reason.
        maximize: maximize the objective instead of minimizing it. Default: False.
        foreach: use the multi-tensor ``torch._foreach_*`` implementation. ``None`` (default)
            picks it as `torch.optim.SGD` does (when all parameters are on a device with
            foreach kernels, e.g. CUDA); ``False`` uses a per-parameter loop.

    Raises:
        TypeError: if an option has the wrong type (``delay`` not an int, ...).
        ValueError: if an option is out of range: ``lr`` or ``weight_decay`` < 0, ``momentum``
            outside ``[0, 1)``, ``delay`` < 0, ``dampening`` != 0 or ``nesterov`` set. Raised
            before anything is changed, also by `add_param_group` and
            `load_state_dict`.
        RuntimeError: from `step` on sparse gradients.

    Example:
        >>> groups = [{"params": stage.parameters(), "delay": 2 * (n_stages - 1 - k)}
        ...           for k, stage in enumerate(stages)]
        >>> opt = SpikeCompensatedSGD(groups, lr=0.1, momentum=0.9)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0.9,
        delay: int = 0,
        *,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": False,
            "fused": None,
            "delay": delay,
        }
        _check_group(defaults, "")
        # SGD.__init__ builds its own defaults without ``delay``; initialise the Optimizer base
        # directly with the complete SGD-compatible defaults.
        Optimizer.__init__(self, params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after validating its options (see the class docstring).

        Args:
            param_group: the group's parameters and options; missing options take the
                defaults given to the constructor.

        Raises:
            TypeError, ValueError: on an invalid option, before the group is added.
        """
        if isinstance(param_group, dict):
            _check_group(param_group, f"param_groups[{len(self.param_groups)}] ")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        default_delay = self.defaults.get("delay", 0)
        for group in self.param_groups:
            group.setdefault("delay", default_delay)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state (also one saved by `torch.optim.SGD`).

        Groups without ``delay`` get the constructor's default, and the implementation flags
        ``fused`` / ``differentiable`` of a saved `torch.optim.SGD` are reset to
        ``None`` / ``False``. Groups are validated first.

        Args:
            state_dict: as returned by `state_dict`.

        Raises:
            TypeError, ValueError: if a saved group has an unsupported option (for example
                ``nesterov=True``), before anything is changed.
        """
        for i, group in enumerate(state_dict.get("param_groups", [])):
            _check_group(group, f"loaded param_groups[{i}] ", impl_flags=False)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"] = None
            group["differentiable"] = False

    def _init_group(  # type: ignore[override]
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffer_list: list[Tensor | None],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SpikeCompensatedSGD does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (see the class docstring for the math).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffer_list: list[Tensor | None] = []
            self._init_group(group, params, grads, momentum_buffer_list)
            if not params:
                continue

            momentum = group["momentum"]
            a, b = spike_coefficients(momentum, group["delay"]) if momentum != 0 else (1.0, 0.0)
            foreach = group["foreach"]
            if foreach is None:
                foreach = (
                    _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
                    if _default_to_fused_or_foreach is not None
                    else True
                )
            lr = group["lr"]
            if isinstance(lr, Tensor):
                lr = lr.item()
            func = _multi_tensor_spike_sgd if foreach else _single_tensor_spike_sgd
            func(
                params,
                grads,
                momentum_buffer_list,
                lr=lr,
                momentum=momentum,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                a=a,
                b=b,
            )

            if momentum != 0:
                for p, buf in zip(params, momentum_buffer_list, strict=True):
                    self.state[p]["momentum_buffer"] = buf

        return loss


def _single_tensor_spike_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    a: float,
    b: float,
) -> None:
    """Per-parameter loop; op for op the same as torch's ``_single_tensor_sgd`` when b == 0."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum == 0:
            param.add_(grad, alpha=-lr)
            continue
        buf = momentum_buffer_list[i]
        if buf is None:
            buf = grad.detach().clone()
            momentum_buffer_list[i] = buf
        else:
            buf.mul_(momentum).add_(grad, alpha=1)
        if b == 0.0:
            param.add_(buf, alpha=-lr)
        else:
            param.add_(grad.mul(b).add_(buf, alpha=a), alpha=-lr)


def _multi_tensor_spike_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    a: float,
    b: float,
) -> None:
    """``torch._foreach_*`` implementation, one kernel group per (device, dtype).

    Op for op the same as torch's ``_multi_tensor_sgd`` when ``b == 0``.
    """
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffer_list],  # type: ignore[list-item]
        with_indices=True,
    )
    for (dev_params_, dev_grads_, dev_bufs_), indices in grouped.values():
        dev_params = cast(list[Tensor], dev_params_)
        dev_grads = cast(list[Tensor], dev_grads_)
        grads_are_copies = False
        if maximize:
            dev_grads = cast(list[Tensor], torch._foreach_neg(dev_grads))
            grads_are_copies = True
        if weight_decay != 0:
            if grads_are_copies:
                torch._foreach_add_(dev_grads, dev_params, alpha=weight_decay)
            else:
                dev_grads = cast(
                    list[Tensor], torch._foreach_add(dev_grads, dev_params, alpha=weight_decay)
                )
                grads_are_copies = True

        if momentum == 0:
            torch._foreach_add_(dev_params, dev_grads, alpha=-lr)
            continue

        if all(buf is not None for buf in dev_bufs_):
            bufs = cast(list[Tensor], dev_bufs_)
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, dev_grads, alpha=1)
        else:  # first step of some parameters: v_1 = g_1, like torch.optim.SGD
            bufs = []
            for j, buf in enumerate(dev_bufs_):
                if buf is None:
                    buf = dev_grads[j].detach().clone()
                    dev_bufs_[j] = momentum_buffer_list[indices[j]] = buf
                else:
                    buf.mul_(momentum).add_(dev_grads[j], alpha=1)
                bufs.append(buf)

        if b == 0.0:
            torch._foreach_add_(dev_params, bufs, alpha=-lr)
        else:
            # update = a * v + b * g, written into the gradient copy when we own one.
            if grads_are_copies:
                torch._foreach_mul_(dev_grads, b)
                update = dev_grads
            else:
                update = cast(list[Tensor], torch._foreach_mul(dev_grads, b))
            torch._foreach_add_(update, bufs, alpha=a)
            torch._foreach_add_(dev_params, update, alpha=-lr)
