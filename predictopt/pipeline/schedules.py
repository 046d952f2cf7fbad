"""Per-rank action orders, staleness and simulated timelines for PyTorch's pipeline schedules.

This module derives, for any native schedule of `torch.distributed.pipelining`
(``GPipe``, ``1F1B``, ``Interleaved1F1B``, ``LoopedBFS``, ``InterleavedZeroBubble``,
``ZBVZeroBubble``, ``DualPipeV``) and for predictopt's action-list schedules, which torch's
action-list runtime executes (``ZBH1``, ``ZBH2``: the Zero Bubble paper's handcrafted
schedules, :mod:`~predictopt.pipeline.zero_bubble`; and any schedule added with
`register_schedule`, e.g. one from the automatic scheduler), the ordered list of compute
actions each rank executes, and from it

* the *staleness* of every micro-batch at every stage (how many of the stage's own optimizer
  updates a micro-batch's forward is behind the update that will apply its gradient), which is the
  horizon a weight predictor must look ahead;
* a dependency-respecting simulated execution (`timeline`), the corresponding single-process
  execution order (`global_order`), the bubble fraction and a Gantt chart.

No process group is needed: multi-stage schedules are constructed with lightweight stand-in stage
objects (torch computes the whole ``pipeline_order`` for all ranks in the constructor) and the
single-stage schedules are derived from the loops their runtime ``_step_microbatches`` executes.
predictopt's own schedules are read back the same way from the torch schedule objects
(:mod:`~predictopt.pipeline.action_schedule`) that run them. All access to torch internals is
confined to the private helpers of the "torch access" section (`_resolve_schedule`,
`_construct`, `_convert_torch_action`, `_torch_compute_orders`), which raise a clear error if
the installed torch differs.

Notation: ``K`` ranks, ``S = K * stages_per_rank`` global stages ``k = 0..S-1`` (0 is first),
``n`` micro-batches ``i = 0..n-1``. Action kinds: ``"F"`` forward, ``"B"`` full backward,
``"I"`` input-gradient half of the backward, ``"W"`` weight-gradient half.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

__all__ = [
    "Action",
    "SUPPORTED_SCHEDULES",
    "TimelineEntry",
    "action_timeline",
    "available_schedules",
    "bubble_fraction",
    "bubble_rate",
    "global_order",
    "max_staleness",
    "peak_activations",
    "register_schedule",
    "render_timeline",
    "schedule_actions",
    "stage_to_rank",
    "staleness",
    "timeline",
]

ACTION_KINDS = ("F", "B", "I", "W")


@dataclass(frozen=True, order=True)
class Action:
    """One compute action of a pipeline schedule.

    Attributes:
        kind: ``"F"`` (forward), ``"B"`` (full backward), ``"I"`` (input-gradient-only backward)
            or ``"W"`` (weight-gradient-only backward).
        stage: global stage index (0 = first stage of the model).
        microbatch: micro-batch index within the step.
    """

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


class TimelineEntry(NamedTuple):
    """One simulated action: ``(rank, start, end, action)``."""

    rank: int
    start: float
    end: float
    action: Action


#: ``build(num_ranks, n_microbatches) -> {rank: [Action, ...]}`` of a predictopt schedule.
ScheduleBuilder = Callable[[int, int], Mapping[int, Sequence[Action]]]


@dataclass(frozen=True)
class _ScheduleInfo:
    name: str  # canonical name (torch's get_schedule_class name for torch's classes)
    class_name: str  # attribute of torch.distributed.pipelining.schedules, or of ours
    multi_stage: bool
    placement: str  # "loop": stage s on rank s % K; "v": rank r holds r and 2K-1-r
    exact_stages_per_rank: int | None  # None = any allowed value
    since: str  # first torch release shipping the class (predictopt's: the runtime they use)
    build: ScheduleBuilder | None = None  # predictopt's action-list schedules only
    description: str = ""

    @property
    def provider(self) -> str:
        """``"torch"`` (a native class) or ``"predictopt"`` (an action list torch runs)."""
        return "torch" if self.build is None else "predictopt"


def _zero_bubble(name: str) -> ScheduleBuilder:
    def build(num_ranks: int, n: int) -> Mapping[int, Sequence[Action]]:
        from . import zero_bubble

        return zero_bubble.BUILTIN[name](num_ranks, n)

    return build


# Release in which each class first shipped (from the torch release history; GPipe, 1F1B,
# Interleaved1F1B and LoopedBFS exist since torch.distributed.pipelining appeared in 2.4).
_SCHEDULES: tuple[_ScheduleInfo, ...] = (
    _ScheduleInfo("GPipe", "ScheduleGPipe", False, "loop", 1, "2.4"),
    _ScheduleInfo("1F1B", "Schedule1F1B", False, "loop", 1, "2.4"),
    _ScheduleInfo("Interleaved1F1B", "ScheduleInterleaved1F1B", True, "loop", None, "2.4"),
    _ScheduleInfo("LoopedBFS", "ScheduleLoopedBFS", True, "loop", None, "2.4"),
    _ScheduleInfo(
        "InterleavedZeroBubble", "ScheduleInterleavedZeroBubble", True, "loop", None, "2.5"
    ),
    _ScheduleInfo("ZBVZeroBubble", "ScheduleZBVZeroBubble", True, "v", 2, "2.6"),
    _ScheduleInfo("DualPipeV", "ScheduleDualPipeV", True, "v", 2, "2.8"),
    # predictopt's action lists, run by torch's _PipelineScheduleRuntime (action_schedule.py)
    _ScheduleInfo("ZBH1", "ScheduleZBH1", False, "loop", 1, "2.6", _zero_bubble("ZBH1"),
                  "Zero Bubble ZB-H1: 1F1B with delayed W, 1F1B's peak memory"),
    _ScheduleInfo("ZBH2", "ScheduleZBH2", False, "loop", 1, "2.6", _zero_bubble("ZBH2"),
                  "Zero Bubble ZB-H2: extra warm-up forwards, up to 2p-1 in flight"),
)
_REGISTERED: list[_ScheduleInfo] = []
_BY_LOWER = {info.name.lower(): info for info in _SCHEDULES}

#: Built-in schedule names accepted by this module (case-insensitive): torch's native classes
#: and predictopt's action-list schedules. `available_schedules` adds the registered ones.
SUPPORTED_SCHEDULES: tuple[str, ...] = tuple(info.name for info in _SCHEDULES)


def _all_infos() -> tuple[_ScheduleInfo, ...]:
    return _SCHEDULES + tuple(_REGISTERED)


def available_schedules() -> tuple[str, ...]:
    """Every schedule name: `SUPPORTED_SCHEDULES`, then those added by `register_schedule`."""
    return tuple(info.name for info in _all_infos())


def register_schedule(name: str, build: ScheduleBuilder, *, description: str = "") -> str:
    """Make an action-list schedule with one stage per rank known to predictopt by name.

    The schedule then works wherever a schedule name is accepted: `staleness`, `timeline`,
    ``PipelineSimulator(schedule=name)``, ``build_pipeline(..., name)`` and the Lightning
    strategy; torch runs it through :func:`~predictopt.pipeline.action_schedule.schedule_class`
    (``name``). Register it in every process (like a method).

    Args:
        name: A new name (letters, digits, ``-``, ``_``; case-insensitive, not a built-in one).
        build: ``build(num_ranks, n_microbatches) -> {rank: [Action, ...]}``; rank ``r`` holds
            stage ``r``; every rank runs one ``F`` and one completed backward (``B``, or ``I``
            then ``W``) per micro-batch, ``F(i)`` before it (e.g.
            :func:`~predictopt.pipeline.zero_bubble.auto_schedule` with fixed costs).
        description: One line shown in listings.

    Returns:
        The name.

    Raises:
        ValueError: a bad or taken name, or ``build`` not callable.
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be a non-empty str of letters, digits, '-' and '_', "
                         f"got {name!r}")
    if name.lower() in _BY_LOWER:
        raise ValueError(f"schedule name {name!r} is taken; taken names: "
                         f"{', '.join(available_schedules())}")
    if not callable(build):
        raise ValueError("build must be callable: (num_ranks, n_microbatches) -> "
                         "{rank: [Action, ...]}")
    info = _ScheduleInfo(name, f"Schedule{name}", False, "loop", 1, "2.6", build, description)
    _REGISTERED.append(info)
    _BY_LOWER[name.lower()] = info
    return name


