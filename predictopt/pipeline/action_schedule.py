"""torch schedule classes that run predictopt's action lists (ZB-H1, ZB-H2, registered ones).

``ScheduleZBH1``, ``ScheduleZBH2`` (and the class of any name added with
:func:`~predictopt.pipeline.schedules.register_schedule`, :func:`schedule_class`) are torch
``_PipelineScheduleRuntime`` subclasses: the constructor builds every rank's compute actions
with the schedule's builder, converts them to torch's ``_Action`` (through their string form,
the one torch's CSV loader reads) and lets torch lower them to the communicating order
(``_prepare_schedule_with_comms``), exactly as torch's own ``ScheduleZBVZeroBubble`` does.
Everything else (``step``, ``eval``, the send/receive actions, shape inference) is torch's
runtime, so a plain ``PipelineStage`` or a :class:`~predictopt.pipeline.PredictiveStage`
runs under them like under a native class::

    from predictopt.pipeline.action_schedule import ScheduleZBH1
    schedule = ScheduleZBH1(stage, n_microbatches=8, loss_fn=loss_fn)   # one stage per rank
    schedule.step(x, target=y, losses=losses)

`write_csv` writes the same actions in the format of torch's ``_load_csv`` (torchtitan's
``pipeline_parallel_schedule_csv``).

Torch access: this module is the only one that touches torch's action-list runtime
(``_PipelineScheduleRuntime``, ``_Action``, ``_prepare_schedule_with_comms``);
``tests/test_zero_bubble.py`` pins every member it uses, so a torch release that changes them
fails there.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime

from .schedules import Action, _resolve_schedule_info

__all__ = [
    "ActionSchedule",
    "ScheduleZBH1",
    "ScheduleZBH2",
    "read_csv",
    "schedule_class",
    "to_torch_actions",
    "write_csv",
]


def to_torch_actions(actions: Mapping[int, Sequence[Action]]) -> dict[int, list[Any]]:
    """``{rank: [torch _Action, ...]}`` from predictopt's actions (same string form, ``0F1``)."""
    return {r: [_Action.from_str(str(a)) for a in acts] for r, acts in sorted(actions.items())}


def write_csv(actions: Mapping[int, Sequence[Action]], path: str | Path) -> Path:
    """Write per-rank compute actions as torch's ``_load_csv`` reads them (one row per rank)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        for _, acts in sorted(actions.items()):
            writer.writerow([str(a) for a in acts])
    return path


def read_csv(path: str | Path) -> dict[int, list[Action]]:
    """Read a compute-only schedule CSV (torch's format) into predictopt's actions."""
    out: dict[int, list[Action]] = {}
    with Path(path).open(newline="") as f:
        for rank, row in enumerate(csv.reader(f)):
            acts = []
            for text in row:
                a = _Action.from_str(text)
                if a is not None:
                    acts.append(Action(a.computation_type.value, a.stage_index,
                                       a.microbatch_index))
            out[rank] = acts
    return out


class ActionSchedule(_PipelineScheduleRuntime):
    """A torch schedule running the action lists of a predictopt schedule name.

    Use a named subclass (``ScheduleZBH1``, ..., or :func:`schedule_class` ``(name)``). The
    arguments are those of torch's schedule classes; ``stages`` may be the rank's single stage
    or a list holding it.

    Raises:
        TypeError: instantiated without a schedule name.
        ValueError: the rank's stages are not the ones the schedule places on it.
    """

    schedule_name: ClassVar[str] = ""

    def __init__(
        self,
        stages: Any,
        n_microbatches: int,
        loss_fn: Callable[..., Any] | None = None,
        args_chunk_spec: Any = None,
        kwargs_chunk_spec: Any = None,
        output_merge_spec: Any = None,
        scale_grads: bool = True,
        backward_requires_autograd: bool = True,
    ) -> None:
        if not self.schedule_name:
            raise TypeError("ActionSchedule needs a schedule name: use ScheduleZBH1, ..., or "
                            "predictopt.pipeline.action_schedule.schedule_class(name)")
        stage_list = list(stages) if isinstance(stages, (list, tuple)) else [stages]
        super().__init__(
            stages=stage_list, n_microbatches=n_microbatches, loss_fn=loss_fn,
            args_chunk_spec=args_chunk_spec, kwargs_chunk_spec=kwargs_chunk_spec,
            output_merge_spec=output_merge_spec, scale_grads=scale_grads,
            backward_requires_autograd=backward_requires_autograd)
        info = _resolve_schedule_info(self.schedule_name)
        orders = info.build(self.pp_group_size, n_microbatches)  # type: ignore[misc]
        placed = sorted({a.stage for a in orders.get(self.rank, ())})
        held = sorted(s.stage_index for s in stage_list)
        if held != placed:
            raise ValueError(f"{info.name} puts stage(s) {placed} on rank {self.rank} of "
                             f"{self.pp_group_size}, but this rank holds stage(s) {held}")
        self.pipeline_order = to_torch_actions(orders)
        self._prepare_schedule_with_comms(self.pipeline_order)


_CLASSES: dict[str, type[ActionSchedule]] = {}


def schedule_class(name: str) -> type[ActionSchedule]:
    """The torch schedule class (an `ActionSchedule` subclass) of a predictopt schedule name.

    Raises:
        ValueError: not a predictopt action-list schedule.
    """
    info = _resolve_schedule_info(name)
    if info.build is None:
        raise ValueError(f"{info.name!r} is a torch schedule, not a predictopt action list")
    cls = _CLASSES.get(info.name)
    if cls is None:
        doc = f"{info.description or info.name} (predictopt action list run by torch)."
        cls = type(info.class_name, (ActionSchedule,),
                   {"schedule_name": info.name, "__doc__": doc, "__module__": __name__})
        _CLASSES[info.name] = cls
    return cls


ScheduleZBH1 = schedule_class("ZBH1")
ScheduleZBH2 = schedule_class("ZBH2")
