r"""Pipeline training methods as values: one :class:`Method` says what a stage's forwards and
backwards see and how the stage updates; one registry holds them all.

A method answers, for every micro-batch ``i`` of a step at a stage whose staleness is ``s(i)``
(the number of the stage's own updates between the forward ``F(i)`` and the update that applies
``i``'s gradient; :func:`predictopt.pipeline.staleness`):

``forward``
    The weights ``F(i)`` runs on: ``"current"`` (those the stage holds at ``F(i)``),
    ``"previous"`` (PipeDream-2BW: the version before the last update when ``s(i) = 0``, so
    every micro-batch lags by one update) or ``"predicted"`` (the weights ``h(i)`` updates
    ahead, :math:`\hat w = w - h\,\eta\,D` from the optimizer's state, ``h(i) = s(i)`` by
    default; :mod:`predictopt.rules`).
``backward``
    The weights the backward differentiates through: ``"forward"`` (exactly the forward's:
    weight stashing, one copy per version in flight) or ``"current"`` (the stage's weights at
    backward time: no copy kept; PipeOptim as published, Pipelined Backpropagation without
    stashing).
``cadence``
    How many completed backwards one update covers (:class:`Cadence`): one per micro-batch,
    one per step (GPipe) or a window of ``u`` micro-batches (PipeDream-2BW, XPipe).
``rule``
    For predicting methods, the prediction rule for a given optimizer (default: the
    optimizer's own rule).
``calibrate``
    For predicting methods, whether the predicted displacement is scaled by a gain fitted
    online at each horizon the stage predicts over (the calibration of
    :class:`~predictopt.PredictiveOptimizer`; default ``False``: the published formulas), a
    sample of each horizon at most once every ``calibration_every`` updates.
``transforms``
    Per-stage changes to the update (:class:`StageTransform`): hyper-parameters as a function
    of the stage's delay (a smaller learning rate, more momentum), a different optimizer class
    (Spike Compensation, Nesterov), corrections of the gradients before an update (delay
    compensation) or of the weights after it.

A method is a frozen value: derive variants with :meth:`Method.with_` (``PIPEOPTIM.with_(name=
"mine", transforms=(DelayScaledLR(),))``) and make them available by name with
:func:`register_method`. :class:`~predictopt.pipeline.StageWorker`, the simulator,
:class:`~predictopt.pipeline.runtime.PredictiveStage`, the Lightning strategy and
``predictopt compare`` all resolve method names through :func:`get_method`; adding a method is
one object here (or in your own module) and nothing else.

The built-in methods, their math and sources are listed in the documentation page "Methods";
:func:`available_methods` lists the registered names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..rules import PredictionRule, get_rule

__all__ = [
    "DEFAULT_METHOD",
    "Cadence",
    "Method",
    "StageContext",
    "StageTransform",
    "UpdateContext",
    "available_methods",
    "get_method",
    "register_method",
    "PER_MICROBATCH",
    "PER_STEP",
    "WINDOW",
]

#: The method used when none is given (``PipelineSimulator``, ``PredictiveStage``, the
#: Lightning strategy, ``predictopt compare``): the one the study (docs/study.md) found closest
#: to staleness-free training on the transformer yardstick.
DEFAULT_METHOD = "pipeoptim-qh-dm-dl"

FORWARD_SOURCES = ("current", "previous", "predicted")
BACKWARD_SOURCES = ("forward", "current")


# ---------------------------------------------------------------------------------------------
# Contexts handed to transforms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageContext:
    """What a method knows about the stage it runs on (fixed while attached to one schedule).

    Attributes:
        staleness: ``s(i)`` of every micro-batch of a step at this stage.
        update_every: Completed backwards per update.
        stage: Global index of the stage (``None`` when the caller does not say).
        num_stages: Number of stages of the pipeline (``None`` when unknown).
    """

    staleness: tuple[int, ...]
    update_every: int
    stage: int | None = None
    num_stages: int | None = None

    @property
    def n_microbatches(self) -> int:
        """Micro-batches per step."""
        return len(self.staleness)

    @property
    def delay(self) -> int:
        """The stage's delay: the largest ``s(i)`` of a step (its steady-state staleness)."""
        return max(self.staleness)