# --------------------------------------------------------------------------------------------
# Argument checking and torch access ("torch access" section)
# --------------------------------------------------------------------------------------------


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _schedules_module() -> Any:
    try:
        import torch.distributed.pipelining.schedules as sched_mod
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise ValueError(
            "torch.distributed.pipelining is not available in the installed torch "
            f"({_torch_version()}); pipeline schedules need torch >= 2.4 built with "
            "distributed support"
        ) from exc
    return sched_mod


def _resolve_schedule_info(schedule: str) -> _ScheduleInfo:
    """The info record of a schedule name (case-insensitive).

    Raises:
        ValueError: not a str, or an unknown name (the message lists the accepted ones and says
            whether torch knows the name).
    """
    if not isinstance(schedule, str):
        raise ValueError(f"schedule must be a str, got {type(schedule).__name__}")
    info = _BY_LOWER.get(schedule.lower())
    if info is None:
        accepted = ", ".join(available_schedules())
        get_cls = getattr(_schedules_module(), "get_schedule_class", None)  # torch >= 2.5
        known_to_torch = False
        if get_cls is not None:
            try:
                get_cls(schedule)
                known_to_torch = True
            except ValueError:
                pass
        what = "is a torch schedule not supported by predictopt" if known_to_torch else \
            "is unknown"
        raise ValueError(
            f"schedule {schedule!r} {what}; accepted names (case-insensitive): {accepted}"
        )
    return info


