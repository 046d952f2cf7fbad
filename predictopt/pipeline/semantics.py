r"""Per-stage semantics of asynchronous pipeline training: one :class:`StageWorker` per stage.

A :class:`StageWorker` owns one pipeline stage (a module and its optimizer) and executes the
compute actions of a schedule for it: ``F`` (:meth:`~StageWorker.forward`), ``B``
(:meth:`~StageWorker.backward`) and, for zero-bubble schedules, ``I``
(:meth:`~StageWorker.backward_input`) and ``W`` (:meth:`~StageWorker.backward_weight`). It decides
which weights every forward runs on (current, stashed, previous version or predicted), and it
steps the stage's optimizer itself. The single-process :mod:`~predictopt.pipeline.simulator` and a
distributed ``PipelineStage`` subclass (whose ``forward_one_chunk`` / ``backward_one_chunk`` /
``backward_weight_one_chunk`` call into the worker) share this module unchanged.

Staleness
---------
Micro-batches ``i = 0..n-1`` of a step pass the stage in the local order of the rank holding it.
The stage updates after every ``u``-th *completed* backward (``B``, or ``W`` under the I/W split;
``u = update_every``). With ``v_i`` the updates done before ``F(i)`` and ``c_i`` the 1-based
position of ``i``'s completed backward, the update applying ``i``'s gradient is number
``ceil(c_i / u)``, and

.. math:: s(i) = \lceil c_i / u \rceil - 1 - v_i

is the number of the stage's updates between ``F(i)`` and that update, i.e. how many versions the
forward's weights lag behind the version a synchronous run would use
(:func:`predictopt.pipeline.staleness` computes the table). It is also exactly the number of
updates that happen between ``F(i)`` and ``i``'s completed backward, which the worker checks at
run time: a mismatch means the executed order is not the one the table was computed for.

Methods
-------
What a micro-batch's forward and backward see and how the stage updates is the
:class:`~predictopt.pipeline.methods.Method` the worker runs (a name of the registry,
:func:`~predictopt.pipeline.methods.available_methods`, or a ``Method`` value): its ``forward``
source (the current weights, the previous version, or weights predicted ``h(i)`` updates ahead),
its ``backward`` source (the forward's weights, or the current ones), its update cadence, its
prediction rule and its per-stage transforms (:mod:`predictopt.pipeline.transforms`). The
built-in methods are in :mod:`predictopt.pipeline.catalog`.

With ``backward = "forward"`` the backward of a micro-batch differentiates through exactly the
weights its forward used (autograd keeps them), and the gradient is applied to the real weights.
With ``backward = "current"`` (``pipeoptim-lean``, the ``pb-*-lean`` methods, ``pipemare``) the
forwards run under a ``saved_tensors_hooks`` pair that
saves, instead of a weight (or a view of one), a reference to the parameter, and gives autograd the
parameter's value at backward time; the activations autograd saves are the forward's. A tensor
the module *computes* from a weight (a scaled copy, an autocast cast) is saved as computed.

Gradient scaling
----------------
Each micro-batch contributes the gradient of the loss the caller passes (typically a mean over
the micro-batch's samples). The worker sums the gradients of the ``u`` micro-batches an update
covers, in the order their backwards complete, divides the sum by ``u`` (skipped when ``u = 1``)
and steps: the update uses the mean micro-batch gradient, which equals the gradient of the mean
loss over all ``u * B`` samples when the micro-batches have equal sizes.

Buffers
-------
Buffers (e.g. BatchNorm running statistics) are the module's own and are used and updated in
place by every forward as they come; they are neither stashed nor predicted.

Use from a distributed ``PipelineStage``
----------------------------------------
One worker per local stage, built with ``staleness = staleness(schedule, num_ranks, n,
stages_per_rank=spr, update_every=u)[stage_index]`` and ``input_grads = not is_first``:

* ``forward_one_chunk(i, args, kwargs)``: ``out = worker.forward(i, *args, **kwargs)``; send
  ``out``'s values; the last stage computes ``loss = loss_fn(out, target)``;
* ``backward_one_chunk(i, loss=None, full_backward=True)``: ``grads = worker.backward(i,
  grad_output=received, loss=loss)`` (``worker.backward_input`` when ``full_backward`` is
  false); send ``grads`` (the gradients of the forward's positional inputs, computed on the
  worker's own detached leaves: the receive buffers' ``.grad`` is not used);
* ``backward_weight_one_chunk(i)``: ``worker.backward_weight(i)``;
* the schedule runs with ``scale_grads=False`` and nobody calls ``optimizer.step()`` or
  ``zero_grad()``: the worker does.

Because each stage's weights depend only on its own rank's action order, this reproduces the
single-process simulator (:mod:`predictopt.pipeline.simulator`) bit for bit for the same initial
weights, optimizers, micro-batch split and loss function.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer

from ..optimizer import PredictiveOptimizer
from ..prediction import predict
from ..rules import PredictionRule, get_rule
from ..workspace import Workspace
from . import catalog
from .catalog import FirstMomentRule
from .methods import (
    Method,
    StageContext,
    StageTransform,
    UpdateContext,
    available_methods,
    get_method,
)
from .transforms import _parts as optimizer_parts

__all__ = [
    "LEAN_METHODS",
    "METHODS",
    "PIPELINE_METHODS",
    "PREDICTING_METHODS",
    "FirstMomentRule",
    "StageWorker",
    "check_method",
    "method_rule",
]

_ = catalog  # the built-in methods are registered on import
_BASE_CORRECT = StageTransform.correct_gradients
_BASE_AFTER = StageTransform.after_step
_BASE_BEFORE = StageTransform.before_step
_BASE_VALUES = StageTransform.group_values

#: The built-in methods that run on torch's pipeline schedules (and ``sequential``), by name.
METHODS: tuple[str, ...] = tuple(
    m for m in available_methods() if get_method(m).schedules is None)
#: The built-in methods the distributed runtime runs (all of :data:`METHODS` but the
#: single-process reference).
PIPELINE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if not get_method(m).staleness_free)
#: Built-in methods whose forwards run on predicted weights.
PREDICTING_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).predicts)
#: Built-in methods whose backwards use the stage's current weights instead of the forward's.
LEAN_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).backward == "current")


def check_method(method: Any) -> str:
    """The name of a registered method (or of a :class:`Method` value).

    Raises:
        ValueError: anything else (the message lists the registered names).
    """
    return get_method(method).name


def method_rule(method: str | Method, optimizer: Optimizer) -> PredictionRule | None:
    """The prediction rule a method prescribes for a bare optimizer (``None``: no prediction)."""
    return get_method(method).prediction_rule(optimizer)


# ---------------------------------------------------------------------------------------------
# StageWorker
# ---------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """What one in-flight micro-batch keeps between its forward and its completed backward."""

    inputs: tuple[Any, ...]  # what the module was called with (detached tensor leaves)
    outputs: tuple[Tensor, ...]  # the output's tensors, in order
    leaves: list[Tensor]  # the weights the forward used, as leaves (order of StageWorker.params)
    version: int  # stage updates done before the forward
    roots: list[Tensor] = field(default_factory=list)  # set by backward_input
    root_grads: list[Tensor | None] = field(default_factory=list)
    input_done: bool = False
    forward_weights: list[Tensor] | None = None  # kept for transforms that need them (DC-ASGD)


class _ValuesOf(torch.autograd.Function):
    """``_ValuesOf.apply(n, *leaves, *values)`` is ``values`` (views of them) in the forward and
    passes each one's gradient to the leaf at the same position: the forward computes at the
    values, the gradients reach the leaves. One autograd node for all ``n`` tensors."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused weight keeps a None gradient
        ctx.n = n
        return tuple(v.view_as(v) for v in tensors[n:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        return (None, *grads) + (None,) * ctx.n


@dataclass(frozen=True)
class _WeightRef:
    """What ``pipeoptim-lean``'s pack hook saves instead of a weight: which parameter, and the
    view of it autograd saved."""

    index: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _current_weight_hooks(weights: Sequence[Tensor], params: Sequence[Tensor],
                          value_of: Any = None):
    """``saved_tensors_hooks`` that save a weight of ``weights`` (or a view of one) as a reference
    to the parameter at the same position, and unpack it as a view of the parameter's value at
    backward time (or of ``value_of(i)``, a tensor laid out like parameter ``i``, when given).
    Weights in another dtype, device or layout than their parameter, and tensors computed from
    weights, are saved as they are."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for i, (w, p) in enumerate(zip(weights, params)):
        if w.dtype == p.dtype and w.stride() == p.stride() and w.device == p.device:
            by_storage.setdefault(w.untyped_storage().data_ptr(), []).append(
                (i, w.storage_offset(), w.numel()))

    def pack(t: Tensor) -> Any:
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        hits = by_storage.get(t.untyped_storage().data_ptr())
        if hits and t.dtype == params[hits[0][0]].dtype:
            off = t.storage_offset()
            for i, start, numel in hits:
                if start <= off < start + max(numel, 1):
                    return _WeightRef(i, tuple(t.size()), tuple(t.stride()), off - start)
        return t

    def unpack(x: Any) -> Tensor:
        if isinstance(x, _WeightRef):
            p = params[x.index].detach() if value_of is None else value_of(x.index)
            return p.as_strided(x.size, x.stride, p.storage_offset() + x.offset)
        return x

    return pack, unpack


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _flatten(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)):
        return tuple(t for t in out if isinstance(t, Tensor))
    raise TypeError(f"a stage must return a Tensor or a tuple/list of Tensors, got {type(out)!r}")


class StageWorker:
    r"""Executes one pipeline stage's forwards and backwards and steps its optimizer.

    The worker is driven by the compute actions of the rank holding the stage, in that rank's
    order (:func:`predictopt.pipeline.schedule_actions`); a step is ``n = len(staleness)``
    forwards and ``n`` completed backwards, each micro-batch once, and every ``update_every``-th
    completed backward (``B``, or ``W`` under the I/W split) steps the optimizer and zeroes the
    gradients (see the module docstring for the methods and the gradient scaling).

    Forward runs ``torch.func.functional_call(module, weights, inputs)`` with the weights the
    method prescribes: detached aliases of the real parameters (as leaves) when no update can
    happen before the micro-batch's backward completes (``s(i) = 0``), otherwise copies (one per
    version, shared by the forwards between two updates), predictions or the previous version,
    tensors nothing writes to, passed through an identity autograd function whose leaf is an
    alias of the parameter. Autograd thus keeps exactly the weights the forward used, and only
    until the backward has run (a caller may keep the loss and its graph: the copies and the
    per-micro-batch gradients are not reachable from it); the weight gradients are added to the
    real parameters' ``.grad`` when the backward completes, in completion order. Parameters of
    the module outside the optimizer are used as they are and receive no gradient; buffers are
    the module's own.

    Contract for a caller (the simulator, or a distributed ``PipelineStage`` subclass) that must
    reproduce the simulator bit for bit:

    * ``staleness`` is ``predictopt.pipeline.staleness(schedule, num_ranks, n, stages_per_rank=..,
      update_every=u)[stage]`` and the calls follow that rank's local order for this stage
      (checked: a backward raises ``RuntimeError``, before touching anything, if the number of
      updates since its forward differs from the table);
    * ``forward`` gets the micro-batch's inputs (data for the first stage, the previous stage's
      output values otherwise); the last stage computes ``loss = loss_fn(output, target)`` from
      the returned output and passes it, unscaled, to ``backward``/``backward_input``; the other
      stages pass the gradient received for their output as ``grad_output``;
    * nothing else steps the optimizer, zeroes or scales the gradients (torch schedules:
      ``scale_grads=False``, no ``optimizer.step()`` after ``schedule.step()``).

    Args:
        module: The stage's module.
        optimizer: A ``torch.optim.Optimizer`` over (a subset of) the module's parameters, or a
            :class:`~predictopt.PredictiveOptimizer` around one. A bare optimizer is wrapped in
            a ``PredictiveOptimizer`` with the method's rule and ``steps = max(1, max horizon)``
            (``steps = 0``, an exact pass-through, for methods that do not predict); a given
            wrapper is used with its own rule.
        method: A registered method name or a :class:`~predictopt.pipeline.methods.Method`.
        staleness: ``s(i)`` for every micro-batch ``i`` of a step (its length is ``n``).
        update_every: Completed backwards per optimizer update ``u`` (divides ``n``; the
            method's cadence says which values it accepts): 1 for the per-micro-batch methods,
            ``n`` for ``gpipe``, ``m`` for ``pipedream-2bw``, ``T`` for ``xpipe``.
        rule: Prediction rule overriding the method's (predicting methods and a bare optimizer
            only): a name or a :class:`~predictopt.rules.PredictionRule`.
        horizons: Prediction horizon per micro-batch (predicting methods only); default:
            ``staleness``. E.g. all zeros turns ``pipeoptim`` into ``pipedream``.
        input_grads: Whether floating-point tensor inputs get gradients (False for the first
            stage, whose inputs are data).
        stage: The stage's global index (what the method's transforms and the random streams
            see; default 0 for the streams).
        num_stages: The number of stages (needed by some transforms, e.g. adaptive momentum).
        seed: Base seed of the forwards' random streams; default ``torch.initial_seed()``.

    Random operations (dropout) in a forward draw from a stream seeded by a function of
    ``seed``, ``stage``, :attr:`step_index` and the micro-batch only (the global RNG state is
    restored afterwards), so a distributed run in which every process set the same seed
    reproduces the simulator bit for bit, dropout included.

    Raises:
        ValueError: unknown method, bad ``staleness``/``update_every``/``horizons``, a table
            the method cannot run (non-zero staleness for ``sequential``/``gpipe``, ``s >= 2``
            for ``pipedream-2bw``), ``rule``/``horizons`` given to a method that does not predict,
            or an optimizer holding tensors that are not parameters of ``module``.
        TypeError: ``module`` or ``optimizer`` of the wrong type.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        *,
        method: str | Method,
        staleness: Sequence[int],
        update_every: int = 1,
        rule: str | PredictionRule | None = None,
        horizons: Sequence[int] | None = None,
        input_grads: bool = True,
        stage: int | None = None,
        num_stages: int | None = None,
        seed: int | None = None,
    ) -> None:
        spec = get_method(method)
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module)!r}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        if isinstance(staleness, (str, bytes)) or not isinstance(staleness, Sequence):
            raise ValueError(f"staleness must be a sequence of ints >= 0, got {staleness!r}")
        if not staleness:
            raise ValueError("staleness must hold one entry per micro-batch (got none)")
        self.staleness = [_check_int(s, f"staleness[{i}]", 0) for i, s in enumerate(staleness)]
        self.n_microbatches = n = len(self.staleness)
        if stage is not None:
            _check_int(stage, "stage", 0)
        if num_stages is not None:
            _check_int(num_stages, "num_stages", 1)
        u = _check_int(update_every, "update_every", 1)
        if n % u:
            raise ValueError(f"update_every ({u}) must divide the number of micro-batches ({n})")
        spec.cadence.check(u, num_stages or 1, n, spec.name)
        name = spec.name
        if (spec.staleness_free or spec.cadence.kind == "step") and any(self.staleness):
            raise ValueError(f"staleness must be all zero for method {name!r}")
        if spec.max_lag is not None and max(self.staleness) > spec.max_lag:
            raise ValueError(
                f"staleness up to {max(self.staleness)} exceeds what method {name!r} can run "
                f"({spec.max_lag}: it keeps {spec.max_lag + 1} weight buffers); "
                "pipedream-2bw needs update_every large enough that s <= 1 (m >= num_stages)")
        self.spec: Method = spec
        self.method: str = name
        self.update_every = u
        predicting = spec.predicts
        if not predicting and (rule is not None or horizons is not None):
            raise ValueError(f"rule and horizons apply to predicting methods only (forward = "
                             f"'predicted'), not to method {name!r}")
        if horizons is None:
            self.horizons = list(self.staleness) if predicting else [0] * n
        else:
            if isinstance(horizons, (str, bytes)) or not isinstance(horizons, Sequence) \
                    or len(horizons) != n:
                raise ValueError(f"horizons must be a sequence of {n} ints >= 0, got {horizons!r}")
            self.horizons = [_check_int(h, f"horizons[{i}]", 0) for i, h in enumerate(horizons)]
        #: What the method's transforms know about this stage.
        self.context = StageContext(tuple(self.staleness), u, stage, num_stages)

        # ---- parameters (checked before any conversion of the optimizer)
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(pname, p) for pname, p in module.named_parameters() if id(p) in in_opt]
        if len(named) != len(in_opt):
            raise ValueError("optimizer holds tensors that are not parameters of module")

        # ---- optimizer: the method's transforms may check or convert it
        wrapped = isinstance(optimizer, PredictiveOptimizer)
        inner = optimizer.optimizer if wrapped else optimizer
        prepared = inner
        for t in spec.transforms:
            prepared = t.prepare(prepared, self.context)
        if wrapped:
            if prepared is not inner:
                raise ValueError(f"method {name!r} converts the stage optimizer; pass the bare "
                                 "optimizer, not a PredictiveOptimizer")
            if rule is not None:
                raise ValueError("rule must be None when optimizer is a PredictiveOptimizer "
                                 "(its own rule is used)")
            if predicting and optimizer.steps == 0 and any(self.horizons) and any(
                    optimizer.rule.observes(g) for g in optimizer.param_groups):
                raise ValueError("a PredictiveOptimizer with steps=0 records no observed updates; "
                                 "construct it with steps >= 1 for a predicting method")
            self.optimizer = optimizer
        else:
            if not predicting:  # steps=0: an exact pass-through; the rule is never used
                rule_obj = get_rule("observed")
            elif rule is not None:
                rule_obj = get_rule(rule, prepared)
            else:
                rule_obj = spec.prediction_rule(prepared)
            steps = max(1, max(self.horizons)) if predicting else 0
            # the published methods keep their formulas (calibrate=False); a method that
            # calibrates fits a gain at each horizon its stage predicts over
            fitted = tuple(sorted({h for h in self.horizons if h > 0}))
            calibrate = bool(fitted) and spec.calibrates(prepared)
            self.optimizer = PredictiveOptimizer(
                prepared, steps=steps, rule=rule_obj, calibrate=calibrate,
                calibration_horizons=fitted if calibrate else None,
                calibration_every=spec.calibration_every if calibrate else 1)
        self.rule: PredictionRule | None = self.optimizer.rule if predicting else None
        self.module = module
        self.param_names: list[str] = [pname for pname, _ in named]
        self.params: list[Tensor] = [p for _, p in named]
        self.input_grads = bool(input_grads)
        self._lean = spec.backward == "current"
        self._keep_forward = any(t.needs_forward_weights for t in spec.transforms)
        self._corrects = [t for t in spec.transforms
                          if type(t).correct_gradients is not _BASE_CORRECT]
        self._after = [t for t in spec.transforms if type(t).after_step is not _BASE_AFTER]
        self._before = [t for t in spec.transforms if type(t).before_step is not _BASE_BEFORE]
        self._valued = [t for t in spec.transforms if type(t).group_values is not _BASE_VALUES]
        self._backward_fix = [t for t in spec.transforms
                              if getattr(t, "corrects_backward_weights", False)]
        if self._backward_fix and not self._lean:
            raise ValueError(f"method {name!r}: a correction of the backward's weights needs "
                             "backward = 'current'")
        #: Per-parameter state of the method's transforms (part of a stage checkpoint).
        self.transform_state: dict[Tensor, dict[str, Any]] = {}
        #: Callables ``fn(worker)`` run after every update, once the learning rate the method
        #: scaled is restored and the gradients are cleared (e.g. a learning-rate scheduler
        #: stepped once per update: it then sees the optimizer's own ``lr``).
        self.after_update: list[Any] = []
        #: ``gate(worker) -> bool``, asked when an update window completes: ``False`` postpones
        #: the update until :meth:`release_update` (BitPipe's simulator: the first copy of a
        #: chunk waits there for its partner's window; ``None``: update at once).
        self.update_gate: Any = None
        self._warned_lr = False
        #: Steps the stage optimizer really made: an ``after_step`` transform corrects an update
        #: only when the optimizer made it (GradScaler and Lightning's 16-bit precision skip
        #: the step of a batch whose gradients overflowed, and the correction must skip too).
        self._steps_made = 0
        if self._after:
            ref = weakref.ref(self)

            def _made(*_args: Any) -> None:
                worker = ref()
                if worker is not None:
                    worker._steps_made += 1

            self.optimizer.optimizer.register_step_post_hook(_made)

        self._chunks: dict[int, _Chunk] = {}
        self._forwarded: set[int] = set()  # micro-batches forwarded in the current step
        self._previous: list[Tensor] | None = None  # pipedream-2bw: the version before the last
        # (version, copy of the weights at that version): the stash shared by every forward run
        # between the same two updates (pipedream-2bw: one buffer per version, not per forward)
        self._stash: tuple[int, list[Tensor]] | None = None
        self._accumulated = 0  # completed backwards whose gradients sit in .grad
        self._covered: list[int] = []  # the micro-batches of the update being accumulated
        #: Forwards run (all steps).
        self.num_forwards = 0
        #: Completed backwards (``B``, or ``W`` after ``I``; all steps).
        self.num_backwards = 0
        #: Optimizer updates applied (all steps).
        self.num_updates = 0
        #: Steps completed (or aborted); with ``stage`` and the micro-batch it seeds the random
        #: stream of every forward.
        self.step_index = 0
        self._done_in_step = 0
        #: Base seed of the forwards' random streams (dropout): ``seed``, else the seed the
        #: process set (``torch.initial_seed()``) when the worker was built.
        self.seed = torch.initial_seed() if seed is None else _check_int(seed, "seed", 0)
        self._devices = sorted({p.device.index or 0 for p in self.params
                                if p.device.type == "cuda"})
        self._cpu_only = all(p.device.type == "cpu" for p in self.params) and all(
            b.device.type == "cpu" for b in module.buffers())
        #: The buffers the worker reuses from one micro-batch to the next: predictions and
        #: stashed copies (:class:`~predictopt.workspace.Workspace`; a buffer is reused only
        #: once nothing references it). :meth:`release_buffers` frees them.
        self.workspace = Workspace(max_per_key=n + 1)
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ introspection
    @property
    def in_flight(self) -> list[int]:
        """Micro-batches forwarded whose backward has not completed, sorted."""
        return sorted(self._chunks)

    @property
    def previous_version(self) -> list[Tensor] | None:
        """``pipedream-2bw``'s second version: the weights before the last update, in
        ``params`` order (``None`` before the first update and for every other method).

        Part of a stage checkpoint; assigning stores detached copies. Only between steps.
        """
        return self._previous

    @previous_version.setter
    def previous_version(self, value: list[Tensor] | None) -> None:
        if self.in_flight:
            raise RuntimeError(f"previous_version can only be set between steps; micro-batches "
                               f"{self.in_flight} are in flight")
        if value is not None:
            value = list(value)
            if len(value) != len(self.params) or any(
                    v.shape != p.shape for v, p in zip(value, self.params)):
                raise ValueError(f"previous_version must hold {len(self.params)} tensors shaped "
                                 f"like the stage's parameters")
            value = [v.detach().to(p.device, p.dtype).clone() for v, p in zip(value, self.params)]
        self._previous = value

    def __repr__(self) -> str:
        return (f"StageWorker(method={self.method!r}, n_microbatches={self.n_microbatches}, "
                f"update_every={self.update_every}, staleness={self.staleness}, "
                f"rule={self.rule!r})")

    def release_buffers(self) -> None:
        """Free the buffers the worker keeps for reuse (:attr:`workspace`); the next micro-batches
        allocate them again. Between steps only (buffers in use live on where they are used)."""
        self.workspace.release()

    def abort_step(self) -> dict[str, Any]:
        """Drop everything a failed step left in flight, so that the next step can run.

        Forgets the pending forwards, the gradients accumulated towards the next update and the
        step's bookkeeping; updates already applied stay applied (they cannot be undone
        without a copy of the weights).

        Returns:
            ``{"in_flight": [...], "accumulated": k}``: the micro-batches dropped and how many
            completed backwards' gradients were discarded.
        """
        info = {"in_flight": self.in_flight, "accumulated": self._accumulated}
        self._chunks.clear()
        self._forwarded.clear()
        self._accumulated = 0
        self._covered.clear()
        self._stash = None
        self.optimizer.zero_grad(set_to_none=True)
        self.workspace.release()
        if self._done_in_step or info["in_flight"]:
            self._done_in_step = 0
            self.step_index += 1
        return info

    # ------------------------------------------------------------------ forward
    def _check_mb(self, mb: Any) -> int:
        if isinstance(mb, bool) or not isinstance(mb, int) or not 0 <= mb < self.n_microbatches:
            raise ValueError(f"mb must be an int in [0, {self.n_microbatches}), got {mb!r}")
        return mb

    def lr_scale(self) -> float:
        """The factor the method's transforms put on the learning rate of the next update."""
        f = 1.0
        for t in self.spec.transforms:
            f *= t.lr_scale(self.context, self.num_updates)
        return f

    def _parts(self) -> tuple[Optimizer, ...]:
        """The stage optimizer, or the parts of a CombinedOptimizer (groups in their order)."""
        return optimizer_parts(self.optimizer.optimizer)

    def _lr_mask(self) -> list[bool]:
        """Per parameter group, whether the method's lr scale applies to it (a transform may
        leave some optimizers at their rate: :meth:`StageTransform.scales_lr_of`)."""
        whole = self.optimizer.optimizer
        return [all(t.scales_lr_of(part, whole) for t in self.spec.transforms)
                for part in self._parts() for _ in part.param_groups]

    @contextlib.contextmanager
    def _group_values(self) -> Any:
        """Set the transforms' :meth:`StageTransform.group_values` for the duration of an update
        or a prediction; afterwards each entry gets its value back unless something (a
        scheduler hooked to the step) set it meanwhile."""
        changes: list[tuple[dict[str, Any], str, Any, Any]] = []
        try:
            opt = self.optimizer.optimizer
            for t in self._valued:
                values = t.group_values(self.context, opt)
                for g, d in zip(opt.param_groups, values or ()):
                    for key, v in d.items():
                        changes.append((g, key, g[key], v))
                        g[key] = v
            yield
        finally:
            for g, key, old, new in reversed(changes):
                if g[key] is new:
                    g[key] = old

    def _future_lrs(self, h: int, scale: float) -> list[list[float]] | None:
        if scale == 1.0:
            return None
        base = self.optimizer._future_lrs(h)
        if base is None:
            base = [[float(g["lr"])] * h for g in self.optimizer.param_groups]
        return [[lr * scale for lr in row] if m else row
                for row, m in zip(base, self._lr_mask())]

    def _backward_values(self, mb: int) -> Any:
        """With backward = "current" and a transform that corrects the backward's weights:
        ``value_of(i)``, the corrected value of parameter ``i``, computed at its first use in
        the backward (with the number of updates since the forward) and reused."""
        if not self._backward_fix:
            return None
        version, cache = self.num_updates, {}
        state, ctx, fix = self.transform_state, self.context, self._backward_fix[0]

        def value_of(i: int) -> Tensor:
            if i not in cache:
                p = self.params[i]
                cache[i] = fix.backward_weight(ctx, state, p, self.num_updates - version)
            return cache[i]

        return value_of

    def _stream_seed(self, mb: int) -> int:
        """The seed of micro-batch ``mb``'s forward in the current step: a function of the base
        seed, the stage, the step and the micro-batch only, so the random ops (dropout) of a
        forward are the same wherever and in whatever order it runs."""
        h = self.seed
        for v in (self.context.stage or 0, self.step_index, mb):
            h = (h * 0x9E3779B97F4A7C15 + v + 1) % (1 << 63)
        return h

    def _seed(self, seed: int) -> None:
        """Seed the generators a forward of this stage draws from: the CPU one for a stage on
        the CPU (``torch.manual_seed`` would also reseed every accelerator, for 70 us), else
        all of them."""
        if self._cpu_only:
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    @torch.no_grad()
    def _weights(self, mb: int) -> list[Tensor]:
        """The values forward(mb) runs on; tensors no later update writes to if s(mb) > 0
        (except with backward = "current", whose backward reads the current weights anyway)."""
        s = 0 if self._lean else self.staleness[mb]
        ps = self.params
        if self.spec.forward == "previous" and s == 0 and self._previous is not None:
            return [t.detach() for t in self._previous]  # never written to: no copy needed
        h = self.horizons[mb]
        ws = self.workspace
        if h > 0:
            with self._group_values():
                pred = predict(self.optimizer, h, rule=self.rule,
                               lrs=self._future_lrs(h, self.lr_scale()), workspace=ws)
            vals = [pred[p] for p in ps]
            if s > 0:  # unpredicted parameters come back as aliases: stash them
                alias = [i for i, (v, p) in enumerate(zip(vals, ps))
                         if v.data_ptr() == p.data_ptr()]
                if alias:
                    copies = [ws.buffer(("copy", i), ps[i]) for i in alias]
                    torch._foreach_copy_(copies, [ps[i] for i in alias])
                    for i, c in zip(alias, copies):
                        vals[i] = c
            return vals
        if s > 0:  # an exact copy, shared by the forwards until the next update
            if self._stash is None or self._stash[0] != self.num_updates:
                copies = [ws.buffer(("copy", i), p) for i, p in enumerate(ps)]
                torch._foreach_copy_(copies, ps)
                self._stash = (self.num_updates, copies)
            return [t.detach() for t in self._stash[1]]  # own leaves, shared storage
        if self._keep_forward and self.staleness[mb] > 0:  # lean + a transform that needs them
            return [p.detach().clone() for p in ps]
        return [p.detach() for p in ps]

    def forward(self, mb: int, *inputs: Any, **kwargs: Any) -> Any:
        """Run micro-batch ``mb`` through the stage on the weights the method prescribes.

        Args:
            mb: Micro-batch index in ``[0, n)``; each once per step.
            *inputs: Positional inputs. Tensors are detached; floating-point ones require grad
                when ``input_grads`` (their gradients are what :meth:`backward` returns).
            **kwargs: Passed to the module as they are.

        Returns:
            The module's output (with its graph): feed it, or its values, to the next stage, or
            compute the loss from it on the last stage.

        Raises:
            ValueError: ``mb`` out of range.
            RuntimeError: ``mb`` was forwarded already in this step.
        """
        mb = self._check_mb(mb)
        if mb in self._forwarded:
            raise RuntimeError(f"micro-batch {mb} was forwarded already in this step")
        args = tuple(
            (x.detach().requires_grad_(self.input_grads and x.is_floating_point())
             if isinstance(x, Tensor) else x)
            for x in inputs
        )
        values = self._weights(mb)
        # an alias of the real weight is its own leaf; a copy gets an alias of the parameter as
        # its leaf, so that only autograd's saved tensors hold the copy (it dies with the backward)
        copies = [i for i, (p, v) in enumerate(zip(self.params, values))
                  if v.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()]
        leaves = list(values)
        for i in copies:
            leaves[i] = self.params[i].detach()
        for leaf in leaves:
            leaf.requires_grad_()
        weights = list(leaves)
        if copies:
            views = _ValuesOf.apply(len(copies), *(leaves[i] for i in copies),
                                    *(values[i] for i in copies))
            for i, w in zip(copies, views):
                weights[i] = w
        if self._lean and (self.staleness[mb] or self.horizons[mb]):
            hooks = torch.autograd.graph.saved_tensors_hooks(
                *_current_weight_hooks(weights, self.params, self._backward_values(mb)))
        else:
            hooks = contextlib.nullcontext()
        with hooks, torch.random.fork_rng(devices=self._devices):
            self._seed(self._stream_seed(mb))
            out = functional_call(self.module, dict(zip(self.param_names, weights)), args, kwargs)
        kept = [v.detach() for v in values] if self._keep_forward else None
        del values, weights  # copies: referenced by autograd only (lean: not at all)
        outputs = _flatten(out)
        self._chunks[mb] = _Chunk(args, outputs, leaves, self.num_updates, forward_weights=kept)
        self._forwarded.add(mb)
        self.num_forwards += 1
        return out

    # ------------------------------------------------------------------ backward
    def _chunk(self, mb: int, *, want_input_done: bool, completes: bool) -> _Chunk:
        mb = self._check_mb(mb)
        chunk = self._chunks.get(mb)
        if chunk is None:
            raise RuntimeError(f"micro-batch {mb} has no pending forward")
        if chunk.input_done != want_input_done:
            raise RuntimeError(
                f"micro-batch {mb}: backward_input ran already; call backward_weight"
                if chunk.input_done else
                f"micro-batch {mb}: backward_weight needs backward_input first"
            )
        # The contract: exactly s(mb) updates between F(mb) and its completed backward (at most
        # s(mb) before I). Checked before autograd, whose own error would be less clear.
        lag, s = self.num_updates - chunk.version, self.staleness[mb]
        if lag > s or (completes and lag != s):
            raise RuntimeError(
                f"micro-batch {mb}: {lag} updates happened since its forward, but staleness"
                f"[{mb}] = {s}: the calls do not follow the order the staleness table was "
                "computed for"
            )
        return chunk

    @staticmethod
    def _roots(chunk: _Chunk, grad_output: Any, loss: Tensor | None
               ) -> tuple[list[Tensor], list[Tensor | None]]:
        if (grad_output is None) == (loss is None):
            raise ValueError("pass exactly one of grad_output (inner stages) and loss (last stage)")
        if loss is not None:
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss must be a one-element Tensor computed from the output")
            return [loss], [None]
        grads = _flatten(grad_output) if not isinstance(grad_output, (tuple, list)) \
            else tuple(grad_output)
        if len(grads) != len(chunk.outputs):
            raise ValueError(f"grad_output must hold one entry per output tensor "
                             f"({len(chunk.outputs)}), got {len(grads)}")
        pairs = [(o, g) for o, g in zip(chunk.outputs, grads)
                 if g is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _input_leaves(self, chunk: _Chunk) -> list[Tensor]:
        return [x for x in chunk.inputs if isinstance(x, Tensor) and x.requires_grad]

    def backward(self, mb: int, grad_output: Tensor | Sequence[Tensor | None] | None = None,
                 loss: Tensor | None = None) -> tuple[Tensor | None, ...]:
        """Full backward of micro-batch ``mb`` (action ``B``); may step the optimizer.

        Args:
            mb: The micro-batch.
            grad_output: Gradient of the stage's output (a tensor, or one entry per tensor of
                a tuple output, e.g. the next stage's return value; ``None`` entries and outputs
                without a graph are skipped). Inner stages.
            loss: The loss computed from the last stage's output (unscaled). Last stage.

        Returns:
            One entry per positional input of :meth:`forward`: its gradient, or ``None``.
        """
        chunk = self._chunk(mb, want_input_done=False, completes=True)
        roots, grads = self._roots(chunk, grad_output, loss)
        ins = self._input_leaves(chunk)
        wanted = ins + chunk.leaves
        if roots and wanted:
            torch.autograd.backward(roots, grads, inputs=wanted)
        in_grads = tuple(x.grad if isinstance(x, Tensor) and x.requires_grad else None
                         for x in chunk.inputs)
        for x in ins:  # returned, not kept: the graph may outlive the call
            x.grad = None
        self._complete(mb, chunk)
        return in_grads

    def backward_input(self, mb: int,
                       grad_output: Tensor | Sequence[Tensor | None] | None = None,
                       loss: Tensor | None = None) -> tuple[Tensor | None, ...]:
        """Input-gradient half of the backward (action ``I``); keeps the graph for ``W``.

        Arguments and return value as :meth:`backward`. Does not complete the backward.
        """
        chunk = self._chunk(mb, want_input_done=False, completes=False)
        roots, grads = self._roots(chunk, grad_output, loss)
        ins = self._input_leaves(chunk)
        got: dict[int, Tensor | None] = {}
        if roots and ins:
            gs = torch.autograd.grad(roots, ins, grads, retain_graph=True, allow_unused=True)
            got = {id(x): g for x, g in zip(ins, gs)}
        chunk.roots, chunk.root_grads, chunk.input_done = roots, grads, True
        return tuple(got.get(id(x)) if isinstance(x, Tensor) else None for x in chunk.inputs)

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient half of the backward (action ``W``); completes it, may step."""
        chunk = self._chunk(mb, want_input_done=True, completes=True)
        if chunk.roots and chunk.leaves:
            torch.autograd.backward(chunk.roots, chunk.root_grads, inputs=chunk.leaves)
        self._complete(mb, chunk)

    # ------------------------------------------------------------------ completion and update
    def _update_context(self) -> UpdateContext:
        return UpdateContext(self.optimizer.optimizer, self.params, self.num_updates,
                             list(self._covered), self.transform_state, self.workspace)

    @torch.no_grad()
    def _complete(self, mb: int, chunk: _Chunk) -> None:
        del self._chunks[mb]
        if self._corrects:
            grads = [leaf.grad for leaf in chunk.leaves]
            ctx = self._update_context()
            for t in self._corrects:
                t.correct_gradients(self.context, ctx, mb, grads, chunk.forward_weights)
        chunk.forward_weights = None
        new_p, new_g, acc_p, acc_g = [], [], [], []
        for p, leaf in zip(self.params, chunk.leaves):
            g = leaf.grad
            if g is None:
                continue
            if p.grad is None:
                new_p.append(p)
                new_g.append(g)
            else:
                acc_p.append(p.grad)
                acc_g.append(g)
        for p, g in zip(new_p, new_g):
            p.grad = g
        if acc_p:
            torch._foreach_add_(acc_p, acc_g)
        for leaf in chunk.leaves:  # the graph (e.g. a loss the caller keeps) still reaches the
            leaf.grad = None       # leaves: do not let it keep a gradient per micro-batch
        chunk.leaves.clear()
        self.num_backwards += 1
        self._accumulated += 1
        self._covered.append(mb)
        if self._accumulated == self.update_every and (
                self.update_gate is None or self.update_gate(self)):
            self._update()
        self._done_in_step += 1
        if self._done_in_step == self.n_microbatches and not self._chunks:
            self._forwarded.clear()  # a step is over (schedules flush)
            self._done_in_step = 0
            self.step_index += 1

    def release_update(self) -> None:
        """Make the update an ``update_gate`` postponed (its window complete, nothing run on
        the stage since).

        Raises:
            RuntimeError: no postponed update.
        """
        if self._accumulated != self.update_every:
            raise RuntimeError("release_update: no update is waiting (its window is not "
                               "complete)")
        self._update()

    @torch.no_grad()
    def _update(self) -> None:
        u = self._accumulated
        if u > 1:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, float(u))
        if self.spec.forward == "previous":  # the version being replaced: the stash if any
            stash = self._stash
            self._previous = (stash[1] if stash is not None and stash[0] == self.num_updates
                              else list(torch._foreach_mul(self.params, 1.0)))
        self._stash = None
        scale = self.lr_scale()
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        scaled = ([lr * scale if m else lr for lr, m in zip(saved, self._lr_mask())]
                  if scale != 1.0 else saved)
        for g, lr in zip(groups, scaled):
            g["lr"] = lr  # a new object: a Tensor lr of the user is not written to
        try:
            with self._group_values():
                if self._before:
                    ctx = self._update_context()
                    for t in self._before:
                        t.before_step(self.context, ctx)
                made = self._steps_made
                self.optimizer.step()
                if self._after and self._steps_made != made:
                    ctx = self._update_context()
                    for t in self._after:
                        t.after_step(self.context, ctx)
        finally:
            changed = False
            for g, lr, mine in zip(groups, saved, scaled):
                if g["lr"] is mine:  # unless something (a scheduler hooked to the step) set it
                    g["lr"] = lr
                else:
                    changed = True
            if changed and scale != 1.0 and not self._warned_lr:
                self._warned_lr = True
                warnings.warn(
                    f"stage {self.context.stage}: the learning rate was set during the update (a "
                    f"scheduler hooked to optimizer.step?) while method {self.method!r} scaled it "
                    f"by {scale:g} for that update, so the scheduler read the scaled value and "
                    f"the new learning rate is kept as it set it. Step schedulers after "
                    f"schedule.step() or in after_update_hooks (docs: Pipeline methods)",
                    stacklevel=3)
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = 0
        self._covered.clear()
        self.num_updates += 1
        for fn in self.after_update:
            fn(self)