@dataclass
class UpdateContext:
    """What the update hooks of a :class:`StageTransform` see.

    Attributes:
        optimizer: The stage's bare optimizer (inside the prediction wrapper).
        params: The stage's trainable parameters, in a fixed order.
        updates: Updates the stage applied before this one (all steps).
        microbatches: The micro-batches whose gradients this update applies.
        state: Per-parameter state the transforms keep (the worker's ``transform_state``,
            saved in stage checkpoints); never the optimizer's own ``state`` (torch optimizers
            initialise a parameter's state when it is empty).
        workspace: Scratch memory the transforms may reuse from one update to the next (the
            worker's :class:`~predictopt.workspace.Workspace`; ``None``: allocate).
    """

    optimizer: Optimizer
    params: list[Tensor]
    updates: int
    microbatches: list[int] = field(default_factory=list)
    state: dict[Tensor, dict[str, Any]] = field(default_factory=dict)
    workspace: Any = None


# ---------------------------------------------------------------------------------------------
# Cadence
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cadence:
    """How many completed backwards ``u`` one update of a stage covers.

    Attributes:
        kind: ``"microbatch"`` (``u = 1``), ``"step"`` (``u = n``: one update per step) or
            ``"window"`` (any ``u`` dividing ``n``; default the smallest divisor of ``n`` that
            is ``>= num_stages``, or ``n``).
        at_least_stages: For ``"window"``: ``u`` must be ``>= num_stages`` unless ``u = n``
            (PipeDream-2BW's ``m >= K``, which keeps every lag at one update).
    """

    kind: str
    at_least_stages: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("microbatch", "step", "window"):
            raise ValueError(f"Cadence kind must be 'microbatch', 'step' or 'window', got "
                             f"{self.kind!r}")

    def default(self, num_stages: int, n: int) -> int:
        """The default ``u`` for ``num_stages`` stages and ``n`` micro-batches per step."""
        if self.kind == "microbatch":
            return 1
        if self.kind == "step":
            return n
        return next((d for d in range(num_stages, n + 1) if n % d == 0), n)

    def check(self, u: int, num_stages: int, n: int, method: str) -> int:
        """Return ``u`` if the cadence accepts it.

        Raises:
            ValueError: a ``u`` the method does not run with (the message names the accepted
                values).
        """
        default = self.default(num_stages, n)
        if self.kind != "window" and u != default:
            raise ValueError(f"update_every must be {default} for method {method!r} with {n} "
                             f"micro-batches, got {u}")
        if n % u:
            raise ValueError(f"update_every ({u}) must divide n_microbatches ({n})")
        if self.at_least_stages and u < num_stages and u != n:
            raise ValueError(f"update_every must be >= the number of stages ({num_stages}) "
                             f"for method {method!r}, got {u}")
        return u


PER_MICROBATCH = Cadence("microbatch")
PER_STEP = Cadence("step")
WINDOW = Cadence("window")


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