def _resolve_schedule(schedule: str) -> tuple[_ScheduleInfo, type]:
    """Map a schedule name to its info record and torch class.

    Raises:
        ValueError: unknown name, a torch schedule this module does not handle, or a schedule
            missing from the installed torch (naming the release that introduced it).
    """
    info = _resolve_schedule_info(schedule)
    sched_mod = _schedules_module()
    if info.build is not None:
        if not hasattr(sched_mod, "_PipelineScheduleRuntime"):  # pragma: no cover - old torch
            raise ValueError(f"schedule {info.name!r} runs on torch's _PipelineScheduleRuntime, "
                             f"which needs torch >= {info.since}, but the installed torch is "
                             f"{_torch_version()}")
        from . import action_schedule

        return info, action_schedule.schedule_class(info.name)
    get_cls = getattr(sched_mod, "get_schedule_class", None)  # torch >= 2.5
    cls = None
    if get_cls is not None:
        try:
            cls = get_cls(info.name)
        except ValueError:
            cls = None
    if cls is None:
        cls = getattr(sched_mod, info.class_name, None)
    if cls is None:
        raise ValueError(
            f"schedule {info.name!r} ({info.class_name}) needs torch >= {info.since}, but the "
            f"installed torch is {_torch_version()}"
        )
    return info, cls


def _resolve_stages_per_rank(info: _ScheduleInfo, stages_per_rank: int | None) -> int:
    if stages_per_rank is None:
        return 2 if info.multi_stage else 1
    _check_positive_int(stages_per_rank, "stages_per_rank")
    if not info.multi_stage and stages_per_rank != 1:
        raise ValueError(
            f"stages_per_rank for single-stage schedule {info.name!r} must be 1, "
            f"got {stages_per_rank}"
        )
    if info.multi_stage:
        if info.exact_stages_per_rank is not None:
            if stages_per_rank != info.exact_stages_per_rank:
                raise ValueError(
                    f"stages_per_rank for {info.name!r} must be exactly "
                    f"{info.exact_stages_per_rank} (V placement), got {stages_per_rank}"
                )
        elif stages_per_rank < 2:
            raise ValueError(
                f"stages_per_rank for multi-stage schedule {info.name!r} must be >= 2, "
                f"got {stages_per_rank}"
            )
    return stages_per_rank


def _placement(info: _ScheduleInfo, num_ranks: int, stages_per_rank: int) -> dict[int, int]:
    num_stages = num_ranks * stages_per_rank
    if info.placement == "v":
        mapping = {}
        for r in range(num_ranks):
            mapping[r] = r
            mapping[2 * num_ranks - 1 - r] = r
        return dict(sorted(mapping.items()))
    return {s: s % num_ranks for s in range(num_stages)}


def stage_to_rank(
    schedule: str, num_ranks: int, stages_per_rank: int | None = None
) -> dict[int, int]:
    """Return the rank holding each global stage.

    Loop placement (all schedules except the V ones): stage ``s`` lives on rank ``s % K``.
    V placement (``ZBVZeroBubble``, ``DualPipeV``): rank ``r`` holds stages ``r`` and
    ``2K - 1 - r``.

    Args:
        schedule: schedule name (see `SUPPORTED_SCHEDULES`).
        num_ranks: number of pipeline ranks ``K``.
        stages_per_rank: stages per rank; defaults to 1 (single-stage) or 2 (multi-stage).

    Returns:
        ``{stage: rank}`` for all ``K * stages_per_rank`` stages, sorted by stage.
    """
    info, _ = _resolve_schedule(schedule)
    _check_positive_int(num_ranks, "num_ranks")
    spr = _resolve_stages_per_rank(info, stages_per_rank)
    return _placement(info, num_ranks, spr)


def _fake_stage(stage_index: int, num_stages: int, rank: int, num_ranks: int) -> SimpleNamespace:
    """A stand-in for ``_PipelineStageBase`` with what the schedule constructors read."""
    return SimpleNamespace(
        stage_index=stage_index,
        num_stages=num_stages,
        group_rank=rank,
        group_size=num_ranks,
        submod=None,  # _check_torch_compile_compatibility skips non-Module submods
        is_first=stage_index == 0,
        is_last=stage_index == num_stages - 1,
        stage_index_to_group_rank={},
        has_backward=True,
    )


