"""Every use of an API of Lightning, torch or predictopt that is private or not meant for this.

Kept in one module, pinned by ``tests/test_lightning.py::test_compat_surface``, so that an
upgrade that breaks one of them fails in one known place:

* Lightning: ``_init_optimizers_and_lr_schedulers`` and ``_MockOptimizer`` (parsing what
  ``configure_optimizers`` returned, as Lightning does), the launcher classes
  ``_MultiProcessingLauncher`` / ``_SubprocessScriptLauncher`` (the strategy checks everything
  in the launching process before they start workers) and the strategy's ``_launcher`` /
  ``_start_method`` that ``_configure_launcher`` (the hook every Lightning strategy overrides)
  sets (:func:`install_launcher`), ``DDPStrategy``'s ``_timeout`` and ``_layer_sync``, a
  module's ``_trainer`` (:func:`trainer_of`, also during teardown after an exception), and
  :func:`count_updates`, which gives the worker's ``Trainer`` a subclass whose
  ``estimated_stepping_batches`` counts optimizer updates (Lightning computes it in the
  ``Trainer`` and asks no strategy).
* predictopt: the schedule facts the strategy needs (canonical name, single- or multi-stage,
  V placement) are read through the public ``SUPPORTED_SCHEDULES``, ``BITPIPE_SCHEDULE`` and
  ``stage_to_rank``; the methods through ``METHODS`` (:func:`pipeline_methods`); BitPipe's
  configuration checks through the private ``_configure`` and ``_copy_workers`` of
  ``predictopt.pipeline.bitpipe`` (:func:`bitpipe_copy_update_every`).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .errors import PipeOptimConfigError

__all__ = ["ScheduleFacts", "bitpipe_copy_update_every", "count_updates", "install_launcher",
           "make_api", "pipeline_methods", "process_group_timeout", "schedule_facts",
           "trainer_of", "uncount_updates", "uses_sync_batchnorm"]


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------


def make_api(package: str) -> SimpleNamespace:
    """The Lightning objects the strategy uses, from ``lightning.pytorch`` or ``pytorch_lightning``.

    Args:
        package: ``"lightning.pytorch"`` or ``"pytorch_lightning"``.
    """

    def mod(name: str) -> Any:
        return importlib.import_module(f"{package}.{name}")

    optim = mod("core.optimizer")
    launchers = mod("strategies.launchers")
    precision = mod("plugins.precision")
    return SimpleNamespace(
        package=package,
        TrainerFn=mod("trainer.states").TrainerFn,
        LightningModule=mod("core.module").LightningModule,
        is_overridden=mod("utilities.model_helpers").is_overridden,
        Precision=precision.Precision,
        MixedPrecision=precision.MixedPrecision,
        # private
        init_optimizers=optim._init_optimizers_and_lr_schedulers,
        MockOptimizer=optim._MockOptimizer,
        SpawnLauncher=launchers._MultiProcessingLauncher,
        ScriptLauncher=launchers._SubprocessScriptLauncher,
    )


def install_launcher(strategy: Any, launcher: Any, start_method: str) -> None:
    """What a strategy's ``_configure_launcher`` must set."""
    strategy._launcher = launcher
    strategy._start_method = start_method


def process_group_timeout(strategy: Any) -> Any:
    """The ``timeout`` a ``DDPStrategy`` was given."""
    return strategy._timeout


def uses_sync_batchnorm(strategy: Any) -> bool:
    """Whether ``Trainer(sync_batchnorm=True)`` gave the ``DDPStrategy`` a layer sync."""
    return getattr(strategy, "_layer_sync", None) is not None


def trainer_of(module: Any) -> Any:
    """The module's Trainer, or ``None`` (without the error ``module.trainer`` raises)."""
    return getattr(module, "_trainer", None) if module is not None else None


_COUNTING: dict[type, type] = {}


def _counting_class(base: type) -> type:
    cls = _COUNTING.get(base)
    if cls is not None:
        return cls
    plain = base.estimated_stepping_batches  # a property of lightning's Trainer

    def estimated_stepping_batches(self: Any) -> int | float:
        """Optimizer updates of every stage during fit: Lightning's steps x updates per step."""
        steps = plain.fget(self)
        per = self.strategy.updates_per_step
        return steps if per == 1 or math.isinf(steps) else steps * per

    cls = type(base.__name__, (base,), {
        "estimated_stepping_batches": property(estimated_stepping_batches),
        "_pipeoptim_base": base,
        "__module__": base.__module__,
        "__doc__": base.__doc__,
    })
    _COUNTING[base] = cls
    return cls


