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
$D_t$ (rules: `predictopt.rules`), by default calibrated (see `PredictiveOptimizer`). On exit,
also on an exception, the real weights are copied back bit for bit; gradients computed inside
stay in ``.grad``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import prediction
from .rules import PredictionRule, _check_steps, _dot64, get_rule

__all__ = ["PredictiveOptimizer", "CALIBRATION_KEY", "SAMPLE_KEY"]

#: Key of the per-group calibration record in ``param_groups`` (so checkpoints carry it):
#: ``{"fit": {s: [EMA of the samples' gains <P, A>/|P|^2, samples]}, "sample": {s: [updates
#: left, <P, w_t>, |P|^2]}}``.
CALIBRATION_KEY = "predictopt_calibration"
#: Prefix of the per-parameter state key holding the displacement of a calibration sample in
#: flight for horizon ``s`` (``predictopt_calibration_<s>``), so that checkpoints carry it and a
#: resumed run continues bit for bit.
SAMPLE_KEY = "predictopt_calibration_"

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
# Set on the optimizer passed to GradScaler.step() when it supports AMP scaling (fused kernels).
_AMP_ATTRS = ("grad_scale", "found_inf")


def _delegate(name: str) -> property:
    def fget(self: PredictiveOptimizer) -> Any:
        return getattr(self._predictopt_inner, name)

    def fset(self: PredictiveOptimizer, value: Any) -> None:
        setattr(self._predictopt_inner, name, value)

    return property(fget, fset, doc=f"The wrapped optimizer's ``{name}`` (the same object).")