def _convert_torch_action(action: Any) -> list[Action]:
    """Convert one torch ``_Action`` (possibly OVERLAP_F_B with sub-actions) to compute actions."""
    if action is None:
        return []
    sub = getattr(action, "sub_actions", None)
    if sub is not None:
        # The runtime executes the sub-actions of OVERLAP_F_B one after the other, in order.
        out: list[Action] = []
        for a in sub:
            out.extend(_convert_torch_action(a))
        return out
    ctype = action.computation_type
    value = getattr(ctype, "value", None)
    kind = value if isinstance(value, str) else str(ctype)
    if kind not in ACTION_KINDS:
        return []  # communication / unshard / reduce-grad actions
    return [Action(kind, int(action.stage_index), int(action.microbatch_index))]


def _construct(cls: type, stages: Any, n_microbatches: int) -> Any:
    """Instantiate a torch schedule with fake stages, turning its checks into ValueError."""
    sched_logger = logging.getLogger(cls.__module__)
    previous = sched_logger.level
    sched_logger.setLevel(max(previous, logging.ERROR))  # silence "Using ..." / bubble warnings
    try:
        return cls(stages, n_microbatches)
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise ValueError(f"torch's {cls.__name__} rejects this configuration: {exc}") from exc
    except (AttributeError, TypeError) as exc:  # pragma: no cover - torch internals changed
        raise RuntimeError(
            f"could not derive the action order of {cls.__name__} from the installed torch "
            f"({_torch_version()}): its constructor needs an attribute the stand-in stage "
            f"lacks ({exc}). Please report this together with the torch version."
        ) from exc
    finally:
        sched_logger.setLevel(previous)


def _runtime_single_stage_order(name: str, stage: int, num_stages: int, n: int) -> list[Action]:
    """Compute order executed by ``ScheduleGPipe``/``Schedule1F1B._step_microbatches``.

    GPipe: ``F0..F(n-1)`` then ``B0..B(n-1)``.

    1F1B (mirrors the runtime loop): ``warmup = min(n, num_stages - stage)`` forwards, then
    repeat "B(next) ; F(next) if forwards remain" and finally the remaining backwards.
    """
    if name == "GPipe":
        return [Action("F", stage, i) for i in range(n)] + [Action("B", stage, i) for i in range(n)]
    warmup = min(n, num_stages - stage)
    order = [Action("F", stage, i) for i in range(warmup)]
    fwd, bwd = warmup, 0
    while True:
        order.append(Action("B", stage, bwd))
        bwd += 1
        if fwd == n:
            break
        order.append(Action("F", stage, fwd))
        fwd += 1
    order.extend(Action("B", stage, i) for i in range(bwd, n))
    return order


def _compute_orders(
    schedule: str, num_ranks: int, n_microbatches: int, stages_per_rank: int | None
) -> tuple[tuple[Action, ...], ...]:
    """Validate the arguments, then return the (cached) per-rank compute orders."""
    info, _ = _resolve_schedule(schedule)
    _check_positive_int(num_ranks, "num_ranks")
    _check_positive_int(n_microbatches, "n_microbatches")
    spr = _resolve_stages_per_rank(info, stages_per_rank)
    # Validated before the cache: lru_cache would treat 2.0 or True like 2 or 1.
    return _torch_compute_orders(info.name, num_ranks, n_microbatches, spr)


@lru_cache(maxsize=256)
def _torch_compute_orders(
    schedule: str, num_ranks: int, n_microbatches: int, spr: int
) -> tuple[tuple[Action, ...], ...]:
    """Per-rank compute orders (cached, immutable). The only place reading torch's orders."""
    info, cls = _resolve_schedule(schedule)
    num_stages = num_ranks * spr

    if info.build is None and not info.multi_stage:
        # Let torch check its own constraints (e.g. 1F1B needs n_microbatches >= num_stages).
        _construct(cls, _fake_stage(0, num_stages, 0, num_ranks), n_microbatches)
        # Derived from the runtime loops rather than from torch's IR (`pipeline_order`):
        # torch 2.13's Schedule1F1B._get_pipeline_order lists the LAST rank wrongly (it starts
        # the steady state with F1 and ends with F{n}, i.e. it never runs F0 and runs a
        # non-existent micro-batch n, with B0 before any forward), because with 0 warm-up
        # forwards its `forward_mb` counter starts at 0 and is pre-incremented. What
        # `_step_microbatches` actually executes is min(n, num_stages - stage_index) warm-up
        # forwards followed by alternating B/F, which is reproduced here. For the other ranks
        # and for GPipe the IR agrees with the runtime (checked in tests/test_staleness.py).
        return tuple(
            tuple(_runtime_single_stage_order(info.name, r, num_stages, n_microbatches))
            for r in range(num_ranks)
        )

    placement = _placement(info, num_ranks, spr)
    local = [s for s in sorted(placement) if placement[s] == 0]
    stages = [_fake_stage(s, num_stages, 0, num_ranks) for s in local]
    sched = _construct(cls, stages, n_microbatches)
    # Multi-stage schedules (and predictopt's action-list ones) compute `pipeline_order` for
    # *all* ranks in the constructor, then lower it to `pipeline_order_with_comms`, which is
    # what `_PipelineScheduleRuntime` runs.
    # Lowering only inserts SEND/RECV/UNSHARD/RESHARD/REDUCE_GRAD, never reorders compute.
    orders = getattr(sched, "pipeline_order_with_comms", None) or getattr(
        sched, "pipeline_order", None
    )
    if not orders:  # pragma: no cover - torch internals changed
        raise RuntimeError(
            f"the installed torch ({_torch_version()}) exposes no pipeline_order on "
            f"{cls.__name__}; cannot derive its action order"
        )
    result = []
    for r in range(num_ranks):
        acts: list[Action] = []
        for a in orders[r]:
            acts.extend(_convert_torch_action(a))
        result.append(tuple(acts))
    return tuple(result)


