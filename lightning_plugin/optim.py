"""One optimizer and LR schedulers per stage, made from what ``configure_optimizers`` returned.

Every stage gets the user's optimizer class rebuilt over its own parameters
(:func:`rebuild_optimizer`) and a clone of every scheduler driving that optimizer
(:func:`clone_scheduler`). :func:`check_scheduler_horizons` runs the schedules forward before
training, so that one sized for fewer steps than the training makes fails at once.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .errors import PipelineContractError, PipeOptimConfigError

__all__ = [
    "check_optimizer_config",
    "check_scheduler_horizons",
    "clone_scheduler",
    "rebuild_optimizer",
    "track_steps",
]

#: Longest schedule :func:`check_scheduler_horizons` steps through (a few ms per 1000 steps).
MAX_PROBED_STEPS = 20_000


def rebuild_optimizer(optimizer: Optimizer, params: Sequence[nn.Parameter],
                      copies: Mapping[int, nn.Parameter] | None = None) -> Optimizer:
    """The same optimizer class with the same param groups, restricted to ``params``.

    Every param group is kept (empty if none of its parameters is in ``params``) with a copy
    of all its hyper-parameters, so group indices, LR-scheduler ``base_lrs`` and per-group
    settings stay aligned with the original optimizer.

    Args:
        optimizer: The optimizer ``configure_optimizers`` returned (no state yet).
        params: The parameters to keep (parameters of ``optimizer``).
        copies: ``{id(parameter): its copy}``: optimize the copies of ``params`` instead, in
            the originals' param groups (a second replica of a stage, as BitPipe holds).

    Raises:
        PipeOptimConfigError: the class cannot be rebuilt from its ``defaults``, or the
            optimizer already holds state.
    """
    if optimizer.state:
        raise PipeOptimConfigError("configure_optimizers returned an optimizer that already holds "
                                   "state; return a fresh optimizer")
    keep = {id(p) for p in params}
    groups = []
    for g in optimizer.param_groups:
        ng = {key: copy.deepcopy(v) for key, v in g.items() if key != "params"}
        ng["params"] = [p if copies is None else copies[id(p)]
                        for p in g["params"] if id(p) in keep]
        groups.append(ng)
    cls = type(optimizer)
    try:
        sig = inspect.signature(cls.__init__)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        kwargs = {key: copy.deepcopy(v) for key, v in optimizer.defaults.items()
                  if var_kw or key in sig.parameters}
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise PipeOptimConfigError(
            f"cannot rebuild {cls.__name__} over one stage's parameters as "
            f"{cls.__name__}(param_groups, **defaults): {e}. PipeOptimStrategy gives every "
            "stage its own optimizer of the class configure_optimizers returns") from e


class _StepTracker(LRScheduler):
    """A scheduler that changes nothing: building it makes torch track ``optimizer.step``."""

    def get_lr(self) -> list[Any]:
        return [g["lr"] for g in self.optimizer.param_groups]


def track_steps(optimizer: Optimizer) -> None:
    """Let torch know when ``optimizer`` steps, as building a scheduler on it would.

    A cloned scheduler was built on another optimizer; without this its first ``step()`` would
    warn that the optimizer never stepped. Call it after any wrapping of ``optimizer.step``.
    """
    _StepTracker(optimizer)


def clone_scheduler(scheduler: Any, source: Optimizer, target: Optimizer,
                    keep: Sequence[Any] = ()) -> Any:
    """A copy of ``scheduler`` (with its state) that drives ``target`` instead of ``source``.

    ``target`` must have ``source``'s param groups and hyper-parameters (as
    :func:`rebuild_optimizer` makes it), so the copy is in exactly the state the scheduler
    would have had if it had been constructed on ``target``. Works for any scheduler that
    reaches its optimizer through attributes (``SequentialLR`` and ``ChainedScheduler`` too).

    Args:
        scheduler: The LR scheduler built in ``configure_optimizers``.
        source: Its optimizer.
        target: The optimizer the copy drives.
        keep: Objects to share rather than copy (e.g. the LightningModule, when a schedule
            function is one of its bound methods).
    """
    memo: dict[int, Any] = {id(source): target}
    for obj in keep:
        memo[id(obj)] = obj
    return copy.deepcopy(scheduler, memo)


def check_optimizer_config(optimizers: Sequence[Any], configs: Sequence[Any],
                           stages: Sequence[nn.Module], module: nn.Module) -> Optimizer:
    """Check what ``configure_optimizers`` returned; return its one optimizer.

    Args:
        optimizers: The optimizers (Lightning's parsed output of ``configure_optimizers``).
        configs: The ``LRSchedulerConfig`` objects.
        stages: The stage modules.
        module: The LightningModule (for parameter names).

    Raises:
        PipeOptimConfigError: not exactly one optimizer, a ``PredictiveOptimizer``, or a
            ``ReduceLROnPlateau`` stepped per batch.
        PipelineContractError: parameters outside the stages.
    """
    from predictopt import PredictiveOptimizer

    if len(optimizers) != 1:
        raise PipeOptimConfigError(
            f"configure_optimizers must return exactly one optimizer (over the stages' "
            f"parameters), got {len(optimizers)}: every stage runs its own copy of it. Use "
            "param groups for different hyper-parameters")
    source = optimizers[0]
    if isinstance(source, PredictiveOptimizer):
        raise PipeOptimConfigError(
            "return the bare optimizer from configure_optimizers, not a PredictiveOptimizer: "
            "each stage wraps its own copy with the method's rule (pass rule=... to "
            "PipeOptimStrategy to choose another)")
    if not isinstance(source, Optimizer):
        raise PipeOptimConfigError(f"configure_optimizers must return a torch.optim.Optimizer, "
                                   f"got {type(source).__name__}")
    stage_params = {id(p) for m in stages for p in m.parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    outside = [names.get(id(p), "?") for g in source.param_groups for p in g["params"]
               if id(p) not in stage_params]
    if outside:
        raise PipelineContractError(
            f"configure_optimizers optimizes parameters outside pipeline_stages(): "
            f"{', '.join(outside[:8])}; every trained parameter must be in a stage")
    for cfg in configs:
        if cfg.reduce_on_plateau and cfg.interval == "step":
            raise PipeOptimConfigError(
                "ReduceLROnPlateau with interval='step' is not supported: the strategy steps "
                "'step' schedulers once per optimizer update inside the pipeline, where no "
                "monitored metric exists; use interval='epoch'")
    return source


def check_scheduler_horizons(schedulers: Sequence[tuple[Any, str, int]], *, remaining_updates:
                             int | float, remaining_epochs: int | float, total_updates: int | float
                             ) -> list[str]:
    """Step copies of the schedulers through the rest of training; fail before it starts.

    Args:
        schedulers: ``(scheduler, interval, frequency)`` of one stage (all stages hold the same).
        remaining_updates: Optimizer updates left in this fit (``interval="step"``).
        remaining_epochs: Epochs left (``interval="epoch"``).
        total_updates: ``trainer.estimated_stepping_batches``, for the message.

    Returns:
        Warnings: schedules whose learning rates all reach 0 well before the end.

    Raises:
        PipeOptimConfigError: a scheduler that cannot make that many steps (``OneCycleLR``
            sized for fewer updates than the training makes).
    """
    from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

    from predictopt.lr_scheduler import future_lrs

    notes: list[str] = []
    for sched, interval, frequency in schedulers:
        if isinstance(sched, ReduceLROnPlateau):
            continue
        left = remaining_updates if interval == "step" else remaining_epochs
        if left == float("inf"):
            continue
        steps = int(left) // max(1, int(frequency))
        name = type(sched).__name__
        unit = "optimizer update" if interval == "step" else "epoch"
        if isinstance(sched, OneCycleLR) and sched.last_epoch + steps > sched.total_steps:
            raise PipeOptimConfigError(
                f"OneCycleLR(total_steps={sched.total_steps}) has made {sched.last_epoch} "
                f"step(s) and cannot make the {steps} more this fit needs (one per {unit}): "
                f"under PipeOptimStrategy an interval='step' scheduler steps once per optimizer "
                f"update, and trainer.estimated_stepping_batches counts them "
                f"({total_updates}); size it with trainer.estimated_stepping_batches")
        if steps == 0 or steps > MAX_PROBED_STEPS:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lrs = future_lrs(sched, steps + 1)  # the lr of every update left, and after
        except Exception as e:  # noqa: BLE001 - any scheduler's own complaint
            raise PipeOptimConfigError(
                f"the LR scheduler {name} (interval={interval!r}) fails within the {steps} "
                f"step(s) this fit makes (one per {unit}; trainer.estimated_stepping_batches = "
                f"{total_updates}): {type(e).__name__}: {e}") from e
        used = list(zip(*lrs))[:steps]  # the lrs of the updates still to come, per group
        nonzero = [j for j, row in enumerate(used) if any(float(v) != 0.0 for v in row)]
        zero_from = nonzero[-1] + 1 if nonzero else 0
        if zero_from < steps - max(1, steps // 100):
            notes.append(
                f"the LR scheduler {name} (interval={interval!r}) sets every learning rate to 0 "
                f"from {unit} {zero_from + 1} of the {steps} left: the rest of training changes "
                f"nothing. Under PipeOptimStrategy an interval='step' scheduler steps once per "
                f"optimizer update; size it with trainer.estimated_stepping_batches "
                f"({total_updates})")
    return notes
