"""Pipeline-parallel helpers: schedule action orders, per-stage staleness and timelines."""

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
]