def _torch_ir(schedule: str, num_ranks: int, n_microbatches: int) -> dict[int, list[Action]] | None:
    """torch's own IR for a single-stage schedule (``None`` when the installed torch has none).

    Used by the tests to compare the IR with the runtime-derived order.
    """
    info, cls = _resolve_schedule(schedule)
    sched = _construct(cls, _fake_stage(0, num_ranks, 0, num_ranks), n_microbatches)
    ir = getattr(sched, "pipeline_order", None)
    if ir is None:
        return None
    out = {}
    for r in range(num_ranks):
        acts: list[Action] = []
        for a in ir[r]:
            acts.extend(_convert_torch_action(a))
        out[r] = acts
    return out


# --------------------------------------------------------------------------------------------
# Public API: action lists and staleness
# --------------------------------------------------------------------------------------------


def schedule_actions(
    schedule: str,
    num_ranks: int,
    n_microbatches: int,
    *,
    stages_per_rank: int | None = None,
) -> dict[int, list[Action]]:
    """Ordered compute actions each rank executes in one ``step()`` of a torch schedule.

    Communication, unshard/reshard and grad-reduction actions are dropped; an ``OVERLAP_F_B``
    action (DualPipeV) is expanded into its forward and backward, in the order the runtime runs
    them.

    Args:
        schedule: a name accepted by ``torch.distributed.pipelining.schedules.get_schedule_class``
            (case-insensitive): one of `SUPPORTED_SCHEDULES`.
        num_ranks: pipeline ranks ``K`` (>= 1).
        n_microbatches: micro-batches per step ``n`` (>= 1).
        stages_per_rank: stages held by each rank. Default 1 for single-stage schedules (GPipe,
            1F1B, which accept only 1) and 2 for multi-stage ones (Interleaved1F1B, LoopedBFS,
            InterleavedZeroBubble accept >= 2; ZBVZeroBubble and DualPipeV exactly 2).

    Returns:
        ``{rank: [Action, ...]}`` for ranks ``0..K-1``.

    Raises:
        ValueError: unknown schedule, schedule missing from the installed torch, non-positive
            sizes, wrong ``stages_per_rank``, or a configuration torch itself rejects (message
            included).
    """
    orders = _compute_orders(schedule, num_ranks, n_microbatches, stages_per_rank)
    return {r: list(acts) for r, acts in enumerate(orders)}


def staleness(
    schedule: str,
    num_ranks: int,
    n_microbatches: int,
    *,
    stages_per_rank: int | None = None,
    update_every: int = 1,
) -> dict[int, list[int]]:
    """Staleness of every micro-batch at every stage under eager per-stage updates.

    Each stage ``k`` steps its optimizer right after every ``update_every``-th *completed
    backward* of that stage, counted in the local order of the rank holding it. A completed
    backward is a ``B`` action, or, for a stage whose backward is split, a ``W`` action (``I``
    alone does not complete it; a stage may mix both forms, as in DualPipeV).

    With ``c_i`` the 1-based position of micro-batch ``i``'s completed backward among the
    stage's completed backwards, the update that applies ``i``'s gradient is update number
    ``ceil(c_i / u)`` (``u = update_every``), so ``ceil(c_i / u) - 1`` updates precede it. If
    ``v_i`` updates have happened before ``F(k, i)``, then::

        s(k, i) = ceil(c_i / u) - 1 - v_i

    i.e. the number of the stage's updates after ``F(k, i)`` and before the update applying
    ``i``; the number of steps a weight predictor has to look ahead at that forward.

    Args:
        schedule: schedule name (see `schedule_actions`).
        num_ranks: pipeline ranks ``K``.
        n_microbatches: micro-batches per step ``n``.
        stages_per_rank: see `schedule_actions`.
        update_every: completed backwards per optimizer update (>= 1, must divide ``n``).
            ``update_every == n`` is the synchronous (flushed) case: all staleness 0.

    Returns:
        ``{stage: [s(stage, 0), ..., s(stage, n-1)]}`` for all global stages.

    Raises:
        ValueError: bad arguments (see `schedule_actions`), or ``update_every`` not a
            positive divisor of ``n_microbatches``.
    """
    orders = _compute_orders(schedule, num_ranks, n_microbatches, stages_per_rank)
    _check_positive_int(update_every, "update_every")
    if n_microbatches % update_every:
        raise ValueError(
            f"update_every ({update_every}) must divide n_microbatches ({n_microbatches})"
        )
    return _staleness_of_orders(orders, update_every)