def count_updates(trainer: Any) -> None:
    """Make ``trainer.estimated_stepping_batches`` count optimizer updates (this process only).

    Every Lightning step (one batch) is ``strategy.updates_per_step`` optimizer updates of every
    stage, and ``interval="step"`` schedulers advance once per update; a schedule sized with
    ``trainer.estimated_stepping_batches`` must therefore see the number of updates. Done in the
    worker process (never pickled) and undone by :func:`uncount_updates` at teardown.
    """
    if getattr(type(trainer), "_pipeoptim_base", None) is None:
        trainer.__class__ = _counting_class(type(trainer))


def uncount_updates(trainer: Any) -> None:
    """Undo :func:`count_updates`."""
    base = getattr(type(trainer), "_pipeoptim_base", None)
    if base is not None:
        trainer.__class__ = base


# ---------------------------------------------------------------------------------------------
# predictopt
# ---------------------------------------------------------------------------------------------


def pipeline_methods() -> tuple[str, ...]:
    """The methods the installed ``predictopt.pipeline`` runs in a pipeline.

    ``METHODS`` minus its single-process reference (``"sequential"``, which ``PredictiveStage``
    rejects), unless predictopt publishes the pipeline methods itself (``PIPELINE_METHODS``).
    """
    from predictopt import pipeline

    own = getattr(pipeline, "PIPELINE_METHODS", None)
    if own is not None:
        return tuple(own)
    return tuple(m for m in pipeline.METHODS if m != "sequential")


@dataclass(frozen=True)
class ScheduleFacts:
    """What the strategy needs to know about a schedule.

    Attributes:
        name: Canonical name (an entry of ``predictopt.pipeline.SUPPORTED_SCHEDULES``).
        multi_stage: Whether a device holds several stages.
        v_placement: Whether rank ``r`` holds stages ``r`` and ``2K - 1 - r`` (exactly two).
        bitpipe: Whether it is BitPipe (run by ``BitPipeRuntime``, not a torch schedule; its
            replica ``A`` has the V placement).
    """

    name: str
    multi_stage: bool
    v_placement: bool
    bitpipe: bool = False


def schedule_facts(schedule: Any) -> ScheduleFacts:
    """Resolve a schedule name (case-insensitive) with predictopt's public API.

    Raises:
        PipeOptimConfigError: an unknown name, or a schedule missing from the installed torch.
    """
    from predictopt.pipeline import BITPIPE_SCHEDULE, SUPPORTED_SCHEDULES, stage_to_rank

    accepted = (*SUPPORTED_SCHEDULES, BITPIPE_SCHEDULE)
    names = {s.lower(): s for s in accepted}
    name = names.get(schedule.lower()) if isinstance(schedule, str) else None
    if name is None:
        raise PipeOptimConfigError(f"schedule must be one of {', '.join(accepted)} "
                                   f"(case-insensitive), got {schedule!r}")
    if name == BITPIPE_SCHEDULE:
        return ScheduleFacts(name, True, True, bitpipe=True)
    try:
        default = stage_to_rank(name, 1)  # 1 stage per rank, or 2 for the multi-stage ones
        multi = len(default) > 1
        v = multi and stage_to_rank(name, 2, 2)[3] == 0
    except ValueError as e:  # e.g. missing from the installed torch
        raise PipeOptimConfigError(str(e)) from e
    return ScheduleFacts(name, multi, v)


def bitpipe_copy_update_every(method: Any, num_chunks: int, n_microbatches: int,
                              copy_update_every: int | None) -> int:
    """Check a BitPipe configuration as ``BitPipeRuntime`` will; return one copy's
    ``update_every`` (completed backwards of one copy per update).

    Builds, for every copy of every chunk, the :class:`~predictopt.pipeline.StageWorker` the
    runtime builds (on a stand-in module), so that what the method would reject at the first
    step is rejected here.

    Args:
        method: The pipeline method.
        num_chunks: The chunks (``2K``).
        n_microbatches: Micro-batches per step (half per replica).
        copy_update_every: Completed backwards of one copy per update, or ``None`` (the
            method's).

    Raises:
        ValueError: what ``BitPipeSimulator`` / ``BitPipeRuntime`` reject.
    """
    import torch
    from torch import nn

    from predictopt.pipeline.bitpipe import _configure, _copy_workers

    spec, k, m, u = _configure(method, num_chunks, n_microbatches, copy_update_every)
    probes = {(rep, c): nn.Linear(1, 1) for rep in "AB" for c in range(2 * k)}
    _copy_workers(probes, lambda params: torch.optim.SGD(params, lr=0.0), spec, k, m, u)
    return u
