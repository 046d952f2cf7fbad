"""Pipeline-parallel helpers: schedule action orders, per-stage staleness and timelines, the
methods (:mod:`~predictopt.pipeline.methods`, one registry of :class:`Method` values), the
per-stage training semantics (:class:`StageWorker`) and a single-process simulator."""

from predictopt.pipeline.bitpipe import BITPIPE_SCHEDULE, BitPipeSimulator
from predictopt.pipeline.bitpipe_runtime import BitPipeRuntime
from predictopt.pipeline.methods import (
    DEFAULT_METHOD,
    Cadence,
    Method,
    StageContext,
    StageTransform,
    UpdateContext,
    available_methods,
    get_method,
    register_method,
)
from predictopt.pipeline.pb import (
    PB_METHODS,
    PB_PREDICTING,
    PB_SCHEDULE,
    pb_delays,
    pb_global_order,
    pb_local_orders,
    pb_staleness,
    pb_ticks,
)
from predictopt.pipeline.postvalidation import DistributedPostValidation, PostValidation
from predictopt.pipeline.schedules import (
    SUPPORTED_SCHEDULES,
    Action,
    TimelineEntry,
    action_timeline,
    available_schedules,
    bubble_fraction,
    bubble_rate,
    global_order,
    max_staleness,
    peak_activations,
    register_schedule,
    render_timeline,
    schedule_actions,
    stage_to_rank,
    staleness,
    timeline,
)
from predictopt.pipeline.semantics import (
    LEAN_METHODS,
    METHODS,
    PIPELINE_METHODS,
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
from predictopt.pipeline.zero_bubble import auto_schedule, exact_schedule, zb_h1, zb_h2

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
    "action_timeline",
    "available_schedules",
    "bubble_rate",
    "peak_activations",
    "register_schedule",
    "auto_schedule",
    "exact_schedule",
    "zb_h1",
    "zb_h2",
    "DistributedPostValidation",
    "PostValidation",
    "BITPIPE_SCHEDULE",
    "BitPipeRuntime",
    "BitPipeSimulator",
    "METHODS",
    "PIPELINE_METHODS",
    "LEAN_METHODS",
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
    "PB_METHODS",
    "PB_PREDICTING",
    "PB_SCHEDULE",
    "pb_delays",
    "pb_global_order",
    "pb_local_orders",
    "pb_staleness",
    "pb_ticks",
    "DEFAULT_METHOD",
    "Cadence",
    "Method",
    "StageContext",
    "StageTransform",
    "UpdateContext",
    "available_methods",
    "get_method",
    "register_method",
]

# The distributed runtime imports torch.distributed.pipelining (slow to import): load it lazily.
_RUNTIME = ("PredictiveStage", "attach", "build_pipeline", "init_distributed", "schedule_name",
            "DEFAULT_TIMEOUT_S")
__all__ += list(_RUNTIME)


def __getattr__(name: str):
    if name in _RUNTIME:
        from predictopt.pipeline import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