def _staleness_of_orders(orders: Sequence[Sequence[Action]],
                         update_every: int) -> dict[int, list[int]]:
    """`staleness` of per-rank orders (each rank's list in execution order)."""
    result: dict[int, list[int]] = {}
    for acts in orders:
        stages = sorted({a.stage for a in acts})
        for k in stages:
            updates = 0
            completed = 0
            fwd_version: dict[int, int] = {}
            s_k: dict[int, int] = {}
            for a in acts:
                if a.stage != k:
                    continue
                if a.kind == "F":
                    fwd_version[a.microbatch] = updates
                elif a.kind in ("B", "W"):  # a completed backward; "I" alone is not
                    completed += 1
                    applying = math.ceil(completed / update_every) - 1
                    s_k[a.microbatch] = applying - fwd_version[a.microbatch]
                    if completed % update_every == 0:
                        updates += 1
            result[k] = [s_k[i] for i in sorted(s_k)]
    return dict(sorted(result.items()))


def max_staleness(
    schedule: str,
    num_ranks: int,
    n_microbatches: int,
    *,
    stages_per_rank: int | None = None,
    update_every: int = 1,
) -> dict[int, int]:
    """Largest staleness per stage: ``{stage: max_i s(stage, i)}`` (see `staleness`)."""
    table = staleness(
        schedule,
        num_ranks,
        n_microbatches,
        stages_per_rank=stages_per_rank,
        update_every=update_every,
    )
    return {k: max(v) for k, v in table.items()}


# --------------------------------------------------------------------------------------------
# Simulated execution
# --------------------------------------------------------------------------------------------

_DEFAULT_DURATIONS: dict[str, float] = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}

#: A duration per action kind: one number for every stage, or one per stage.
Durations = Mapping[str, "float | Sequence[float]"]


def _dependencies(a: Action, num_stages: int, bwd_kind: dict[tuple[int, int], str]) -> list:
    """Cross-action dependencies of ``a`` as keys ``(kind, stage, microbatch)``."""
    if a.kind == "F":
        return [("F", a.stage - 1, a.microbatch)] if a.stage > 0 else []
    if a.kind in ("B", "I"):
        deps = [("F", a.stage, a.microbatch)]
        if a.stage < num_stages - 1:
            nxt = (a.stage + 1, a.microbatch)
            deps.append((bwd_kind[nxt], a.stage + 1, a.microbatch))
        return deps
    return [("I", a.stage, a.microbatch)]  # W