class _AttachedScheduler:
    """Carries the attached LR scheduler through ``deepcopy`` and ``pickle`` of the wrapper."""

    def __init__(self, scheduler: Any, owner: PredictiveOptimizer | None = None) -> None:
        self.scheduler = scheduler
        self.owner = owner

    def __deepcopy__(self, memo: dict[int, Any]) -> _AttachedScheduler:
        return _AttachedScheduler(copy.deepcopy(self.scheduler, memo))

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        owner = self.owner
        if owner is not None:  # probe first, for an error that names the culprit
            known = {id(owner), id(owner._predictopt_inner)}

            class _Probe(pickle.Pickler):
                def persistent_id(self, obj: Any) -> Any:
                    return "optimizer" if id(obj) in known else None

            try:
                _Probe(io.BytesIO(), protocol if isinstance(protocol, int) else 2).dump(
                    self.scheduler)
            except Exception as exc:
                raise pickle.PicklingError(
                    f"cannot pickle the {type(self.scheduler).__name__} attached to this "
                    f"PredictiveOptimizer ({exc}); detach it with attach_scheduler(None) before "
                    "pickling and attach it again afterwards") from exc
        return (_AttachedScheduler, (self.scheduler,))


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
    plain RMSprop, Adagrad, Adadelta, Adafactor, unknown optimizers) record at ``step()`` only
    when ``steps > 0``.

    Args:
        optimizer: The ``torch.optim.Optimizer`` to wrap (its state is the only state).
        steps: The default horizon ``s >= 0`` of `predicted` / `predict_`.
        rule: ``None`` (the default rule of the optimizer's class, found along its MRO), a
            registered rule name (`predictopt.available_rules`) or a
            `predictopt.rules.PredictionRule`.
        calibrate: Scale each group's predicted displacement by a gain $\alpha_s \in [0, 1]$
            fitted online per horizon (below; the default). ``False`` gives the uncalibrated
            formulas of the papers.
        calibration_beta: EMA factor of the calibration statistics, in ``[0, 1)``.
        calibration_horizons: The horizons whose gains are fitted (ints >= 1); default
            ``(steps,)``. A prediction at another horizon uses the gain of the nearest fitted
            one (the smaller on a tie).
        calibration_every: A sample of horizon $s$ starts at most once every
            $\max(s, k)$ real updates, $k$ = ``calibration_every`` (an int >= 1; 1, the
            default: as soon as the previous one of that horizon completes). Larger values
            cut the cost below by about that factor for the short horizons, at the price of
            fewer samples (each of the same weight in the average).

    Calibrated prediction: for each fitted horizon $s$ the wrapper takes, at a ``step()``, the
    displacement $P_k = \hat w(s) - w_t$ the prediction of that update made (uncalibrated, from
    the same state), waits ``s`` real updates (skipped AMP steps do not count) and compares it
    with the displacement that really happened, $A_k = w_{t+s} - w_t$; then the next sample
    starts (at most once every ``calibration_every`` updates). Each group keeps an
    exponential moving average (factor ``calibration_beta``, per sample) of the samples'
    least-squares gains $g_k = \langle P_k, A_k\rangle / \lVert P_k\rVert^2$
    (``param_groups[i]["predictopt_calibration"]["fit"][s]``; the sample in flight lives in the
    state, key ``predictopt_calibration_<s>``, so checkpoints carry both and a resumed run
    continues bit for bit), and the prediction at horizon $s$ is

    $$
    \hat w_\alpha(s) = w + \alpha_s\,(\hat w(s) - w), \qquad
    \alpha_s = \operatorname{clip}_{[0, 1]}\big(\textstyle\sum_k c_k g_k\big)
    $$

    with the EMA weights $c_k$ ($\sum_k c_k = 1$). The gains are normalised per sample, so
    that the large displacements of early training do not dominate the fit long after.

    What is guaranteed, on the averaged statistics: $\alpha_s$ minimises over $[0, 1]$ the
    averaged normalised squared error $E(\alpha) = \sum_k c_k \lVert \alpha P_k -
    A_k\rVert^2 / \lVert P_k\rVert^2$ of the samples seen so far, and $E(0)$ is that of the stale
    weights, so $E(\alpha_s) \le E(0)$: the calibrated prediction is never worse than the stale
    weights on those samples (equal when the prediction is uncorrelated with or opposite to the
    real displacement: $\alpha_s = 0$, the stale weights). Not guaranteed: a single prediction,
    predictions not yet sampled when the statistics drift (the gain is fitted on past samples),
    and beating the stale weights where no prediction of the rule is correlated with the future
    (then the calibrated prediction converges to the stale weights). Under a constant gradient
    with an exact rule $P_k = A_k$ up to rounding, $\alpha_s = 1$ up to rounding and exactness is
    kept. Until the first sample of a horizon completes, $\alpha = 1$.

    Cost per fitted horizon $s$: one displacement (a copy of the parameters, in the state) held
    for $s$ updates (for $s = 1$ only during ``step()``), and per $\max(s, k)$ updates one
    uncalibrated prediction and three inner products over the parameters summed in float64
    (measured on CPU: about 1.75 foreach AdamW steps per sample, so at every step for $s = 1$
    and $k = 1$; see the benchmarks).

    Raises:
        TypeError: ``optimizer`` is not an ``Optimizer`` (or already a ``PredictiveOptimizer``),
            ``steps`` is not an int, ``calibrate`` is not a bool, ``calibration_horizons`` is not
            a non-empty sequence of ints, ``calibration_every`` is not an int, or ``rule`` has
            the wrong type.
        ValueError: ``steps < 0``, an unknown rule name, ``calibration_beta`` outside
            ``[0, 1)``, a horizon in ``calibration_horizons`` or ``calibration_every`` below
            1.
    """

    param_groups = _delegate("param_groups")  # type: ignore[assignment]
    state = _delegate("state")  # type: ignore[assignment]
    defaults = _delegate("defaults")  # type: ignore[assignment]
    for _name in _HOOK_DICTS:
        locals()[_name] = _delegate(_name)
    del _name

    def __init__(self, optimizer: Optimizer, steps: int = 1,
                 rule: str | PredictionRule | None = None, *, calibrate: bool = True,
                 calibration_beta: float = 0.9,
                 calibration_horizons: Sequence[int] | None = None,
                 calibration_every: int = 1) -> None:
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
        if (isinstance(calibration_beta, bool) or not isinstance(calibration_beta, (int, float))
                or not 0 <= calibration_beta < 1):
            raise ValueError(
                f"calibration_beta must be a float in [0, 1), got {calibration_beta!r}")
        horizons = _check_horizons(calibration_horizons)
        if isinstance(calibration_every, bool) or not isinstance(calibration_every, int):
            raise TypeError(f"calibration_every must be an int >= 1, got {calibration_every!r}")
        if calibration_every < 1:
            raise ValueError(f"calibration_every must be an int >= 1, got {calibration_every}")
        rule_obj = get_rule(rule, optimizer)
        self._predictopt_inner = optimizer
        self.calibrate = calibrate
        self.calibration_beta = float(calibration_beta)
        self.calibration_horizons = horizons
        self.calibration_every = calibration_every
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
        return (f"PredictiveOptimizer(steps={self.steps}, rule={self.rule!r}, "
                f"calibrate={self.calibrate},\n  {self._predictopt_inner!r})")

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
                ``lr`` repeated, or the attached scheduler's).

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
                                          self._calibration_scales(s))

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
        advanced or otherwise changed. Pass ``None`` to detach. The attached scheduler travels
        with ``copy.deepcopy`` and ``pickle`` of the wrapper (pickling raises a
        ``pickle.PicklingError`` naming it when it cannot be pickled, e.g. a ``LambdaLR`` with
        a lambda).

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

    # ------------------------------------------------------------------ calibration
    def _horizons(self) -> tuple[int, ...]:
        if not self.calibrate or self.steps == 0:
            return ()
        return self.calibration_horizons or (self.steps,)

    def _calibration_scales(self, steps: int | None = None) -> list[float] | None:
        if not self.calibrate:
            return None
        s = self.steps if steps is None else steps
        scales = []
        for group in self._predictopt_inner.param_groups:
            stats = _record(group)["fit"]
            if not stats:
                scales.append(1.0)
                continue
            h = min(stats, key=lambda k: (abs(k - s), k))
            scales.append(min(max(float(stats[h][0]), 0.0), 1.0))
        if all(x == 1.0 for x in scales):
            return None
        return scales

    def calibration_scales(self, steps: int | None = None) -> list[float]:
        r"""The calibration gain $\alpha_s$ of each group for horizon ``steps`` (default: the
        wrapper's); 1.0 without calibration or before the first completed sample."""
        s = self.steps if steps is None else _check_steps(steps)
        return (self._calibration_scales(s)
                or [1.0] * len(self._predictopt_inner.param_groups))

    @torch.no_grad()
    def _calibration_begin(self) -> None:
        """Take a sample for every fitted horizon and group that has none in flight: the
        uncalibrated displacement P (into the state), <P, w_t> and |P|^2."""
        inner = self._predictopt_inner
        groups = inner.param_groups
        for h in self._horizons():
            todo = {gi for gi, g in enumerate(groups)
                    if h not in (r := _record(g))["sample"] and h not in r["wait"]}
            if not todo:
                continue
            found = prediction.displacements(inner, self.rule, h, self._future_lrs(h), todo)
            for gi in todo:
                record = _record(groups[gi])
                params, targets, disp = found.get(gi, ([], [], []))
                den = _total(_dot64(d) for d in disp)
                if den > 0:
                    c = _total(_dot64(d, t) for d, t in zip(disp, targets))
                    for p, d in zip(params, disp):
                        inner.state[p][f"{SAMPLE_KEY}{h}"] = (
                            torch.view_as_complex(d) if p.is_complex() else d)
                    record["sample"][h] = [h, c, den]
                    if self.calibration_every > 1:  # the next one starts this many updates on
                        record["wait"][h] = self.calibration_every
                _store(groups[gi], record)  # a new object: state_dicts taken stay put

    @torch.no_grad()
    def _calibration_end(self) -> None:
        """Count one real update; fold the samples whose horizon is reached into the fit."""
        inner = self._predictopt_inner
        b = self.calibration_beta
        for group in inner.param_groups:
            record = _record(group)
            if not record["sample"] and not record["wait"]:
                continue
            for h, left in list(record["wait"].items()):
                if left > 1:
                    record["wait"][h] = left - 1
                else:
                    del record["wait"][h]
            for h, (left, c, den) in list(record["sample"].items()):
                if left > 1:
                    record["sample"][h] = [left - 1, c, den]
                    continue
                del record["sample"][h]
                key = f"{SAMPLE_KEY}{h}"
                dots = []
                for p in group["params"]:
                    d = inner.state.get(p, {}).pop(key, None)
                    if d is not None:
                        dots.append(_dot64(_real(d), _real(p.detach())))
                gain = (_total(dots) - c) / den  # <P, A> / |P|^2 of this sample
                old = record["fit"].get(h)
                record["fit"][h] = ([gain, 1] if old is None else
                                    [b * old[0] + (1 - b) * gain, old[1] + 1])
            _store(group, record)

    # ------------------------------------------------------------------ optimizer protocol
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Restore the real weights if predicted, then run the wrapped optimizer's ``step``.

        With ``steps > 0``, rules that average observed updates record the update just applied,
        and calibration (if on) updates its statistics. ``grad_scale``/``found_inf`` set on the
        wrapper by ``GradScaler`` (optimizers with fused AMP support) are handed to the wrapped
        optimizer; a step skipped for inf/NaN gradients records nothing.
        """
        if self._saved is not None:
            self.restore_()
        inner = self._predictopt_inner
        amp = {k: self.__dict__[k] for k in _AMP_ATTRS if k in self.__dict__}
        watch = None
        if self.steps > 0:
            found_inf = amp.get("found_inf")
            if found_inf is None or not bool(found_inf.item()):
                watch = self._watch(closure is not None, amp.get("grad_scale") is not None)
        with _handed_over(inner, amp):
            loss = inner.step() if closure is None else inner.step(closure)
        if watch is not None:
            for group, ps, before in watch:
                keep = [i for i, p in enumerate(ps) if p.grad is not None]
                if len(keep) != len(ps):
                    ps = [ps[i] for i in keep]
                    before = None if before is None else [before[i] for i in keep]
                if ps:
                    self.rule.record(group, ps, [inner.state[p] for p in ps], before)
            if self.calibrate:
                self._calibration_end()
        return loss

    @torch.no_grad()
    def _watch(self, has_closure: bool, scaled: bool
               ) -> list[tuple[dict, list[Tensor], list[Tensor] | None]]:
        # calibration samples first: from the state the last prediction was made from
        if self.calibrate:
            self._calibration_begin()
        watch = []
        inner = self._predictopt_inner
        for group in inner.param_groups:
            if not self.rule.observes(group):
                continue
            ps = [p for p in group["params"] if has_closure or p.grad is not None]
            if not ps:
                continue
            if not (has_closure or scaled) and self.rule.records_gradients(group) \
                    and not any(p.grad.is_sparse for p in ps):
                # the update is known from the gradients: record it now, no weight snapshot
                self.rule.record_gradients(group, ps, [inner.state[p] for p in ps])
                continue
            before = torch._foreach_mul(ps, 1.0) if self.rule.needs_snapshot(group) else None
            watch.append((group, ps, before))
        return watch

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

    # ------------------------------------------------------------------ hooks
    # The hook dictionaries are the wrapped optimizer's (its step() and state_dict() run the
    # hooks, in torch's order, once); a hook registered on the wrapper is stored with a shim that
    # hands it the wrapper, as a hook of a bare optimizer receives that optimizer.
    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)`` to run before every step; ``optimizer`` is
        this wrapper (and ``args[0]``). May return new ``(args, kwargs)``."""
        def shim(_opt: Optimizer, args: tuple, kwargs: dict) -> Any:
            result = hook(self, (self, *args[1:]), kwargs)
            if isinstance(result, tuple) and len(result) == 2 and result[0] \
                    and result[0][0] is self:
                return (_opt, *result[0][1:]), result[1]
            return result

        return super().register_step_pre_hook(shim)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)`` to run after every step; ``optimizer`` is
        this wrapper."""
        return super().register_step_post_hook(
            lambda _opt, args, kwargs: hook(self, (self, *args[1:]), kwargs))

    def register_state_dict_pre_hook(self, hook: Callable[..., Any],
                                     prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer)``, run before `state_dict`, with this wrapper."""
        return super().register_state_dict_pre_hook(lambda _opt: hook(self), prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any],
                                      prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict)``, run after `state_dict`, with this wrapper."""
        return super().register_state_dict_post_hook(lambda _opt, sd: hook(self, sd), prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any],
                                          prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict)``, run before `load_state_dict`, with this
        wrapper."""
        return super().register_load_state_dict_pre_hook(lambda _opt, sd: hook(self, sd),
                                                         prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any],
                                           prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer)``, run after `load_state_dict`, with this wrapper."""
        return super().register_load_state_dict_post_hook(lambda _opt: hook(self), prepend)

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        if self._saved is not None:
            raise RuntimeError("cannot pickle or copy a PredictiveOptimizer while predicted; "
                               "call restore_() first")
        scheduler = None if self._scheduler is None else _AttachedScheduler(self._scheduler, self)
        return {"_predictopt_inner": self._predictopt_inner, "steps": self.steps,
                "rule": self.rule, "_scheduler": scheduler, "calibrate": self.calibrate,
                "calibration_beta": self.calibration_beta,
                "calibration_horizons": self.calibration_horizons,
                "calibration_every": self.calibration_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        held = state.get("_scheduler")
        state["_scheduler"] = held.scheduler if isinstance(held, _AttachedScheduler) else held
        state.setdefault("calibrate", False)
        state.setdefault("calibration_beta", 0.9)
        state.setdefault("calibration_horizons", None)
        state.setdefault("calibration_every", 1)
        self.__dict__.update(state)
        self._saved = None
        self._zero_grad_profile_name = "Optimizer.zero_grad#PredictiveOptimizer.zero_grad"


def _record(group: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """A copy of a group's calibration record: ``fit`` (per horizon, the averaged gain and the
    number of samples), ``sample`` (per horizon in flight: updates left, <P, w_t>, |P|^2) and
    ``wait`` (per horizon, updates until its next sample may start; ``calibration_every > 1``
    only). A legacy one-step record ``[mean <P, A>, mean |P|^2]`` is the fit of horizon 1."""
    rec = group.get(CALIBRATION_KEY)
    if not rec:
        return {"fit": {}, "sample": {}, "wait": {}}
    if not isinstance(rec, dict):
        num, den = rec
        return {"fit": {1: [num / den, 1]} if den > 0 else {}, "sample": {}, "wait": {}}
    return {"fit": dict(rec.get("fit", {})), "sample": dict(rec.get("sample", {})),
            "wait": dict(rec.get("wait", {}))}


def _store(group: dict[str, Any], record: dict[str, dict[int, Any]]) -> None:
    """Set a group's calibration record (without an empty ``wait``: with
    ``calibration_every = 1`` the record is what it was before that option)."""
    if not record["wait"]:
        record = {"fit": record["fit"], "sample": record["sample"]}
    group[CALIBRATION_KEY] = record


def _total(values: Iterable[Tensor]) -> float:
    """The sum of 0-dim tensors as a float, one device transfer per device."""
    per_device: dict[torch.device, Tensor] = {}
    for v in values:
        per_device[v.device] = per_device[v.device] + v if v.device in per_device else v
    return sum(float(v) for v in per_device.values())


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _check_horizons(horizons: Any) -> tuple[int, ...] | None:
    if horizons is None:
        return None
    if isinstance(horizons, (str, bytes)) or not isinstance(horizons, Sequence) or not horizons:
        raise TypeError(f"calibration_horizons must be None or a non-empty sequence of ints "
                        f">= 1, got {horizons!r}")
    out = []
    for h in horizons:
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"calibration_horizons must hold ints >= 1, got {h!r}")
        if h < 1:
            raise ValueError(f"calibration_horizons must hold ints >= 1, got {h}")
        out.append(h)
    return tuple(sorted(set(out)))


@contextlib.contextmanager
def _handed_over(inner: Optimizer, amp: dict[str, Any]) -> Iterator[None]:
    """Set GradScaler's ``grad_scale``/``found_inf`` on the wrapped optimizer for its step."""
    if not amp:
        yield
        return
    previous = {k: inner.__dict__[k] for k in amp if k in inner.__dict__}
    inner.__dict__.update(amp)
    try:
        yield
    finally:
        for k in amp:
            if k in previous:
                inner.__dict__[k] = previous[k]
            else:
                inner.__dict__.pop(k, None)
