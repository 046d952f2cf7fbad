r"""Single-process simulation of pipeline-parallel training with per-stage semantics.

A model is given as a list of consecutive stage modules. :class:`PipelineSimulator` builds one
:class:`~predictopt.pipeline.semantics.StageWorker` per stage and, for every training step,
splits the batch into ``n`` equal micro-batches and executes the schedule's actions in
:func:`~predictopt.pipeline.global_order` (a dependency-respecting interleaving of all ranks'
local orders). Only the local order of the rank holding a stage matters for that stage's
weights, so the simulation reproduces bit for bit what a distributed run of the same schedule
with the same workers computes. The ``sequential`` method ignores the schedule and runs each
micro-batch forward through all stages, then backward, then updates every stage.

``schedule="PB"`` is fine-grained Pipelined Backpropagation (:mod:`~predictopt.pipeline.pb`):
every stage its own rank, one update per completed backward, a step is one stream of ``n``
micro-batches in the tick order of :func:`~predictopt.pipeline.pb.pb_global_order` (no flush
inside it, drained at its end), and the methods ``pb``, ``pb-sc``, ``pb-lwp``, ``pb-sc-lwp`` and
their ``-lean`` twins (:data:`~predictopt.pipeline.pb.PB_METHODS`) run on it with momentum SGD.
Every method with one update per micro-batch (``sequential``, ``pipedream``, ``pipeoptim``, ...)
runs on it too.

Example::

    from predictopt.data import load_dataset, mlp_stages
    from predictopt.pipeline import PipelineSimulator, train

    ds = load_dataset("digits")
    sim = PipelineSimulator(mlp_stages(64, 64, 10, 4), lambda p: torch.optim.AdamW(p, 1e-3),
                            method="pipeoptim", schedule="1F1B", n_microbatches=8)
    losses = train(sim, ds.x_train, ds.y_train, epochs=5, microbatch_size=16)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .methods import DEFAULT_METHOD, Method, get_method
from .pb import PB_SCHEDULE, pb_global_order, pb_staleness
from .schedules import Action, global_order, stage_to_rank, staleness
from .semantics import StageWorker

__all__ = [
    "PipelineSimulator",
    "SimulationResult",
    "default_update_every",
    "simulate",
    "train",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def default_update_every(method: str | Method, num_stages: int, n_microbatches: int) -> int:
    """The number of completed backwards per update a method uses by default.

    Per micro-batch cadence: 1; per step (``gpipe``): ``n``; window (``pipedream-2bw``,
    ``xpipe``): the smallest divisor of ``n`` that is ``>= num_stages`` (2BW's ``m >= K``;
    XPipe's ``T`` micro-batches per mini-batch, one per stage), or ``n`` if there is none.

    Raises:
        ValueError: unknown method or non-positive sizes.
    """
    spec = get_method(method)
    _check_int(num_stages, "num_stages")
    n = _check_int(n_microbatches, "n_microbatches")
    return spec.cadence.default(num_stages, n)


class PipelineSimulator:
    r"""Trains a model split into stages with a pipeline method, in one process.

    Args:
        stages: The consecutive stage modules (stage 0 first); stage ``k``'s output is stage
            ``k+1``'s input (a tuple output is passed as several arguments).
        make_optimizer: ``make_optimizer(params) -> torch.optim.Optimizer``, called once per stage
            with that stage's parameters; the worker wraps it in a
            :class:`~predictopt.PredictiveOptimizer`.
        method: A registered method name (:func:`~predictopt.pipeline.available_methods`) or a
            :class:`~predictopt.pipeline.methods.Method`. The PB methods
            (:data:`~predictopt.pipeline.pb.PB_METHODS`) run on ``schedule="PB"`` only, with a
            ``torch.optim.SGD`` with momentum from ``make_optimizer`` (``pb-sc*`` turn it into a
            :class:`~predictopt.spike.SpikeCompensatedSGD` with the stage's delay $D_k$).
        schedule: A schedule name of :data:`~predictopt.pipeline.SUPPORTED_SCHEDULES`, or
            ``"PB"`` (Pipelined Backpropagation; accepted in any case). Default: ``"PB"`` for the
            PB methods, ``"1F1B"`` otherwise.
        n_microbatches: Micro-batches per step ``n`` (for ``"PB"``: the length of one stream,
            e.g. the samples of an epoch at one sample per micro-batch).
        num_ranks: Pipeline ranks; default ``len(stages) / stages_per_rank`` (``stages_per_rank``
            is 2 for multi-stage schedules, 1 otherwise). Must match ``len(stages)`` if given.
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean over the micro-batch).
        update_every: Completed backwards per update; default
            :func:`default_update_every`. Only methods with a window cadence
            (``pipedream-2bw``: ``>= num_stages``; ``xpipe``) accept other values.
        rule: Prediction rule overriding the method's (predicting methods only; the PB methods
            fix theirs: ``"sgd"`` for ``pb-lwp`` and ``pb-sc-lwp``).
        horizons: ``{stage: [h(0), ..., h(n-1)]}`` overriding the prediction horizons
            (predicting methods, ``pb-lwp`` and ``pb-sc-lwp`` included); default: the
            staleness table.

    Attributes:
        workers: The :class:`StageWorker` of every stage.
        method: The method's name.
        spec: The :class:`~predictopt.pipeline.methods.Method`.
        staleness: ``{stage: [s(stage, i)]}`` the workers run with (zeros for ``sequential``).
        order: The actions one :meth:`step` executes, in order.

    Raises:
        ValueError: any bad argument (the message names it), or a configuration the schedule
            rejects.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        make_optimizer: OptimizerFactory,
        *,
        method: str | Method = DEFAULT_METHOD,
        schedule: str | None = None,
        n_microbatches: int,
        num_ranks: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        update_every: int | None = None,
        rule: Any = None,
        horizons: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        spec = get_method(method)
        if schedule is None:
            schedule = spec.schedules[0] if spec.schedules else "1F1B"
        is_pb = isinstance(schedule, str) and schedule.lower() == PB_SCHEDULE.lower()
        if is_pb:
            schedule = PB_SCHEDULE
        if not spec.runs_on(schedule) and (is_pb or spec.schedules is not None):
            if spec.schedules is not None:
                names = ", ".join(repr(x) for x in spec.schedules)
                raise ValueError(f"method {spec.name!r} runs on schedule {names} only, got "
                                 f"{schedule!r}")
            raise ValueError(f"schedule {PB_SCHEDULE!r} updates after every backward: it runs "
                             f"methods with one update per micro-batch, not {spec.name!r}")
        self.spec: Method = spec
        self.method: str = spec.name
        if isinstance(stages, nn.Module) or not isinstance(stages, Sequence) or not stages:
            raise ValueError("stages must be a non-empty sequence of nn.Module")
        if not all(isinstance(m, nn.Module) for m in stages):
            raise ValueError("stages must be a non-empty sequence of nn.Module")
        if not callable(make_optimizer):
            raise ValueError("make_optimizer must be callable: params -> torch.optim.Optimizer")
        if not callable(loss_fn):
            raise ValueError("loss_fn must be callable: (output, target) -> loss")
        n = _check_int(n_microbatches, "n_microbatches")
        num_stages = len(stages)
        spr = 1 if is_pb else len(stage_to_rank(schedule, 1))  # validates the schedule name
        if num_stages % spr:
            raise ValueError(f"schedule {schedule!r} places {spr} stages per rank; the number of "
                             f"stages ({num_stages}) must be a multiple of {spr}")
        derived = num_stages // spr
        if num_ranks is not None:
            _check_int(num_ranks, "num_ranks")
            if num_ranks != derived:
                raise ValueError(f"num_ranks must be len(stages) / stages_per_rank = {derived} "
                                 f"for {num_stages} stages on {schedule!r}, got {num_ranks}")
        if update_every is None:
            u = spec.cadence.default(num_stages, n)
        else:
            u = spec.cadence.check(_check_int(update_every, "update_every"), num_stages, n,
                                   spec.name)
        if horizons is not None and not spec.predicts:
            raise ValueError(f"horizons apply to predicting methods only, not to {spec.name!r}")
        if rule is not None and (not spec.predicts or spec.schedules is not None):
            raise ValueError(f"rule applies to predicting methods only (the PB methods fix "
                             f"their own), not to {spec.name!r}")
        horizons = dict(horizons or {})
        if any(k not in range(num_stages) for k in horizons):
            raise ValueError(f"horizons keys must be stage indices 0..{num_stages - 1}")

        self.stages = list(stages)
        self.schedule = schedule
        self.num_ranks = derived
        self.stages_per_rank = spr
        self.n_microbatches = n
        self.update_every = u
        self.loss_fn = loss_fn
        if spec.staleness_free:
            self.staleness = {k: [0] * n for k in range(num_stages)}
            self.order = [
                Action(kind, k, i)
                for i in range(n)
                for kind, ks in (("F", range(num_stages)), ("B", reversed(range(num_stages))))
                for k in ks
            ]
        elif is_pb:
            self.staleness = pb_staleness(num_stages, n)
            self.order = pb_global_order(num_stages, n)
        else:
            self.staleness = staleness(schedule, derived, n, stages_per_rank=spr, update_every=u)
            self.order = global_order(schedule, derived, n, stages_per_rank=spr)
        self.workers: list[StageWorker] = []
        for k, m in enumerate(self.stages):
            self.workers.append(StageWorker(
                m,
                make_optimizer(m.parameters()),
                method=spec,
                staleness=self.staleness[k],
                update_every=u,
                rule=rule,
                horizons=horizons.get(k),
                input_grads=k > 0,
                stage=k,
                num_stages=num_stages,
            ))

    # ------------------------------------------------------------------ properties
    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    @property
    def max_staleness(self) -> int:
        """Largest lag, in the stage's own updates, of the weights a forward starts from.

        The version a synchronous run would use minus the version the forward reads before any
        prediction: ``max s(k, i)`` for ``pipedream``, ``spectrain``, ``xpipe``, ``pipeoptim``
        (the predicting ones compensate it), 1 for ``pipedream-2bw`` (by design), 0 for
        ``sequential`` and ``gpipe``; on ``"PB"``, $D_0 = 2 (K - 1)$ once the stream is longer
        than that.
        """
        if self.spec.forward == "previous":
            return 1
        return max(max(v) for v in self.staleness.values())

    # ------------------------------------------------------------------ training
    def step(self, x: Tensor, y: Tensor) -> list[float]:
        """One training step on a batch: ``n`` micro-batches through the schedule.

        Args:
            x: Inputs, batch first; the batch size must be a multiple of ``n``.
            y: Targets, same batch size.

        Returns:
            The loss of every micro-batch, in micro-batch order.

        Raises:
            ValueError: batch sizes that differ or are not a multiple of ``n_microbatches``.
        """
        n = self.n_microbatches
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim == 0 or y.ndim == 0:
            raise ValueError("x and y must be tensors with a batch dimension")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and "
                             f"{y.shape[0]}")
        if x.shape[0] == 0 or x.shape[0] % n:
            raise ValueError(f"the batch size of x ({x.shape[0]}) must be a positive multiple "
                             f"of n_microbatches ({n})")
        size = x.shape[0] // n
        xs, ys = x.split(size), y.split(size)
        last = self.num_stages - 1
        acts: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], tuple[Tensor | None, ...]] = {}
        losses: list[Tensor | None] = [None] * n
        for a in self.order:
            k, i, w = a.stage, a.microbatch, self.workers[a.stage]
            if a.kind == "F":
                inp = xs[i] if k == 0 else acts.pop((k - 1, i))
                out = w.forward(i, *inp) if isinstance(inp, tuple) else w.forward(i, inp)
                if k == last:
                    losses[i] = self.loss_fn(out, ys[i])
                else:
                    acts[(k, i)] = tuple(out) if isinstance(out, list) else out
            elif a.kind == "W":
                w.backward_weight(i)
            else:
                if k == last:
                    kw: dict[str, Any] = {"loss": losses[i]}
                else:
                    kw = {"grad_output": grads.pop((k + 1, i))}
                fn = w.backward if a.kind == "B" else w.backward_input
                g = fn(i, **kw)
                if k > 0:
                    grads[(k, i)] = g
        return [float(loss.detach()) for loss in losses]  # type: ignore[union-attr]

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> Tensor:
        """The model's output on ``x`` with the real (current) weights, without gradients."""
        out: Any = x
        for m in self.stages:
            out = m(*out) if isinstance(out, tuple) else m(out)
        return out

    @torch.no_grad()
    def loss_and_accuracy(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """``(loss_fn(output, y), accuracy)`` on ``(x, y)``; accuracy is argmax vs ``y``."""
        out = self.evaluate(x)
        loss = float(self.loss_fn(out, y))
        acc = float((out.argmax(-1) == y).float().mean()) if out.ndim > 1 else float("nan")
        return loss, acc


def train(
    sim: PipelineSimulator,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    microbatch_size: int,
    seed: int = 0,
    progress: Any = None,
    per_microbatch: bool = False,
) -> list[float]:
    """Train for some epochs over a dataset; return the loss of every step.

    Each epoch shuffles the samples with a generator seeded by ``seed + epoch``, cuts them into
    batches of ``microbatch_size * n_microbatches`` (the last incomplete batch is dropped) and runs
    :meth:`PipelineSimulator.step` on each. For ``schedule="PB"`` a step is one stream, drained
    at its end: with ``microbatch_size=1`` and ``n_microbatches`` = the samples per epoch, an
    epoch is one stream of single samples (the mapping of :mod:`~predictopt.pipeline.pb`).

    Args:
        sim: The simulator.
        x: All training inputs (batch first).
        y: All training targets.
        epochs: Passes over the data (>= 1).
        microbatch_size: Samples per micro-batch (>= 1).
        seed: Seed of the shuffling.
        progress: Optional object with ``update(n)`` (e.g. a ``tqdm`` bar), called after each
            step; it may also have ``set_postfix``.
        per_microbatch: Return every micro-batch's loss (in the order the samples were drawn)
            instead of one mean per step; useful for long PB streams.

    Returns:
        Per step, the mean of its micro-batch losses (or every micro-batch's loss).

    Raises:
        ValueError: bad sizes, or fewer samples than one batch.
    """
    _check_int(epochs, "epochs")
    _check_int(microbatch_size, "microbatch_size")
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y must have the same number of samples")
    batch = microbatch_size * sim.n_microbatches
    steps = x.shape[0] // batch
    if steps == 0:
        raise ValueError(f"microbatch_size * n_microbatches ({batch}) exceeds the number of "
                         f"samples ({x.shape[0]})")
    out: list[float] = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            losses = sim.step(x[idx], y[idx])
            if per_microbatch:
                out.extend(losses)
            else:
                out.append(sum(losses) / len(losses))
            if progress is not None:
                progress.update(1)
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}",
                                         refresh=False)
    return out


@dataclass
class SimulationResult:
    """What :func:`simulate` returns."""

    simulator: PipelineSimulator
    losses: list[float]


def simulate(
    stages: Sequence[nn.Module],
    make_optimizer: OptimizerFactory,
    x: Tensor,
    y: Tensor,
    *,
    method: str | Method = DEFAULT_METHOD,
    schedule: str | None = None,
    n_microbatches: int,
    microbatch_size: int,
    epochs: int = 1,
    num_ranks: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    update_every: int | None = None,
    rule: Any = None,
    seed: int = 0,
    progress: Any = None,
) -> SimulationResult:
    """Build a :class:`PipelineSimulator` and :func:`train` it; see both for the arguments."""
    sim = PipelineSimulator(
        stages, make_optimizer, method=method, schedule=schedule, n_microbatches=n_microbatches,
        num_ranks=num_ranks, loss_fn=loss_fn, update_every=update_every, rule=rule,
    )
    losses = train(sim, x, y, epochs=epochs, microbatch_size=microbatch_size, seed=seed,
                   progress=progress)
    return SimulationResult(sim, losses)
