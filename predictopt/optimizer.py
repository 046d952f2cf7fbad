r"""``PredictiveOptimizer``: weight prediction around any ``torch.optim`` optimizer.

The wrapper *is* a ``torch.optim.Optimizer`` whose ``param_groups``, ``state``, ``defaults`` and
hook dictionaries are the wrapped optimizer's own objects (looked up on every access, so they
never go stale after ``load_state_dict``). Its checkpoints are the wrapped optimizer's
``state_dict``: a wrapper checkpoint loads into a bare optimizer of the same class and back.

Prediction (XGrad / PipeOptim): inside ``with opt.predicted():`` the parameters hold

$$
\hat w(s) = a\,w - C\,D_t \quad (= w - s\,\eta\,D_t \text{ without decoupled decay}),
$$

the weights ``s`` updates ahead if every update repeats the optimizer's current direction
$D_t$ (rules: `predictopt.rules`). On exit, also on an exception, the real weights are
copied back bit for bit; gradients computed inside stay in ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import prediction
from .rules import PredictionRule, _check_steps, get_rule

__all__ = ["PredictiveOptimizer"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def _delegate(name: str) -> property:
    def fget(self: PredictiveOptimizer) -> Any:
        return getattr(self._predictopt_inner, name)

    def fset(self: PredictiveOptimizer, value: Any) -> None:
        setattr(self._predictopt_inner, name, value)

    return property(fget, fset, doc=f"The wrapped optimizer's ``{name}`` (the same object).")


class PredictiveOptimizer(Optimizer):
    r"""Wraps an optimizer and predicts the weights ``steps`` updates ahead from its state.

    Example (XGrad: forward and backward on the predicted weights, update the real ones)::

        opt = PredictiveOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), steps=1)
        for x, y in loader:
            with opt.predicted():
                loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    ``steps=0`` makes the wrapper an exact pass-through: same trajectory, same ``state_dict``,
    bit for bit. Rules that average observed updates (``"observed"``: SGD without momentum,
    plain RMSprop, Adagrad, Adadelta, unknown optimizers) record at ``step()`` only when
    ``steps > 0``.

    Args:
        optimizer: The ``torch.optim.Optimizer`` to wrap (its state is the only state).
        steps: The default horizon ``s >= 0`` of `predicted` / `predict_`.
        rule: ``None`` (the default rule of the optimizer's class, found along its MRO), a
            registered rule name (`predictopt.available_rules`) or a
            `predictopt.rules.PredictionRule`.
        calibrate: Scale each group's prediction by a factor $\alpha \in [0, 1]$ fitted online
            (see below), so that it never lands farther from the real trajectory than the stale
            weights, even for noisy optimizers.
        calibration_beta: EMA factor of the calibration statistics.

    Calibrated prediction: at every ``step()`` the wrapper compares the one-step prediction
    $P = \hat w(1) - w$ made before the update with the update that really happened,
    $A = w_{t+1} - w_t$, and keeps per group exponential moving averages of $\langle P, A\rangle$
    and $\lVert P\rVert^2$ (in the group's ``predictopt_calibration`` entry, so checkpoints carry
    them). The least-squares scale $\alpha = \overline{\langle P,A\rangle} /
    \overline{\lVert P\rVert^2}$, clipped to $[0, 1]$, multiplies $C$ in every later prediction;
    since $\lVert \alpha P - A\rVert^2 = \lVert A\rVert^2 - \langle P,A\rangle^2/\lVert P\rVert^2
    \le \lVert A\rVert^2$ for the unclipped optimum, the calibrated one-step prediction is never
    worse than no prediction on the averaged statistics. Costs one extra prediction and one weight
    copy per ``step()``.

    Raises:
        TypeError: ``optimizer`` is not an ``Optimizer`` (or already a ``PredictiveOptimizer``),
            ``steps`` is not an int, or ``rule`` has the wrong type.
        ValueError: ``steps < 0`` or an unknown rule name.
    """

    param_groups = _delegate("param_groups")  # type: ignore[assignment]
    state = _delegate("state")  # type: ignore[assignment]
    defaults = _delegate("defaults")  # type: ignore[assignment]
    for _name in _HOOK_DICTS:
        locals()[_name] = _delegate(_name)
    del _name

    def __init__(self, optimizer: Optimizer, steps: int = 1,
                 rule: str | PredictionRule | None = None, *, calibrate: bool = False,
                 calibration_beta: float = 0.9) -> None:
        if isinstance(optimizer, PredictiveOptimizer):
            raise TypeError("optimizer is a PredictiveOptimizer already; wrap the bare optimizer")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        steps = _check_steps(steps)
        if not isinstance(calibrate, bool):
            raise TypeError(f"calibrate must be a bool, got {calibrate!r}")
        if not isinstance(calibration_beta, (int, float)) or not 0 <= calibration_beta < 1:
            raise ValueError(
                f"calibration_beta must be a float in [0, 1), got {calibration_beta!r}")
        rule_obj = get_rule(rule, optimizer)
        self._predictopt_inner = optimizer
        self.calibrate = calibrate
        self.calibration_beta = float(calibration_beta)
        self.steps = steps
        self.rule = rule_obj
        self._saved: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._scheduler: Any = None
        self._zero_grad_profile_name = "Optimizer.zero_grad#PredictiveOptimizer.zero_grad"

    # ------------------------------------------------------------------ the wrapped optimizer
    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._predictopt_inner

    def __getattr__(self, name: str) -> Any:
        # Called only for attributes not found normally: forward to the wrapped optimizer so
        # optimizer-specific methods (e.g. ``train()``/``eval()`` of Schedule-Free) keep working.
        if name.startswith("__") or name == "_predictopt_inner":
            raise AttributeError(name)
        return getattr(self._predictopt_inner, name)

    def __repr__(self) -> str:
        return (f"PredictiveOptimizer(steps={self.steps}, rule={self.rule!r},\n"
                f"  {self._predictopt_inner!r})")

    # ------------------------------------------------------------------ prediction
    @property
    def is_predicted(self) -> bool:
        """Whether the parameters currently hold predicted weights."""
        return self._saved is not None

    def predict_(self, steps: int | None = None, *,
                 lrs: Sequence[Sequence[float]] | None = None) -> None:
        r"""Replace the parameters by $\hat w(s)$ in place; undo with `restore_`.

        Args:
            steps: The horizon ``s``; default: the wrapper's ``steps``.
            lrs: Per parameter group, the ``s`` future learning rates (default: the current
                ``lr`` repeated).

        Raises:
            RuntimeError: the parameters hold predicted weights already (no nesting).
        """
        s = self.steps if steps is None else _check_steps(steps)
        if self._saved is not None:
            raise RuntimeError("parameters hold predicted weights already; call restore_() first "
                               "(predicted() blocks do not nest)")
        if lrs is not None:
            prediction._check_group_lrs(lrs, self._predictopt_inner, s)
        else:
            lrs = self._future_lrs(s)
        self._saved = prediction.predict_(self._predictopt_inner, self.rule, s, lrs,
                                          self._calibration_scales())

    def restore_(self) -> None:
        """Copy the real weights back, bit for bit (``.grad`` is left as it is).

        Raises:
            RuntimeError: the parameters are not predicted.
        """
        if self._saved is None:
            raise RuntimeError("parameters are not predicted; nothing to restore")
        saved, self._saved = self._saved, None
        prediction.restore_(saved)

    @contextlib.contextmanager
    def predicted(self, steps: int | None = None, *,
                  lrs: Sequence[Sequence[float]] | None = None) -> Iterator[PredictiveOptimizer]:
        """Context manager: predicted weights inside, real weights (bit for bit) after.

        Run forward *and* backward inside the block: the autograd graph saved the predicted
        values, and the restore bumps the parameters' versions so a backward after the block
        raises instead of silently mixing weights.
        """
        self.predict_(steps, lrs=lrs)
        try:
            yield self
        finally:
            if self._saved is not None:
                self.restore_()

    def attach_scheduler(self, scheduler: Any) -> None:
        r"""Make prediction schedule-aware: use the learning rates ``scheduler`` will set.

        A prediction over ``s`` updates then uses $\eta_1..\eta_s$ from
        `predictopt.lr_scheduler.future_lrs` (the current lr, then the lr after each further
        ``scheduler.step()``) instead of ``s`` times the current lr. The scheduler is never
        advanced or otherwise changed. Pass ``None`` to detach.

        For Adam-style rules nothing else changes: projecting the moments forward with the
        gradient estimated by $\hat m_t$ gives bias-corrected moments equal to the current ones,
        $(\beta^j m_t + (1-\beta^j)\hat m_t)/(1-\beta^{t+j}) = \hat m_t$, so the direction is the
        same at every future step (exact under a constant gradient).

        Raises:
            TypeError: ``scheduler`` is not an LR scheduler of this optimizer.
        """
        if scheduler is not None:
            target = getattr(scheduler, "optimizer", None)
            if target is not self and target is not self._predictopt_inner:
                raise TypeError("scheduler must be an LR scheduler whose optimizer is this "
                                "PredictiveOptimizer or the optimizer it wraps")
        self._scheduler = scheduler

    def _future_lrs(self, steps: int) -> list[list[float]] | None:
        if self._scheduler is None or steps == 0:
            return None
        from .lr_scheduler import future_lrs

        return future_lrs(self._scheduler, steps)

    def _calibration_scales(self) -> list[float] | None:
        if not self.calibrate:
            return None
        scales = []
        for group in self._predictopt_inner.param_groups:
            num, den = group.get("predictopt_calibration", (1.0, 1.0))
            scales.append(min(max(num / den, 0.0), 1.0) if den > 0 else 1.0)
        return scales

    def calibration_scales(self) -> list[float]:
        """The current calibration factor $\\alpha$ of each group (1.0 without calibration)."""
        return self._calibration_scales() or [1.0] * len(self._predictopt_inner.param_groups)

    # ------------------------------------------------------------------ optimizer protocol
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Restore the real weights if predicted, then run the wrapped optimizer's ``step``.

        With ``steps > 0``, rules that average observed updates record the update just applied,
        and calibration (if on) updates its statistics.
        """
        if self._saved is not None:
            self.restore_()
        inner = self._predictopt_inner
        watch = self._watch(closure is not None) if self.steps > 0 else []
        loss = inner.step() if closure is None else inner.step(closure)
        for group, ps, before, disp, observes in watch:
            keep = [i for i, p in enumerate(ps) if p.grad is not None]
            if len(keep) != len(ps):
                ps, before = [ps[i] for i in keep], [before[i] for i in keep]
                disp = None if disp is None else [disp[i] for i in keep]
            if disp is not None:
                self._update_calibration(group, ps, before, disp)
            if observes:
                self.rule.record(group, ps, [inner.state[p] for p in ps], before)
        return loss

    @torch.no_grad()
    def _watch(self, has_closure: bool) -> list[tuple[dict, list[Tensor], list[Tensor], Any, bool]]:
        watch = []
        inner = self._predictopt_inner
        # the raw (unscaled) one-step prediction: bare optimizer + our rule
        one_step = prediction.predict(inner, 1, rule=self.rule) if self.calibrate else None
        for group in self._predictopt_inner.param_groups:
            observes = self.rule.observes(group)
            if not (self.calibrate or observes):
                continue
            ps = [p for p in group["params"] if has_closure or p.grad is not None]
            if not ps:
                continue
            if observes and not has_closure and self.rule.records_gradients(group) \
                    and not any(p.grad.is_sparse for p in ps):
                # the update is known from the gradients: record it now, no weight snapshot
                self.rule.record_gradients(group, ps, [inner.state[p] for p in ps])
                if not self.calibrate:
                    continue
                observes = False
            disp = None
            if one_step is not None:
                disp = torch._foreach_sub([one_step[p] for p in ps], ps)
            watch.append((group, ps, torch._foreach_mul(ps, 1.0), disp, observes))
        return watch

    @torch.no_grad()
    def _update_calibration(self, group: dict, ps: list[Tensor], before: list[Tensor],
                            disp: list[Tensor]) -> None:
        if not ps:
            return
        actual = torch._foreach_sub(ps, before)
        num = sum(float(x.double().sum()) for x in torch._foreach_mul(disp, actual))
        den = sum(float(x.double().sum()) for x in torch._foreach_mul(disp, disp))
        b = self.calibration_beta
        stats = group.get("predictopt_calibration")
        if stats is None:
            group["predictopt_calibration"] = [num, den]
        else:
            group["predictopt_calibration"] = [b * stats[0] + (1 - b) * num,
                                               b * stats[1] + (1 - b) * den]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's ``zero_grad``."""
        self._predictopt_inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's ``add_param_group``."""
        self._predictopt_inner.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` (the standard format of its class)."""
        return self._predictopt_inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The wrapped optimizer's ``load_state_dict``; ``param_groups`` follow automatically."""
        self._predictopt_inner.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        if self._saved is not None:
            raise RuntimeError("cannot pickle or copy a PredictiveOptimizer while predicted; "
                               "call restore_() first")
        return {"_predictopt_inner": self._predictopt_inner, "steps": self.steps,
                "rule": self.rule, "_scheduler": None, "calibrate": self.calibrate,
                "calibration_beta": self.calibration_beta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._saved = None
        self._zero_grad_profile_name = "Optimizer.zero_grad#PredictiveOptimizer.zero_grad"
