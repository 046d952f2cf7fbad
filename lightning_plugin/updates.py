"""What happens at each optimizer update of a stage: hooks, loss-scale checks, clipping, LR steps.

The stages step their optimizers themselves inside ``schedule.step()``. :class:`StageUpdates`
wraps each stage optimizer's ``step`` so that every update does what Lightning does around an
optimizer step on one device:

1. ``on_after_backward`` (callbacks, then the module), on the rank holding the stage;
2. with ``16-mixed``: unscale the gradients, check them for inf / NaN;
3. ``on_before_optimizer_step(optimizer)``;
4. gradient clipping (``gradient_clip_val``, or the module's ``configure_gradient_clipping``);
5. the optimizer step, skipped when the gradients overflowed;
6. ``interval="step"`` LR schedulers step (every ``frequency`` updates).

**Global or per stage.** When every stage updates once per batch (``updates_per_step == 1``,
e.g. ``gpipe``) and the method does not predict, the update can wait for the end of
``schedule.step()`` without changing the math (no forward follows it in the batch): the
updates are then *deferred* and run on all ranks together, so clipping uses the global norm
over all stages' gradients and an overflow anywhere skips every stage's update, exactly as on
one device. Otherwise a stage updates while the other stages are still computing the same
micro-batch's gradients, so clipping uses the stage's own gradient norm and an overflow skips
that stage's update only.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .comm import all_gather_objects
from .optim import track_steps
from .user_steps import call_hooks

__all__ = ["StageUpdates", "next_scaler_state"]


def next_scaler_state(state: dict[str, Any], found_inf: bool) -> dict[str, Any]:
    """``GradScaler.update()``'s rule on a ``GradScaler.state_dict()``."""
    st = dict(state)
    if found_inf:
        st["scale"] = st["scale"] * st["backoff_factor"]
        st["_growth_tracker"] = 0
    else:
        grown = st["_growth_tracker"] + 1
        if grown == st["growth_interval"]:
            new = st["scale"] * st["growth_factor"]
            if torch.isfinite(torch.tensor(new, dtype=torch.float32)):
                st["scale"] = new
            grown = 0
        st["_growth_tracker"] = grown
    return st