def _duration_table(durations: Durations | None, num_stages: int) -> dict[str, list[float]]:
    """``{kind: [duration of stage 0, ...]}`` from a mapping of numbers or per-stage lists."""
    table = {k: [v] * num_stages for k, v in _DEFAULT_DURATIONS.items()}
    for kind, value in (durations or {}).items():
        if kind not in ACTION_KINDS:
            raise ValueError(f"durations has unknown action kind {kind!r}; use {ACTION_KINDS}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table[kind] = [float(value)] * num_stages
        elif isinstance(value, Sequence) and len(value) == num_stages:
            table[kind] = [float(v) for v in value]
        else:
            raise ValueError(f"durations[{kind!r}] must be a number or one number per stage "
                             f"({num_stages}), got {value!r}")
    for kind, values in table.items():
        if not all(v > 0 for v in values):
            raise ValueError(f"durations[{kind!r}] must be > 0, got {values}")
    return table


def action_timeline(
    actions: Mapping[int, Sequence[Action]],
    *,
    durations: Durations | None = None,
    comm: float = 0.0,
) -> list[TimelineEntry]:
    """Simulate per-rank action lists: each rank runs its list in order, one action at a time.

    An action starts at the later of its rank becoming free and its dependencies finishing,
    plus ``comm`` for a dependency on another rank:

    * ``F(k, i)`` needs ``F(k-1, i)``;
    * ``B(k, i)`` / ``I(k, i)`` need ``F(k, i)`` and the backward (``B`` or ``I``) of
      ``(k+1, i)``;
    * ``W(k, i)`` needs ``I(k, i)``.

    This is the earliest-start (longest-path) schedule of the dependency graph with the per-rank
    order fixed, so the result does not depend on the order in which the simulation visits
    ranks, and shortening any duration can only make actions start earlier.

    Args:
        actions: ``{rank: [Action, ...]}`` (e.g. `schedule_actions`), one ``F`` and one
            completed backward per (stage, micro-batch).
        durations: time per action kind, a number or one per stage; defaults to
            ``{"F": 1, "B": 2, "I": 1, "W": 1}`` (kinds not given keep their default). All > 0.
        comm: transfer time of an activation or gradient between two ranks (>= 0).

    Returns:
        ``[TimelineEntry(rank, start, end, action), ...]`` in rank order, then execution order.

    Raises:
        ValueError: non-positive durations or a negative ``comm``.
        RuntimeError: the action lists deadlock (a rank waits for an action that waits for it).
    """
    orders = [list(actions[r]) for r in sorted(actions)]
    ranks = sorted(actions)
    num_stages = 1 + max((a.stage for acts in orders for a in acts), default=-1)
    dur = _duration_table(durations, max(num_stages, 1))
    if isinstance(comm, bool) or not isinstance(comm, (int, float)) or comm < 0:
        raise ValueError(f"comm must be a number >= 0, got {comm!r}")
    bwd_kind = {(a.stage, a.microbatch): a.kind for acts in orders for a in acts if a.kind in "BI"}
    rank_of = {a.stage: r for r, acts in zip(ranks, orders) for a in acts}

    end_of: dict[tuple[str, int, int], float] = {}
    pos = [0] * len(orders)
    free = [0.0] * len(orders)
    entries: list[list[TimelineEntry]] = [[] for _ in orders]
    remaining = sum(len(acts) for acts in orders)
    while remaining:
        progressed = False
        for j, acts in enumerate(orders):
            while pos[j] < len(acts):
                a = acts[pos[j]]
                deps = _dependencies(a, num_stages, bwd_kind)
                if any(d not in end_of for d in deps):
                    break
                start = max([free[j], *(end_of[d] + (comm if rank_of[d[1]] != ranks[j] else 0.0)
                                       for d in deps)])
                end = start + dur[a.kind][a.stage]
                end_of[(a.kind, a.stage, a.microbatch)] = end
                entries[j].append(TimelineEntry(ranks[j], start, end, a))
                free[j] = end
                pos[j] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {ranks[j]: str(acts[pos[j]]) for j, acts in enumerate(orders)
                     if pos[j] < len(acts)}
            raise RuntimeError(f"action lists deadlock; ranks blocked at {stuck}")
    return [e for rank_entries in entries for e in rank_entries]


def timeline(
    schedule: str,
    num_ranks: int,
    n_microbatches: int,
    *,
    stages_per_rank: int | None = None,
    durations: Durations | None = None,
    comm: float = 0.0,
) -> list[TimelineEntry]:
    """Simulate one step of a schedule: `action_timeline` of its `schedule_actions`.

    The arguments ``schedule``, ``num_ranks``, ``n_microbatches`` and ``stages_per_rank`` are
    those of `schedule_actions`; ``durations`` and ``comm`` those of `action_timeline`. An
    ``OVERLAP_F_B`` pair of DualPipeV is simulated as its two actions back to back.

    Returns:
        ``[TimelineEntry(rank, start, end, action), ...]`` in rank order, then execution order.

    Raises:
        ValueError: bad arguments or non-positive durations.
        RuntimeError: the action lists deadlock (cannot happen for the supported schedules).
    """
    orders = _compute_orders(schedule, num_ranks, n_microbatches, stages_per_rank)
    return action_timeline(dict(enumerate(orders)), durations=durations, comm=comm)


def global_order(
    schedule: str,
    num_ranks: int,
    n_microbatches: int,
    *,
    stages_per_rank: int | None = None,
    durations: Mapping[str, float] | None = None,
) -> list[Action]:
    """All actions of one step in simulated start-time order (ties broken by rank).

    Because every duration is positive, an action starts strictly after each of its
    dependencies and its rank predecessor start, so this order respects all dependencies and
    every rank's own order: a single process can execute it as is.

    The arguments are those of `timeline`.

    Returns:
        The list of `Action` in execution order.
    """
    tl = timeline(
        schedule,
        num_ranks,
        n_microbatches,
        stages_per_rank=stages_per_rank,
        durations=durations,
    )
    return [e.action for e in sorted(tl, key=lambda e: (e.start, e.rank))]


def bubble_fraction(tl: list[TimelineEntry]) -> float:
    """Idle fraction of a simulated step: ``idle / (num_ranks * makespan)``.

    ``makespan`` is the latest end time (the step starts at 0) and ``idle`` is
    ``num_ranks * makespan`` minus the total busy time.

    Args:
        tl: output of `timeline`.

    Returns:
        A float in ``[0, 1)``; 0 for an empty timeline.
    """
    if not tl:
        return 0.0
    ranks = {e.rank for e in tl}
    makespan = max(e.end for e in tl) - min(0.0, min(e.start for e in tl))
    busy = sum(e.end - e.start for e in tl)
    total = len(ranks) * makespan
    return (total - busy) / total


def bubble_rate(tl: list[TimelineEntry]) -> float:
    r"""Bubble per unit of work, the Zero Bubble paper's measure: $\max_r S_r / \max_r C_r - 1$.

    $S_r$ is rank $r$'s span (end of its last action minus start of its first) and $C_r$ its
    busy time. A rank's span, not the step's makespan, is what repeats from step to step once
    nothing synchronises the ranks at the optimizer step (asynchronous per-stage updates, or
    optimizer post-validation), so a parallelogram-shaped schedule has no bubble. With
    $T_F = T_B = T_W$ (``durations={"F": 1, "I": 1, "W": 1, "B": 2}``), $p$ ranks and $m \ge p$
    micro-batches: 1F1B $(p-1)/m$, ZB-H1 $(p-1)/3m$, ZB-H2 $0$.

    Args:
        tl: output of `timeline` or `action_timeline`.

    Returns:
        A float ``>= 0``; 0 for an empty timeline.
    """
    if not tl:
        return 0.0
    spans: dict[int, list[float]] = {}
    busy: dict[int, float] = {}
    for e in tl:
        lo_hi = spans.setdefault(e.rank, [e.start, e.end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], e.start), max(lo_hi[1], e.end)
        busy[e.rank] = busy.get(e.rank, 0.0) + (e.end - e.start)
    return max(0.0, max(hi - lo for lo, hi in spans.values()) / max(busy.values()) - 1.0)


def peak_activations(actions: Mapping[int, Sequence[Action]]) -> dict[int, float]:
    """Peak activation memory of every rank, in micro-batches of the rank's whole layers.

    Walking a rank's list, a micro-batch's activations at a stage are held from its ``F`` to
    its completed backward (``B``, or ``W``: the weight gradient still needs the saved inputs).
    A rank holding ``c`` stages (chunks) counts each held (stage, micro-batch) as ``1/c``, so
    the numbers compare across placements: 1F1B's rank 0 holds ``p``, ZB-H2's ``2p - 1``.

    Args:
        actions: ``{rank: [Action, ...]}``.

    Returns:
        ``{rank: peak}``.
    """
    out: dict[int, float] = {}
    for r, acts in actions.items():
        chunks = len({a.stage for a in acts}) or 1
        held = peak = 0
        for a in acts:
            if a.kind == "F":
                held += 1
                peak = max(peak, held)
            elif a.kind in ("B", "W"):
                held -= 1
        out[r] = peak / chunks
    return out


_COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#DD8452", "W": "#8172B3"}


def render_timeline(
    tl: list[TimelineEntry],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw a simulated timeline as a Gantt chart PNG (matplotlib, Agg backend).

    One row per rank (rank 0 at the top); F/B/I/W in distinct colors; the micro-batch number is
    written in each box. When a rank holds several stages, boxes of its later stages (chunks) are
    hatched and the stage is written below the micro-batch number.

    Args:
        tl: output of `timeline`.
        path: output file (``.png``).
        title: figure title.

    Returns:
        The path written.
    """
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    ranks = sorted({e.rank for e in tl})
    stages_of = {r: sorted({e.action.stage for e in tl if e.rank == r}) for r in ranks}
    multi = any(len(s) > 1 for s in stages_of.values())
    makespan = max((e.end for e in tl), default=1.0)
    fig = Figure(figsize=(max(6.0, min(40.0, 0.35 * makespan + 2)), 0.7 * len(ranks) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for e in tl:
        y = e.rank
        chunk = stages_of[e.rank].index(e.action.stage)
        ax.barh(
            y,
            e.end - e.start,
            left=e.start,
            height=0.8,
            color=_COLORS[e.action.kind],
            edgecolor="black",
            linewidth=0.5,
            hatch="//" if chunk > 0 else None,
        )
        label = f"{e.action.microbatch}"
        if multi:
            label += f"\ns{e.action.stage}"
        ax.text(
            (e.start + e.end) / 2,
            y,
            label,
            ha="center",
            va="center",
            fontsize=7 if multi else 8,
            color="white",
            fontweight="bold",
            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")],
        )
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time")
    handles = [Patch(facecolor=c, edgecolor="black", label=k) for k, c in _COLORS.items()]
    if multi:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="later chunk"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    bubble = bubble_fraction(tl)
    ax.set_title(f"{title + ' - ' if title else ''}bubble {bubble:.1%} of the step, "
                 f"{bubble_rate(tl):.1%} of the work per rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