class StageTransform:
    """A per-stage change to how a stage updates. Subclasses override what they need.

    Hooks, in the order the worker calls them:

    * :meth:`prepare` once, when the worker is built: check or convert the stage optimizer
      (it must then be fresh; conversions must be idempotent: a worker rebuilt for another
      schedule passes the converted optimizer back in);
    * :meth:`correct_gradients` at every completed backward, on that micro-batch's weight
      gradients before they are added to ``.grad``;
    * :meth:`lr_scale` before every update and every prediction: a factor on every group's
      learning rate, applied only for the duration of the update (schedulers and checkpoints
      keep seeing the user's learning rate) and used for the predicted weights too;
      :meth:`group_values` likewise for other hyper-parameters (a momentum coefficient);
    * :meth:`before_step` and :meth:`after_step` around the optimizer step of every update,
      before the gradients are cleared.

    A transform with ``corrects_backward_weights = True`` (methods with
    ``backward = "current"`` only) also provides ``backward_weight(ctx, state, param, lag)``:
    the value a backward reads for ``param`` when ``lag`` updates happened since the forward.
    """

    #: Whether :meth:`correct_gradients` needs the forward's weights (kept until the backward
    #: completes: one copy per version in flight, as weight stashing).
    needs_forward_weights: bool = False

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        """Check or convert the stage optimizer; return the one to use."""
        return optimizer

    def correct_gradients(self, ctx: StageContext, update: UpdateContext, mb: int,
                          grads: list[Tensor | None], forward_weights: list[Tensor] | None
                          ) -> None:
        """Change a micro-batch's weight gradients in place (``None``: no gradient)."""

    def lr_scale(self, ctx: StageContext, updates: int) -> float:
        """Factor on the learning rate of the update after ``updates`` updates."""
        return 1.0

    def group_values(self, ctx: StageContext, optimizer: Optimizer
                     ) -> list[dict[str, Any]] | None:
        """Hyper-parameters to set in the groups of ``optimizer`` (the stage's optimizer as a
        whole: the groups of a :class:`~predictopt.combined.CombinedOptimizer` are those of its
        parts, in order) for the duration of every update and every prediction, like
        :meth:`lr_scale`: one dict per group of ``optimizer.param_groups`` (empty: leave that
        group), computed from the group's current values (what the user or a scheduler set,
        which the groups keep outside that window), or ``None`` for none."""
        return None

    def scales_lr_of(self, optimizer: Optimizer, stage_optimizer: Optimizer | None = None
                     ) -> bool:
        """Whether :meth:`lr_scale` applies to the groups of ``optimizer`` (the stage optimizer,
        or one part of a :class:`~predictopt.combined.CombinedOptimizer`, which is then
        ``stage_optimizer``; ``None``: the caller does not say)."""
        return True

    def before_step(self, ctx: StageContext, update: UpdateContext) -> None:
        """Called right before the optimizer step of every update (learning rate scaled)."""

    def after_step(self, ctx: StageContext, update: UpdateContext) -> None:
        """Called after the optimizer step of every update."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


# ---------------------------------------------------------------------------------------------
# Method
# ---------------------------------------------------------------------------------------------


def _own_rule(optimizer: Optimizer) -> PredictionRule:
    return get_rule(None, optimizer)


@dataclass(frozen=True)
class Method:
    r"""A pipeline training method (see the module docstring for the fields' meaning).

    Attributes:
        name: The registry name.
        forward: ``"current"``, ``"previous"`` or ``"predicted"``.
        backward: ``"forward"`` or ``"current"``.
        cadence: A :class:`Cadence`.
        rule: ``rule(optimizer) -> PredictionRule`` for predicting methods (default: the
            optimizer's own rule); ignored otherwise.
        calibrate: For predicting methods, whether the prediction's displacement is scaled by
            a gain fitted online per horizon (:class:`~predictopt.PredictiveOptimizer` with
            ``calibrate=True``, fitted at the horizons the stage predicts over): ``True``,
            ``False`` or ``calibrate(optimizer) -> bool`` for the stage optimizer (after the
            transforms' :meth:`~StageTransform.prepare`). A stage optimizer the user wraps in a
            ``PredictiveOptimizer`` keeps its own setting.
        transforms: :class:`StageTransform` objects, applied in order.
        schedules: Schedule names the method runs on (``None``: every pipeline schedule;
            ``("PB",)``: Pipelined Backpropagation only).
        staleness_free: No pipeline at all: every micro-batch runs through all stages on the
            current weights (the single-process reference ``sequential``).
        max_lag: The largest staleness the method can run (PipeDream-2BW: 1); ``None``: any.
        summary: One line for tables and ``--help``.
        source: Where the method comes from.
        calibration_every: With ``calibrate``, the ``calibration_every`` of that
            ``PredictiveOptimizer``: a sample of horizon $s$ starts at most once every
            $\max(s, k)$ updates (an int >= 1).
    """

    name: str
    forward: str = "current"
    backward: str = "forward"
    cadence: Cadence = PER_MICROBATCH
    rule: Callable[[Optimizer], PredictionRule] | None = None
    calibrate: bool | Callable[[Optimizer], bool] = False
    transforms: tuple[StageTransform, ...] = ()
    schedules: tuple[str, ...] | None = None
    staleness_free: bool = False
    max_lag: int | None = None
    summary: str = ""
    source: str = ""
    calibration_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if self.forward not in FORWARD_SOURCES:
            raise ValueError(f"forward must be one of {', '.join(FORWARD_SOURCES)}, got "
                             f"{self.forward!r}")
        if self.backward not in BACKWARD_SOURCES:
            raise ValueError(f"backward must be one of {', '.join(BACKWARD_SOURCES)}, got "
                             f"{self.backward!r}")
        if not isinstance(self.cadence, Cadence):
            raise TypeError(f"cadence must be a Cadence, got {type(self.cadence)!r}")
        if self.rule is not None and not callable(self.rule):
            raise TypeError("rule must be None or a callable optimizer -> PredictionRule")
        if not isinstance(self.calibrate, bool) and not callable(self.calibrate):
            raise TypeError(f"calibrate must be a bool or a callable optimizer -> bool, got "
                            f"{self.calibrate!r}")
        if (isinstance(self.calibration_every, bool) or not isinstance(self.calibration_every, int)
                or self.calibration_every < 1):
            raise ValueError(f"calibration_every must be an int >= 1, got "
                             f"{self.calibration_every!r}")
        ts = tuple(self.transforms)
        if not all(isinstance(t, StageTransform) for t in ts):
            raise TypeError("transforms must be StageTransform objects")
        object.__setattr__(self, "transforms", ts)
        if self.schedules is not None:
            object.__setattr__(self, "schedules", tuple(self.schedules))

    # ------------------------------------------------------------------ derived facts
    @property
    def predicts(self) -> bool:
        """Whether forwards run on predicted weights."""
        return self.forward == "predicted"

    @property
    def keeps_forward_weights(self) -> bool:
        """Whether the worker keeps each forward's weights until its backward completes."""
        return self.backward == "forward" or any(t.needs_forward_weights
                                                 for t in self.transforms)

    def prediction_rule(self, optimizer: Optimizer) -> PredictionRule | None:
        """The rule a predicting method uses for ``optimizer`` (``None`` if it does not
        predict)."""
        if not self.predicts:
            return None
        return (self.rule or _own_rule)(optimizer)

    def calibrates(self, optimizer: Optimizer) -> bool:
        """Whether a predicting method calibrates its prediction for ``optimizer``."""
        if not self.predicts:
            return False
        if isinstance(self.calibrate, bool):
            return self.calibrate
        return bool(self.calibrate(optimizer))

    def runs_on(self, schedule: str) -> bool:
        """Whether the method runs on the named schedule."""
        if self.schedules is None:
            return schedule != "PB" or self.cadence.kind == "microbatch"
        return schedule in self.schedules

    def with_(self, **changes: Any) -> Method:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available by its name everywhere a method name is accepted.

    Raises:
        TypeError: not a :class:`Method`.
        ValueError: the name is taken (unless ``replace``).
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a predictopt.pipeline.methods.Method, got "
                        f"{type(method)!r}")
    _ensure_builtins()
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already (pass "
                         "replace=True to replace it)")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    """The registered method names, in registration order."""
    _ensure_builtins()
    return list(_REGISTRY)


def get_method(spec: str | Method) -> Method:
    """The :class:`Method` for a registered name, or ``spec`` itself if it is a Method.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if isinstance(spec, Method):
        return spec
    _ensure_builtins()
    if isinstance(spec, str) and spec in _REGISTRY:
        return _REGISTRY[spec]
    raise ValueError(f"method must be one of {', '.join(_REGISTRY)} (or a Method); got "
                     f"{spec!r}")


_LOADING: list[bool] = []


def _ensure_builtins() -> None:
    """Import :mod:`predictopt.pipeline.catalog` (the built-in methods) once."""
    if not _LOADING:
        _LOADING.append(True)
        from . import catalog  # noqa: F401  (registers the built-in methods)


__all__ += ["FORWARD_SOURCES", "BACKWARD_SOURCES"]