class StageUpdates:
    """Runs every update of this rank's stages (see the module docstring).

    Args:
        trainer: The Trainer (for its callbacks).
        module: The LightningModule.
        optimizers: ``{stage: optimizer}`` of this rank (under BitPipe the keys are copies,
            ``(replica, chunk)``).
        schedulers: ``{stage: [scheduler, ...]}`` (clones, one per ``configure_optimizers``
            scheduler), with the keys of ``optimizers``.
        intervals: ``(interval, frequency)`` of each scheduler.
        global_index: ``{id(param): index}`` in the single-device optimizer (the order of the
            global gradient norm).
        clip_val: ``gradient_clip_val`` (0 or ``None``: no clipping).
        clip_algorithm: ``"norm"`` or ``"value"``.
        custom_clipping: Call the module's ``configure_gradient_clipping`` instead.
        defer: Run the updates after ``schedule.step()`` (see the module docstring).
        scaler: The ``GradScaler`` holding the loss scale (``16-mixed``), else ``None``.
        comm_device: Where the overflow flag is all-reduced (the device with NCCL).
        update_every: Micro-batches per update. The last stage backpropagates
            ``(loss / update_every) * scale``, as one device accumulating that many batches
            does; the worker divides the sum by ``update_every`` once more, so unscaling
            multiplies by ``update_every / scale``.
    """

    def __init__(self, *, trainer: Any, module: Any, optimizers: dict[Any, Optimizer],
                 schedulers: dict[Any, list[Any]], intervals: list[tuple[str, int]],
                 global_index: dict[int, int], clip_val: float | None, clip_algorithm: str,
                 custom_clipping: bool, defer: bool, scaler: Any,
                 comm_device: torch.device | None = None, update_every: int = 1) -> None:
        self.trainer = trainer
        self.module = module
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.intervals = intervals
        self.global_index = global_index
        self.clip_val = float(clip_val or 0.0)
        self.clip_algorithm = clip_algorithm
        self.custom_clipping = custom_clipping
        self.defer = defer
        self.scaler = scaler
        self.update_every = update_every
        self.comm_device = comm_device or torch.device("cpu")
        #: Updates made by each stage (checkpointed; drives ``frequency``).
        self.updates: dict[Any, int] = dict.fromkeys(optimizers, 0)
        #: Whether some update of this rank overflowed in the current batch (``16-mixed``).
        self.found_inf = False
        self.scale = 1.0
        self._original: dict[int, Callable[..., Any]] = {}
        self._pending: dict[int, list[Tensor | None]] = {}
        for k, opt in optimizers.items():
            self._install(k, opt)

    # ------------------------------------------------------------------ wrapping
    def _install(self, k: int, opt: Optimizer) -> None:
        self._original[k] = opt.step
        ref = weakref.ref(self)

        def step(_opt: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
            updates = ref()
            return updates._step(k, closure) if updates is not None else None

        opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]
        track_steps(opt)

    def _params(self, k: int) -> list[Tensor]:
        return [p for g in self.optimizers[k].param_groups for p in g["params"]]

    def begin_batch(self) -> None:
        """Read the loss scale for this batch and reset the overflow flag."""
        self.found_inf = False
        self.scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def _step(self, k: int, closure: Callable[[], Any] | None) -> Any:
        if self.defer:
            self._pending[k] = [p.grad for p in self._params(k)]
            return None
        call_hooks(self.trainer, self.module, "on_after_backward")
        inf = self._unscale(k)
        call_hooks(self.trainer, self.module, "on_before_optimizer_step", self.optimizers[k])
        out = None
        if not inf:
            self._clip([k])
            out = self._original[k](closure) if closure is not None else self._original[k]()
        self._count(k, inf)  # the schedulers step in after_update, once the worker restored
        return out          # the learning rate its method may scale for the update

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _unscale(self, k: int) -> bool:
        if self.scaler is None:
            return False
        inv = self.update_every / self.scale
        inf = False
        for p in self._params(k):
            if p.grad is not None:
                p.grad.mul_(inv)
                inf = inf or not bool(torch.isfinite(p.grad).all())
        return inf

    def _clip(self, stages: list[int]) -> None:
        if self.custom_clipping:
            for k in stages:
                self.module.configure_gradient_clipping(
                    self.optimizers[k], gradient_clip_val=self.trainer.gradient_clip_val,
                    gradient_clip_algorithm=self.trainer.gradient_clip_algorithm)
            return
        if self.clip_val <= 0:
            return
        params = [p for k in stages for p in self._params(k) if p.grad is not None]
        if self.clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_val)
        elif not self.defer:
            torch.nn.utils.clip_grad_norm_(params, self.clip_val)
        else:
            self._clip_global(params)

    def _clip_global(self, params: list[Tensor]) -> None:
        """Clip by the norm over every stage's gradients, as one device does."""
        mine = [(self.global_index[id(p)], float(torch.linalg.vector_norm(p.grad)))
                for p in params]
        everyone = all_gather_objects(mine) if dist.is_initialized() else [mine]
        norms = sorted(x for part in everyone for x in part)
        if not norms or not params:
            return
        total = torch.linalg.vector_norm(
            torch.tensor([v for _, v in norms], dtype=params[0].grad.dtype))
        torch.nn.utils.clip_grads_with_norm_(params, self.clip_val, total.to(params[0].device))

    def _count(self, k: int, inf: bool) -> None:
        self.found_inf = self.found_inf or inf
        self.updates[k] += 1

    def _step_schedulers(self, k: int) -> None:
        count = self.updates[k]
        for sched, (interval, frequency) in zip(self.schedulers[k], self.intervals):
            if interval == "step" and count % frequency == 0:
                sched.step()

    def _after(self, k: int, inf: bool) -> None:
        self._count(k, inf)
        self._step_schedulers(k)

    def after_update(self, k: int) -> Callable[[Any], None]:
        """The hook a stage's worker runs after each of its updates
        (``PredictiveStage.after_update_hooks``): the ``interval="step"`` schedulers step
        there, after the worker restored any learning rate its method scaled."""
        ref = weakref.ref(self)

        def hook(_worker: Any) -> None:
            updates = ref()
            if updates is not None and not updates.defer:
                updates._step_schedulers(k)

        return hook

    # ------------------------------------------------------------------ deferred updates
    def finish_batch(self) -> None:
        """Run the deferred updates (every rank, after ``schedule.step()``)."""
        if not self.defer or not self._pending:
            return
        stages = sorted(self._pending)
        for k in stages:
            for p, g in zip(self._params(k), self._pending.pop(k)):
                p.grad = g
        call_hooks(self.trainer, self.module, "on_after_backward")
        inf = any([self._unscale(k) for k in stages])
        if self.scaler is not None and dist.is_initialized():
            flag = torch.tensor(float(inf), device=self.comm_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            inf = bool(flag.item())
        call_hooks(self.trainer, self.module, "on_before_optimizer_step",
                   self.optimizers[stages[0]])
        if not inf:
            self._clip(stages)
        for k in stages:
            if not inf:
                self._original[k]()
            self.optimizers[k].zero_grad(set_to_none=True)
            self._after(k, inf)

    def end_batch(self, found_inf_anywhere: bool) -> None:
        """Update the shared loss scale from every rank's overflow flag (``16-mixed``)."""
        if self.scaler is not None:
            self.scaler.load_state_dict(next_scaler_state(self.scaler.state_dict(),
                                                          found_inf_anywhere))
