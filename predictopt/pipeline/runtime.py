r"""Distributed pipeline training with PyTorch's native schedules: :class:`PredictiveStage`.

:class:`PredictiveStage` is a ``torch.distributed.pipelining.PipelineStage`` that trains itself
asynchronously. Each forward runs on the weights its method prescribes (predicted for
``pipeoptim``, ``pipeoptim-lean``, ``spectrain`` and ``xpipe``, stashed for ``pipedream``, the
previous version for ``pipedream-2bw``; ``pipeoptim-lean``'s backward uses the current weights),
and the stage steps its optimizer after every ``update_every``-th completed
backward, inside ``schedule.step()``. The schedule is any of torch's own classes, unchanged::

    stage = PredictiveStage(stage_module, stage_index, num_stages, device,
                            optimizer=torch.optim.AdamW(stage_module.parameters(), lr=1e-3),
                            method="pipeoptim")
    schedule = Schedule1F1B(stage, n_microbatches=16, loss_fn=loss_fn)
    for x, y in loader:
        losses = []
        schedule.step(x, target=y, losses=losses)   # forwards, backwards and updates

How the stage learns its schedule
---------------------------------
The staleness of every micro-batch (the horizon of the prediction) depends on the schedule
class, the number of ranks, the stages per rank, the number of micro-batches and
``update_every`` (:func:`predictopt.pipeline.staleness`). A stage learns them from the schedule
object that drives it, in one of two ways:

* **explicitly**: :func:`attach` ``(schedule)`` right after constructing the schedule (what
  :func:`build_pipeline` does). Every check runs there, before any work.
* **automatically**: importing this module wraps the ``step`` method of torch's schedule
  classes (once, in :func:`_install_step_hooks`, the one place this module touches torch's
  schedules): a call to ``schedule.step(...)`` / ``schedule.eval(...)`` whose schedule holds
  :class:`PredictiveStage` objects first attaches them to that schedule (if they are not
  attached to it yet) and validates the call, then runs torch's own ``step`` unchanged. The
  wrapper passes every argument through as given; it reads only ``target`` (a keyword of
  torch's public ``step``) and tells the model's keyword arguments from the schedule's own by
  the wrapped method's signature. So a plain ``Schedule1F1B(stage, ...)`` needs nothing else.
  A stage driven without a schedule raises a :class:`RuntimeError` at its first forward that
  says to call :func:`attach`.

Attaching identifies the schedule by its class (one of
:data:`~predictopt.pipeline.SUPPORTED_SCHEDULES`, or a subclass that keeps the native action
order), reads the number of micro-batches, the group size and the rank's stage list, checks the
placement of the stages (loop: stage ``s`` on rank ``s % K``; V: rank ``r`` holds ``r`` and
``2K - 1 - r``), verifies the schedule's own action order for this rank against
:func:`predictopt.pipeline.schedule_actions` (multi-stage schedules: their ``pipeline_order``;
single-stage ones: their micro-batch loop must be torch's native one, since that loop *is* the
order), computes the staleness table and builds one :class:`~predictopt.pipeline.StageWorker`
per stage. A stage can be attached to another schedule between steps (another number of
micro-batches, another batch size): its optimizer state carries over.

Each step is also validated before any communication on the ranks that see data: the batch
(rank of stage 0) and the target (rank of the last stage) must split into ``n`` equal
micro-batches, keep their shapes between consecutive steps of the same mode and schedule (torch
sizes its receive buffers from a schedule's first step) and the target must be given when the
schedule has a loss function.

Failures
--------
If ``schedule.step()`` raises on a rank (a ``loss_fn`` that raises, a peer that died), the
stages of that rank drop what the step left in flight (:meth:`StageWorker.abort_step`) and log,
at ``WARNING``, which micro-batches were dropped and how many updates the step had applied
already (those stay applied); the next ``step()`` runs normally.

Random operations and threads
-----------------------------
Dropout and other random operations in a stage's forward draw from a stream seeded by the
process's seed, the stage, the step and the micro-batch (:class:`StageWorker`), so a run in
which every process called ``torch.manual_seed`` with the same value reproduces the simulator,
dropout included. The equality also needs the same number of intra-op threads in every process
and in the simulator (CPU reductions split work by thread count and round differently):
:func:`check_determinism` compares the ranks' settings and warns when they differ (
:func:`build_pipeline` calls it).

Equivalence
-----------
Every stage's weights depend only on its own rank's action order, which is the order
:class:`~predictopt.pipeline.PipelineSimulator` uses for that stage, so for the same initial
weights, optimizers, micro-batches and loss function a distributed run reproduces the
simulator bit for bit (tested with ``torch.equal`` for every schedule).

Gradient scaling
----------------
The worker averages the gradients of the ``update_every`` micro-batches an update covers, so
the loss function should be a per-micro-batch mean. The schedule's ``scale_grads`` is harmless:
:meth:`PredictiveStage.scale_grads` is a no-op (the stage's gradients are applied and cleared
before the schedule would scale them), so ``scale_grads=True`` and ``False`` train identically.

Faults
------
:func:`init_distributed` initialises the process group with a bounded timeout
(:data:`DEFAULT_TIMEOUT_S` unless given): when a rank dies its peers fail at once with a gloo
"connection closed" error, and when a rank hangs they fail after the timeout, instead of
waiting forever (gloo's own default is 30 minutes).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _PipelineSchedule,
)
from torch.optim import Optimizer

from ..optimizer import PredictiveOptimizer
from .methods import DEFAULT_METHOD, Method, get_method
from .schedules import (
    _all_infos,
    _convert_torch_action,
    _resolve_schedule,
    schedule_actions,
    stage_to_rank,
    staleness,
)
from .semantics import StageWorker

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PredictiveStage",
    "attach",
    "build_pipeline",
    "check_determinism",
    "init_distributed",
    "schedule_name",
]

#: Default timeout, in seconds, of the process group created by :func:`init_distributed`.
DEFAULT_TIMEOUT_S: float = 120.0

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def init_distributed(
    backend: str = "gloo",
    *,
    timeout: float | datetime.timedelta = DEFAULT_TIMEOUT_S,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    store: dist.Store | None = None,
) -> tuple[int, int]:
    """Initialise the default process group with a bounded timeout; return ``(rank, world)``.

    Reads ``RANK`` / ``WORLD_SIZE`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) from the
    environment as ``torchrun`` sets them, unless ``rank`` / ``world_size`` / ``init_method`` /
    ``store`` are given. Does nothing but return the rank and size if a group exists already.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout: Seconds (or a ``timedelta``) after which a blocked send, receive or
            collective raises instead of waiting for a peer that hangs. A peer that dies is
            detected at once (its sockets close).
        rank: This process's rank (default ``$RANK``).
        world_size: Number of processes (default ``$WORLD_SIZE``).
        init_method: Passed to ``init_process_group`` (default ``env://``).
        store: A ``torch.distributed.Store`` to rendezvous with instead of ``init_method``.

    Raises:
        ValueError: a non-positive timeout, or no rank / world size given or in the environment.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    td = timeout if isinstance(timeout, datetime.timedelta) else \
        datetime.timedelta(seconds=float(timeout))
    if td.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    rank = int(os.environ["RANK"]) if rank is None and "RANK" in os.environ else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None and \
        "WORLD_SIZE" in os.environ else world_size
    if rank is None or world_size is None:
        raise ValueError("rank and world_size must be given or set in the environment "
                         "(RANK, WORLD_SIZE: launch with torchrun)")
    kw: dict[str, Any] = {"rank": rank, "world_size": world_size, "timeout": td}
    if store is not None:
        kw["store"] = store
    elif init_method is not None:
        kw["init_method"] = init_method
    dist.init_process_group(backend, **kw)
    return rank, world_size


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def _schedule_stages(schedule: Any) -> list[Any]:
    if isinstance(schedule, PipelineScheduleSingle):
        return [schedule._stage]
    if isinstance(schedule, PipelineScheduleMulti):
        return list(schedule._stages)
    raise TypeError(f"expected a torch.distributed.pipelining schedule, got {type(schedule)!r}")


def schedule_name(schedule: Any) -> str:
    """The :data:`~predictopt.pipeline.SUPPORTED_SCHEDULES` name of a torch schedule object.

    The class must be one of torch's native schedule classes, one of predictopt's action-list
    classes (:mod:`~predictopt.pipeline.action_schedule`: ``ScheduleZBH1``, ``ScheduleZBH2``,
    registered schedules), or a subclass of one (the action order is checked against the
    native one when the stage attaches).

    Raises:
        TypeError: not a torch pipeline schedule.
        ValueError: a schedule class predictopt does not handle (e.g. a custom
            ``_PipelineScheduleRuntime`` loaded from a CSV).
    """
    if not isinstance(schedule, _PipelineSchedule):
        raise TypeError(f"expected a torch.distributed.pipelining schedule, got "
                        f"{type(schedule)!r}")
    classes = []
    for info in _all_infos():  # torch's classes, predictopt's action lists, registered ones
        try:
            _, cls = _resolve_schedule(info.name)
        except ValueError:  # not in the installed torch
            continue
        if type(schedule) is cls:
            return info.name
        classes.append((info.name, cls))
    for name, cls in classes:
        if isinstance(schedule, cls):
            return name
    names = ", ".join(info.class_name for info in _all_infos())
    raise ValueError(f"PredictiveStage cannot run under {type(schedule).__name__}: its staleness "
                     f"table is known for these schedule classes only ({names})")


def _native_order(schedule: Any, rank: int) -> list[Any] | None:
    """The compute actions the schedule object will run on ``rank`` (multi-stage schedules)."""
    order = getattr(schedule, "pipeline_order_with_comms", None) or getattr(
        schedule, "pipeline_order", None)
    if not isinstance(schedule, PipelineScheduleMulti) or not order or rank not in order:
        return None  # single-stage schedules: the runtime loop is the order (schedules.py)
    acts: list[Any] = []
    for a in order[rank]:
        acts.extend(_convert_torch_action(a))
    return acts


def attach(schedule: Any) -> list[PredictiveStage]:
    """Attach the :class:`PredictiveStage` objects of a torch schedule to it, checking everything.

    Call it right after constructing the schedule to get every configuration error before any
    work (the stages also attach themselves at the start of the first ``schedule.step()``).
    Re-attaching a stage to another schedule between steps is allowed (its optimizer state,
    and the previous weights of ``pipedream-2bw``, carry over).

    Args:
        schedule: A torch schedule object (``Schedule1F1B(stage, ...)``, ...) whose stages on
            this rank are :class:`PredictiveStage`.

    Returns:
        This rank's stages, in the schedule's order.

    Raises:
        TypeError: not a schedule, or stages on this rank that are not all
            :class:`PredictiveStage`.
        ValueError: an unsupported schedule class, a schedule missing from the installed torch,
            a wrong stage placement, a number of stages that does not match the group size,
            an ``update_every`` the method does not accept, or a configuration the method
            cannot run (e.g. ``pipedream-2bw`` with staleness ``>= 2``).
        RuntimeError: a stage with micro-batches in flight, or a schedule whose action order
            differs from the native one.
    """
    name = schedule_name(schedule)
    stages = _schedule_stages(schedule)
    if not all(isinstance(s, PredictiveStage) for s in stages):
        kinds = ", ".join(type(s).__name__ for s in stages)
        raise TypeError(f"every stage of this rank must be a PredictiveStage to attach; the "
                        f"schedule holds {kinds}")
    n = _n_microbatches(schedule)
    first = stages[0]
    k_ranks, rank, num_stages = first.group_size, first.group_rank, first.num_stages
    spr = len(stages)
    if any(s.num_stages != num_stages for s in stages):
        raise ValueError("the stages of this rank disagree on num_stages")
    if num_stages != k_ranks * spr:
        raise ValueError(
            f"{name} with {spr} stage(s) per rank on a group of {k_ranks} ranks runs "
            f"{k_ranks * spr} stages, but the stages say num_stages={num_stages}")
    placement = stage_to_rank(name, k_ranks, spr)
    expected = sorted(k for k, r in placement.items() if r == rank)
    held = [s.stage_index for s in stages]
    if sorted(held) != expected:
        style = "V" if name in ("ZBVZeroBubble", "DualPipeV") else "loop"
        raise ValueError(
            f"{name} ({style} placement) puts stages {expected} on rank {rank} of {k_ranks}, "
            f"but this rank holds stages {held}; see predictopt.pipeline.stage_to_rank"
            f"({name!r}, {k_ranks}, {spr})")
    _, native = _resolve_schedule(name)
    if isinstance(schedule, PipelineScheduleSingle) and not _own_loop(schedule, native):
        raise ValueError(
            f"{type(schedule).__name__} overrides the micro-batch loop of torch's "
            f"{native.__name__}: PredictiveStage cannot verify the order of its actions, so the "
            f"staleness table could be wrong. Use {native.__name__}'s own loop, or another "
            "native schedule")
    own = _native_order(schedule, rank)
    derived = schedule_actions(name, k_ranks, n, stages_per_rank=spr)[rank]
    if own is not None and own != derived:
        raise RuntimeError(
            f"the action order of this {type(schedule).__name__} on rank {rank} differs from "
            f"torch's native {name} order, so the staleness table would be wrong "
            f"(got {' '.join(map(str, own[:12]))} ..., expected "
            f"{' '.join(map(str, derived[:12]))} ...)")
    for s in stages:
        s._attach(schedule, name, k_ranks, spr, n)
    return stages


# ---------------------------------------------------------------------------------------------
# Torch access: every use of a torch schedule's private members is in this section
# ---------------------------------------------------------------------------------------------


def _n_microbatches(schedule: Any) -> int:
    return int(schedule._n_microbatches)


def _loss_fn(schedule: Any) -> Any:
    return schedule._loss_fn


def _training(schedule: Any) -> bool:
    return bool(schedule._has_backward)


def _splits_inputs_itself(schedule: Any) -> bool:
    """Whether the user gave torch custom chunk specs (then torch's split is not ours to
    check)."""
    return schedule._args_chunk_spec is not None or schedule._kwargs_chunk_spec is not None


def _own_loop(schedule: Any, native: type) -> bool:
    """Whether a single-stage schedule runs torch's native micro-batch loop (its order)."""
    return type(schedule)._step_microbatches is native._step_microbatches


def _forget_failed_step(schedule: Any) -> None:
    """Drop what a failed ``step`` left in the schedule (the losses it collected so far)."""
    losses = getattr(schedule, "_internal_losses", None)
    if isinstance(losses, list):
        losses.clear()


_HOOKED: dict[type, Any] = {}


def _hooked(orig: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(orig)
    own = {name for name, p in sig.parameters.items()
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"}

    @functools.wraps(orig)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            stages = [st for st in _schedule_stages(self) if isinstance(st, PredictiveStage)]
        except TypeError:
            stages = []
        if not stages or getattr(self, "_predictopt_in_step", False):
            return orig(self, *args, **kwargs)
        model_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        for st in stages:
            st._begin_call(self, args, model_kwargs, kwargs.get("target"))
        self._predictopt_in_step = True
        try:
            return orig(self, *args, **kwargs)
        except BaseException as exc:
            _forget_failed_step(self)
            for st in stages:
                st._abort_call(exc)
            raise
        finally:
            self._predictopt_in_step = False
            for st in stages:
                st._end_call()

    step.__predictopt_hook__ = orig  # type: ignore[attr-defined]
    return step


def _install_step_hooks() -> None:
    """Wrap ``step`` of every torch schedule class that defines one (idempotent)."""
    todo = [_PipelineSchedule]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        own = cls.__dict__.get("step")
        if own is None or cls in _HOOKED or getattr(own, "__predictopt_hook__", None):
            continue
        _HOOKED[cls] = own
        cls.step = _hooked(own)


# ---------------------------------------------------------------------------------------------
# PredictiveStage
# ---------------------------------------------------------------------------------------------


def _check_output(out: Any, stage_index: int) -> None:
    if isinstance(out, Tensor):
        return
    if type(out) in (tuple, list) and out and all(isinstance(t, Tensor) for t in out):
        return
    what = type(out).__name__
    if type(out) in (tuple, list):
        what += " of " + ", ".join(type(t).__name__ for t in out) if out else " (empty)"
    raise TypeError(f"stage {stage_index} must return a Tensor or a tuple of Tensors (what "
                    f"torch's pipeline sends between stages), got {what}")


def _tensor_leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensor_leaves(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensor_leaves(o)]
    return []


_WARNED_SLOW: list[bool] = []


def _warn_if_per_tensor_loop(optimizer: Optimizer, updates_per_step: int) -> None:
    """Warn once per process when a stage that updates more than once per step runs torch's
    per-tensor CPU implementation (neither ``fused`` nor ``foreach`` asked for)."""
    if _WARNED_SLOW or updates_per_step <= 1:
        return
    groups = optimizer.param_groups
    on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
    has_flags = all("foreach" in g for g in groups)
    if on_cpu and has_flags and not any(g.get("fused") or g.get("foreach") for g in groups):
        _WARNED_SLOW.append(True)
        warnings.warn(
            f"{type(optimizer).__name__} runs torch's per-tensor loop on CPU, and this stage "
            f"updates {updates_per_step} times per step: pass fused=True (or foreach=True) to "
            "the optimizer for a multi-tensor kernel (docs: Pipeline runtime, Cost)",
            stacklevel=3)


def _resolve_update_every(spec: Method, update_every: int | None, num_stages: int,
                          n: int) -> int:
    if update_every is None:
        return spec.cadence.default(num_stages, n)
    return spec.cadence.check(update_every, num_stages, n, spec.name)


class PredictiveStage(PipelineStage):
    r"""A ``PipelineStage`` that trains itself with a pipeline method inside ``schedule.step()``.

    Drop-in for ``torch.distributed.pipelining.PipelineStage`` under torch's native schedules
    (``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``, ``ScheduleLoopedBFS``,
    ``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``) and
    predictopt's action lists run by torch (``ScheduleZBH1``, ``ScheduleZBH2``, registered
    ones; :mod:`~predictopt.pipeline.action_schedule`),
    including several stages per rank and the I/W split of the zero-bubble schedules. It
    overrides ``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``
    to call a :class:`~predictopt.pipeline.StageWorker`: forwards run on the method's weights
    (through ``torch.func.functional_call``; the module's parameters always hold the real
    weights) and the stage steps ``optimizer`` after every ``update_every``-th completed
    backward. Do not call ``optimizer.step()`` or ``zero_grad()`` yourself (both would be
    harmless no-ops between steps: the gradients are already applied and cleared).

    ``schedule.eval(...)`` runs the real weights under ``torch.no_grad()`` and does not touch
    the optimizer. The module's ``state_dict`` holds the real weights between steps;
    :meth:`state_dict` / :meth:`load_state_dict` bundle it with the optimizer's for an exact
    resume.

    Args:
        submodule: The stage's module (not wrapped in DDP/FSDP).
        stage_index: Global index of the stage (0 = first).
        num_stages: Total number of stages.
        device: The device the stage runs on (the module must be there already).
        optimizer: A ``torch.optim.Optimizer`` over (some of) ``submodule``'s parameters, or a
            :class:`~predictopt.PredictiveOptimizer` (then its rule and scheduler are used).
        method: A registered method name (:func:`~predictopt.pipeline.available_methods`;
            default :data:`~predictopt.pipeline.DEFAULT_METHOD`) or a
            :class:`~predictopt.pipeline.methods.Method` (see the "Methods" page). The
            single-process reference ``"sequential"`` and the methods of the ``PB`` schedule
            are rejected.
        update_every: Completed backwards per update; default
            :func:`~predictopt.pipeline.default_update_every` for the method (1 for the
            per-micro-batch methods, ``n`` for ``gpipe``). Only methods with a window cadence
            (``pipedream-2bw``, ``xpipe``) accept other values.
        rule: Prediction rule overriding the method's (predicting methods only).
        horizons: Per micro-batch prediction horizons overriding the staleness table
            (predicting methods only; one entry per micro-batch).
        **stage_kwargs: Passed to ``PipelineStage`` (``input_args``, ``output_args``,
            ``group``, ...). ``dw_builder`` is not supported.

    Attributes:
        method: The method.
        optimizer: The optimizer given.
        worker: The :class:`~predictopt.pipeline.StageWorker` (``None`` until attached).
        schedule_info: ``(schedule name, num_ranks, stages_per_rank, n_microbatches,
            update_every)`` once attached, else ``None``.

    Raises:
        ValueError: an unknown or unsupported method, a bad ``update_every``, or ``dw_builder``.
        TypeError: ``optimizer`` is not an optimizer, or the module is wrapped in DDP/FSDP.
    """

    def __init__(
        self,
        submodule: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device | str,
        *,
        optimizer: Optimizer,
        method: str | Method = DEFAULT_METHOD,
        update_every: int | None = None,
        rule: Any = None,
        horizons: Sequence[int] | None = None,
        **stage_kwargs: Any,
    ) -> None:
        spec = get_method(method)
        if spec.staleness_free:
            raise ValueError(f"method {spec.name!r} is the single-process reference (no "
                             "pipeline); use predictopt.pipeline.PipelineSimulator for it")
        if spec.schedules is not None:
            raise ValueError(f"method {spec.name!r} runs on schedule "
                             f"{', '.join(spec.schedules)} only, which torch does not provide")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        if stage_kwargs.get("dw_builder") is not None:
            raise ValueError("dw_builder is not supported: the stage computes the weight "
                             "gradients itself")
        if update_every is not None and (isinstance(update_every, bool) or not isinstance(
                update_every, int) or update_every < 1):
            raise ValueError(f"update_every must be None or an int >= 1, got {update_every!r}")
        wrapped = type(submodule).__name__ in ("DistributedDataParallel",) or any(
            c.__name__ in ("FSDPModule", "FullyShardedDataParallel")
            for c in type(submodule).__mro__)
        if wrapped:
            raise TypeError("PredictiveStage runs the module through functional_call, which "
                            "bypasses DDP/FSDP; pass the bare stage module")
        # what can be checked before the schedule is known, is checked now
        if update_every is not None:
            if spec.cadence.kind == "microbatch" and update_every != 1:
                raise ValueError(f"update_every must be 1 for method {spec.name!r} (one update "
                                 f"per micro-batch), got {update_every}")
            if spec.cadence.at_least_stages and update_every < num_stages:
                raise ValueError(f"update_every must be >= the number of stages ({num_stages}) "
                                 f"for method {spec.name!r} (or n_microbatches), got "
                                 f"{update_every}")
        if (rule is not None or horizons is not None) and not spec.predicts:
            raise ValueError(f"rule and horizons apply to predicting methods only, not to "
                             f"method {spec.name!r}")
        own = {id(p): name for name, p in submodule.named_parameters()}
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in own:
                    raise ValueError(
                        f"stage {stage_index}: the optimizer's parameter group {gi}, tensor {pi} "
                        f"(shape {tuple(p.shape)}) is not a parameter of the stage's module")
        super().__init__(submodule, stage_index, num_stages, torch.device(device),
                         **stage_kwargs)
        self.spec: Method = spec
        self.method: str = spec.name
        self.optimizer = optimizer
        self._update_every_arg = update_every
        self._rule = rule
        self._horizons = None if horizons is None else list(horizons)
        self.worker: StageWorker | None = None
        self.schedule_info: tuple[str, int, int, int, int] | None = None
        self._schedule_ref: Callable[[], Any] | None = None
        self._pending_previous: list[Tensor] | None = None
        self._pending_transform_state: dict[Tensor, dict[str, Any]] = {}
        #: ``fn(worker)`` run after every update of this stage (kept across re-attaches; see
        #: :attr:`StageWorker.after_update`).
        self.after_update_hooks: list[Callable[[StageWorker], None]] = []
        self._last_shapes: dict[str, tuple[int, bool, Any]] = {}
        self._in_call = False
        self._updates_at_begin = 0
        self._split_outputs: dict[int, tuple[Tensor, ...]] = {}
        self._buffer_snapshot: list[tuple[Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------ attaching
    @property
    def schedule(self) -> Any:
        """The schedule the stage is attached to (``None`` before)."""
        return self._schedule_ref() if self._schedule_ref is not None else None

    def _attach(self, schedule: Any, name: str, k_ranks: int, spr: int, n: int) -> None:
        if self._schedule_ref is not None and self._schedule_ref() is schedule:
            return
        previous = self._pending_previous
        state = self._pending_transform_state
        if self.worker is not None:
            if self.worker.in_flight:
                raise RuntimeError(f"stage {self.stage_index}: cannot attach to another schedule "
                                   f"with micro-batches {self.worker.in_flight} in flight")
            previous = self.worker.previous_version
            state = self.worker.transform_state
        u = _resolve_update_every(self.spec, self._update_every_arg, self.num_stages, n)
        table = staleness(name, k_ranks, n, stages_per_rank=spr, update_every=u)
        if self._horizons is not None and len(self._horizons) != n:
            raise ValueError(f"horizons must hold one entry per micro-batch ({n}), got "
                             f"{len(self._horizons)}")
        self.worker = StageWorker(
            self.submod, self.optimizer, method=self.spec,
            staleness=table[self.stage_index], update_every=u, rule=self._rule,
            horizons=self._horizons, input_grads=not self.is_first,
            stage=self.stage_index, num_stages=self.num_stages,
        )
        # a method may convert the optimizer (Spike Compensation, Nesterov): keep the converted
        # one, so that checkpoints and a later re-attach see its state
        if not isinstance(self.optimizer, PredictiveOptimizer):
            self.optimizer = self.worker.optimizer.optimizer
        _warn_if_per_tensor_loop(self.worker.optimizer.optimizer, n // u)
        if previous is not None:
            self.worker.previous_version = previous
        self.worker.transform_state.update(state)
        self.worker.after_update = self.after_update_hooks
        self._pending_previous = None
        self._pending_transform_state = {}
        self._last_shapes.clear()  # torch sizes the new schedule's buffers at its first step
        self.schedule_info = (name, k_ranks, spr, n, u)
        self._schedule_ref = weakref.ref(schedule)

    def _require_worker(self) -> StageWorker:
        if self.worker is None:
            raise RuntimeError(
                f"PredictiveStage {self.stage_index} does not know its schedule. It attaches "
                "itself at the start of schedule.step(); if you drive the stage from your own "
                "code, call predictopt.pipeline.runtime.attach(schedule) first")
        return self.worker

    def clear_runtime_states(self) -> None:
        """Per-step reset (torch's, and of the split backward's outputs)."""
        super().clear_runtime_states()
        self._split_outputs.clear()

    # ------------------------------------------------------------------ schedule calls
    def _begin_call(self, schedule: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                    target: Any) -> None:
        """Called by the ``step`` hook before torch's ``step``/``eval`` runs (no communication
        has happened yet): attach if needed, then validate the call."""
        if _loss_fn(schedule) is not None and self.schedule is not schedule:
            attach(schedule)
        self._check_step_inputs(schedule, args, kwargs, target)
        self._in_call = True
        self._updates_at_begin = self.worker.num_updates if self.worker is not None else 0

    def _end_call(self) -> None:
        self._in_call = False

    def _abort_call(self, exc: BaseException) -> None:
        """The step failed on this rank: drop its in-flight state so the next step can run."""
        self._split_outputs.clear()
        if self.worker is None:
            return
        applied = self.worker.num_updates - self._updates_at_begin
        info = self.worker.abort_step()
        if applied or info["in_flight"] or info["accumulated"]:
            _log.warning(
                "stage %d: schedule.step() failed (%s: %s); dropped micro-batches %s in flight "
                "and the gradients of %d completed backward(s); the %d update(s) this step had "
                "applied stay applied", self.stage_index, type(exc).__name__, exc,
                info["in_flight"], info["accumulated"], applied)

    def _check_step_inputs(self, schedule: Any, args: tuple[Any, ...],
                           kwargs: Mapping[str, Any], target: Any) -> None:
        n = _n_microbatches(schedule)
        training = _training(schedule)
        mode = "step" if training else "eval"
        sizes: dict[str, int] = {}
        shapes: dict[str, tuple[Any, ...]] = {}
        if self.is_first:
            tensors = _tensor_leaves(args) + _tensor_leaves(dict(kwargs))
            if not tensors:
                raise ValueError(f"the rank holding stage 0 must pass the batch to "
                                 f"schedule.{mode}(...), got no tensor")
            if not _splits_inputs_itself(schedule):
                for t in tensors:
                    b = t.shape[0] if t.ndim else 0
                    if b == 0 or b % n:
                        raise ValueError(f"the batch size ({b}) must be a positive multiple of "
                                         f"n_microbatches ({n}): torch would split it into "
                                         "unequal micro-batches")
                    sizes.setdefault("input", b)
                shapes["input"] = tuple(tuple(t.shape) for t in tensors)
        if self.is_last and _loss_fn(schedule) is not None:
            if not isinstance(target, Tensor):
                raise ValueError(f"the rank holding the last stage ({self.stage_index}) must pass "
                                 f"target=... to schedule.{mode}(...) (the schedule has a "
                                 f"loss_fn); got {type(target).__name__}")
            b = target.shape[0] if target.ndim else 0
            if b == 0 or b % n:
                raise ValueError(f"the target's batch size ({b}) must be a positive multiple of "
                                 f"n_microbatches ({n})")
            sizes["target"] = b
            shapes["target"] = (tuple(target.shape),)
        if "input" in sizes and "target" in sizes and sizes["input"] != sizes["target"]:
            raise ValueError(f"the batch ({sizes['input']}) and the target "
                             f"({sizes['target']}) have different batch sizes")
        key_of = id(schedule)
        for key, new in shapes.items():
            last = self._last_shapes.get(key)
            if last is not None and last[:2] == (key_of, training) and last[2] != new:
                raise ValueError(
                    f"the {key} shapes changed between steps ({list(last[2])} -> {list(new)}): "
                    "torch sizes a schedule's receive buffers from its first step, so every "
                    "step of one schedule object must use the same batch size and shapes "
                    "(build a new schedule for other shapes)")
        for key, new in shapes.items():  # recorded only once the step is accepted
            self._last_shapes[key] = (key_of, training, new)

    # ------------------------------------------------------------------ metadata inference
    def _prepare_forward_infra(self, num_microbatches, args, kwargs=None, has_backward=False):
        # Shape inference runs the real module once (on placeholder inputs for inner stages):
        # keep its buffers (e.g. BatchNorm statistics) as they were.
        if self._buffer_snapshot is None:
            self._buffer_snapshot = [(b, b.detach().clone()) for b in self.submod.buffers()]
        return super()._prepare_forward_infra(num_microbatches, args, kwargs, has_backward)

    def _compute_outputs(self, *args: Tensor, module: nn.Module, **kwargs: Any) -> Any:
        out = super()._compute_outputs(*args, module=module, **kwargs)
        _check_output(out, self.stage_index)
        return out

    def _post_metadata_inference_cleanup(self) -> None:
        super()._post_metadata_inference_cleanup()
        if self._buffer_snapshot is not None:
            with torch.no_grad():
                for b, saved in self._buffer_snapshot:
                    b.copy_(saved)
            self._buffer_snapshot = None

    # ------------------------------------------------------------------ compute actions
    def forward_one_chunk(
        self,
        fwd_chunk_id: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        save_forward_output: bool = True,
    ) -> Any:
        """Forward one micro-batch on the method's weights (training) or the real ones (eval).

        Raises:
            RuntimeError: the stage is neither attached to a schedule nor called by one.
        """
        if not self.has_backward:
            if self.worker is None and not self._in_call:
                self._require_worker()
            with torch.no_grad():
                return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        worker = self._require_worker()
        inputs = args if self.is_first else self._retrieve_recv_activations(fwd_chunk_id)
        kw = kwargs or {}
        output = worker.forward(fwd_chunk_id, *inputs, **kw)
        _check_output(output, self.stage_index)
        output_tuple = tuple(output) if type(output) in (tuple, list) else (output,)
        if self.is_last and save_forward_output:
            self.output_chunks.append(output)
        self.fwd_cache[fwd_chunk_id] = (output_tuple, list(_tensor_leaves(inputs)))
        return output

    def backward_one_chunk(
        self,
        bwd_chunk_id: int,
        loss: Tensor | None = None,
        full_backward: bool = True,
        last_backward: bool = False,
    ) -> None:
        """Backward (``B``) or its input half (``I``) of one micro-batch; ``B`` may update."""
        if not self.has_backward:
            return
        self._check_chunk_id(bwd_chunk_id)
        worker = self._require_worker()
        stage_output, _ = self.fwd_cache.pop(bwd_chunk_id)
        if self.is_last:
            if loss is None:
                raise RuntimeError(f"stage {self.stage_index} (last) got no loss for micro-batch "
                                   f"{bwd_chunk_id}: the schedule needs loss_fn and a target")
            kw: dict[str, Any] = {"loss": loss}
        else:
            kw = {"grad_output": self._retrieve_recv_grads(bwd_chunk_id)}
        if full_backward:
            grads = worker.backward(bwd_chunk_id, **kw)
        else:
            grads = worker.backward_input(bwd_chunk_id, **kw)
        metas = self._stage_meta.inputs
        num_args = len(metas) if metas is not None else len(grads)
        self.bwd_cache[bwd_chunk_id] = tuple(grads[:num_args])
        if self.is_last and not self.is_first:
            if full_backward:
                self._release(stage_output)
            else:
                self._split_outputs[bwd_chunk_id] = stage_output

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        """Weight half (``W``) of a split backward; completes it and may update."""
        if not self.has_backward:
            return
        self._require_worker().backward_weight(bwd_chunk_id)
        out = self._split_outputs.pop(bwd_chunk_id, None)
        if out is not None:
            self._release(out)

    # torch 2.13's runtime still walks the backward actions of a V schedule under eval() and
    # passes "gradients" between the two stages of a rank, which asserts has_backward: make
    # that hand-over a no-op in eval so schedule.eval() works under ZBVZeroBubble / DualPipeV.
    def get_local_bwd_output(self, mb_index: int) -> Any:
        if not self.has_backward:
            return ()
        return super().get_local_bwd_output(mb_index)

    def set_local_bwd_input(self, next_stage_bwd_outputs: Any, mb_index: int) -> None:
        if not self.has_backward:
            return
        super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    @staticmethod
    def _release(outputs: Iterable[Tensor]) -> None:
        # As torch does: the last stage's outputs are only kept to be returned; drop the graph.
        for t in outputs:
            if isinstance(t, Tensor) and not t._is_view():
                t.detach_()

    def scale_grads(self, grad_scale_factor: int) -> None:
        """No-op: the worker averages each update's micro-batch gradients itself.

        The gradients are applied and cleared by the time a schedule calls this, so
        ``scale_grads=True`` and ``False`` train identically.
        """

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The stage's checkpoint: module (real weights), optimizer and method state.

        Take it between steps. ``{"module": ..., "optimizer": ..., "method": ...,
        "previous": ...}``; ``previous`` is the version before the last update
        (``pipedream-2bw``) or ``None``. For every other method the module's and the
        optimizer's own ``state_dict`` are enough to resume bit for bit.

        Raises:
            RuntimeError: micro-batches in flight (called inside a step).
        """
        previous = None
        if self.worker is not None:
            if self.worker.in_flight:
                raise RuntimeError("state_dict() must be called between steps")
            previous = self.worker.previous_version
        elif self._pending_previous is not None:
            previous = self._pending_previous
        return {
            "module": self.submod.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method,
            "previous": None if previous is None else [t.detach().clone() for t in previous],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (between steps, or before the first one).

        Raises:
            ValueError: a checkpoint of another method.
        """
        if state_dict.get("method") != self.method:
            raise ValueError(f"checkpoint of method {state_dict.get('method')!r} cannot be "
                             f"loaded into a {self.method!r} stage")
        self.submod.load_state_dict(state_dict["module"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        previous = state_dict.get("previous")
        previous = None if previous is None else [t.detach().clone() for t in previous]
        if self.worker is not None:
            if self.worker.in_flight:
                raise RuntimeError("load_state_dict() must be called between steps")
            self.worker.previous_version = previous
        else:
            self._pending_previous = previous

    def __repr__(self) -> str:
        return (f"PredictiveStage(stage_index={self.stage_index}, num_stages={self.num_stages}, "
                f"method={self.method!r}, schedule={self.schedule_info})")


# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------


def build_pipeline(
    stage_modules: Sequence[nn.Module] | Callable[[int], nn.Module],
    schedule: str = "1F1B",
    *,
    rank: int | None = None,
    world_size: int | None = None,
    n_microbatches: int,
    make_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],
    method: str | Method = DEFAULT_METHOD,
    loss_fn: Callable[..., Tensor] | None,
    device: torch.device | str = "cpu",
    update_every: int | None = None,
    stages_per_rank: int | None = None,
    rule: Any = None,
    group: dist.ProcessGroup | None = None,
    **schedule_kwargs: Any,
) -> tuple[list[PredictiveStage], Any]:
    """Create this rank's :class:`PredictiveStage` objects and torch's native schedule over them.

    Stages are placed as the schedule expects (:func:`~predictopt.pipeline.stage_to_rank`:
    loop placement, or V placement for ``ZBVZeroBubble`` / ``DualPipeV``), moved to
    ``device``, given an optimizer each, and the schedule is built with ``scale_grads=False``
    and attached (every check runs here, before any communication).

    Args:
        stage_modules: All stage modules in model order (only this rank's are used), or
            ``build(stage_index) -> nn.Module`` called for this rank's stages only.
        schedule: A name of :data:`~predictopt.pipeline.SUPPORTED_SCHEDULES`
            (case-insensitive).
        rank: This rank in ``group`` (default: the group's rank).
        world_size: Number of pipeline ranks (default: the group's size).
        n_microbatches: Micro-batches per ``schedule.step()``.
        make_optimizer: ``make_optimizer(params) -> Optimizer``, once per local stage.
        method: See :class:`PredictiveStage`.
        loss_fn: ``loss_fn(output, target) -> scalar`` (a per-micro-batch mean), or ``None``
            for a forward-only pipeline.
        device: Device of this rank's stages.
        update_every: See :class:`PredictiveStage`.
        stages_per_rank: Default 1 for single-stage schedules, 2 for the others.
        rule: Prediction rule overriding the method's.
        group: Process group (default: the default group).
        **schedule_kwargs: More arguments of the torch schedule class.

    Returns:
        ``(stages, schedule)``: the local stages sorted by stage index and the torch schedule
        object (``schedule.step(x, target=y, losses=losses)``).

    Raises:
        ValueError: unknown schedule, schedule missing from the installed torch (naming the
            release that has it), rank / world size that disagree with the group, wrong number
            of stage modules, or anything :func:`attach` rejects.
    """
    info, cls = _resolve_schedule(schedule)
    name = info.name
    if not dist.is_initialized():
        raise RuntimeError("initialise the process group first (predictopt.pipeline.runtime."
                           "init_distributed() or torch.distributed.init_process_group)")
    g_rank, g_size = dist.get_rank(group), dist.get_world_size(group)
    if rank is not None and rank != g_rank:
        raise ValueError(f"rank={rank} but this process is rank {g_rank} of the group")
    if world_size is not None and world_size != g_size:
        raise ValueError(f"world_size={world_size} but the group has {g_size} ranks")
    placement = stage_to_rank(name, g_size, stages_per_rank)
    num_stages = len(placement)
    if not callable(stage_modules):
        if isinstance(stage_modules, nn.Module) or not isinstance(stage_modules, Sequence):
            raise ValueError("stage_modules must be a sequence of nn.Module or a callable")
        if len(stage_modules) != num_stages:
            raise ValueError(f"{name} on {g_size} ranks with {num_stages // g_size} stage(s) per "
                             f"rank needs {num_stages} stage modules, got {len(stage_modules)}")
    local = sorted(k for k, r in placement.items() if r == g_rank)
    stages: list[PredictiveStage] = []
    for k in local:
        module = stage_modules(k) if callable(stage_modules) else stage_modules[k]
        if not isinstance(module, nn.Module):
            raise ValueError(f"stage module {k} is not an nn.Module: {type(module)!r}")
        module = module.to(device)
        stages.append(PredictiveStage(
            module, k, num_stages, device, optimizer=make_optimizer(module.parameters()),
            method=method, update_every=update_every, rule=rule, group=group))
    schedule_kwargs.setdefault("scale_grads", False)
    target = stages[0] if len(stages) == 1 and not issubclass(cls, PipelineScheduleMulti) \
        else stages
    sched = cls(target, n_microbatches, loss_fn=loss_fn, **schedule_kwargs)
    if loss_fn is not None:
        attach(sched)
    check_determinism(group)
    return stages, sched


def check_determinism(group: dist.ProcessGroup | None = None) -> list[dict[str, Any]]:
    """Compare the settings that bit-for-bit equality with the simulator depends on across the
    ranks of ``group`` (a collective: call it on every rank); warn when they differ.

    Compared: the number of intra-op threads (``torch.get_num_threads()``), the torch version
    and whether deterministic algorithms are on. The simulator must also run with the same
    thread count as the ranks to match them exactly.

    Returns:
        Every rank's settings, in rank order.
    """
    mine = {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "deterministic": torch.are_deterministic_algorithms_enabled()}
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, mine, group=group)
    for key in mine:
        values = {r[key] for r in out}
        if len(values) > 1:
            seen = ", ".join(f"rank {i}: {r[key]}" for i, r in enumerate(out))
            warnings.warn(f"the ranks differ in {key} ({seen}): results will not reproduce the "
                          "simulator bit for bit", stacklevel=2)
    return out


_install_step_hooks()
