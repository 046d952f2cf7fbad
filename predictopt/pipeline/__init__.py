"""Pipeline-parallel helpers: schedule action orders, per-stage staleness and timelines, the
per-stage training semantics (:class:`StageWorker`) and a single-process simulator."""

from predictopt.pipeline.schedules import (
    SUPPORTED_SCHEDULES,
    Action,
    TimelineEntry,
    bubble_fraction,
    global_order,
    max_staleness,
    render_timeline,
    schedule_actions,
    stage_to_rank,
    staleness,
    timeline,
)
from predictopt.pipeline.semantics import (
    METHODS,
    PREDICTING_METHODS,
    FirstMomentRule,
    StageWorker,
    check_method,
    method_rule,
)
from predictopt.pipeline.simulator import (
    PipelineSimulator,
    SimulationResult,
    default_update_every,
    simulate,
    train,
)

__all__ = [
    "SUPPORTED_SCHEDULES",
    "Action",
    "TimelineEntry",
    "bubble_fraction",
    "global_order",
    "max_staleness",
    "render_timeline",
    "schedule_actions",
    "stage_to_rank",
    "staleness",
    "timeline",
    "METHODS",
    "PREDICTING_METHODS",
    "FirstMomentRule",
    "StageWorker",
    "check_method",
    "method_rule",
    "PipelineSimulator",
    "SimulationResult",
    "default_update_every",
    "simulate",
    "train",
]
