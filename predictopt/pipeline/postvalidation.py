r"""Optimizer post-validation (Zero Bubble, Sec. 4): global gradient clipping and NaN/Inf
skipping without a synchronisation before the optimizer step.

What it means with per-stage updates
------------------------------------
Stage $k$'s $j$-th update applies its gradient $g_{k,j}$ (the mean over the micro-batches the
update covers). The *synchronous* rule looks at the whole model's gradient of update $j$:

.. math::

    n_{k,j} = \lVert (\lVert t \rVert_2)_{t \in g_{k,j}} \rVert_2, \qquad
    G_j = \lVert (n_{0,j}, \dots, n_{S-1,j}) \rVert_2, \qquad
    c_j = \min\Bigl(1, \frac{\text{max\_norm}}{G_j + \epsilon}\Bigr),

every stage steps with $c_j\,g_{k,j}$, and if $G_j$ is not finite (a NaN or an Inf in any
stage) update $j$ is skipped on every stage (no step, the optimizer state unchanged). This needs
every stage's $n_{k,j}$ before any stage steps: a barrier across the pipeline at every update.

*Post-validation* removes the barrier: stage $k$ steps as soon as its own gradient is ready,
with the coefficient (or skip) that the norms reported so far give (its own and those of the
stages that finished update $j$ before it), keeping a snapshot of its weights, optimizer state
and raw gradient. When the last stage reports update $j$, every stage validates: if the
coefficient (or the skip) it used differs from the one of $G_j$, which can happen only when
clipping triggers or a value is not finite, it restores the snapshot and redoes the step with
$c_j$ (or skips), then redoes its later updates still awaiting validation. With
``max_norm`` large enough never to clip and finite gradients no step is ever redone.

After validation every stage's weights and optimizer state are exactly (bit for bit) those of
the synchronous rule applied to the same gradients. With one update per step (``gpipe``), no
forward runs between a stage's step and the validation, so post-validated training equals
synchronously clipped training exactly. With per-micro-batch updates a stage may forward
micro-batches on the optimistic weights before the validation arrives (on the rare redone
steps only); their gradients are applied as computed, like any other stale gradient.

Across ranks (:class:`DistributedPostValidation`): each rank steps its own stages
optimistically on their own norms and sends its $n_{k,j}$ to every rank with an asynchronous
``all_gather`` on a gloo group of its own as soon as its stages have reported update $j$ (no
rank waits for it); the validation happens in :meth:`DistributedPostValidation.validate`, after
every ``schedule.step()``, on every rank with the same norms. The paper passes partial
reductions along the pipeline instead; one small all-gather per update is simpler and its
latency is hidden behind the rest of the step. Validation at the end of the step is the
*deferred* rule (``PostValidation(..., deferred=True)``), which the simulator runs too, so the
distributed run equals the simulator bit for bit, redone steps included (tested on 2 ranks).

A method's ``after_step`` transforms
(e.g. quasi-hyperbolic momentum, the default method's) are part of the step: they run on the
clipped gradient, are undone with it and redone with it (the transforms' own state, the worker's
``transform_state``, is in the snapshot). Step hooks on the optimizer (e.g. an LR scheduler
stepped by a hook) would run again on a redone step: step schedulers from the worker's
``after_update`` hooks instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .semantics import StageWorker

__all__ = ["DistributedPostValidation", "PostValidation"]


@dataclass
class _Pending:
    """One optimistic update of a stage, kept until update ``index`` is validated."""

    index: int
    snapshot: dict[str, Any]  # weights, optimizer state and group entries before the step
    grads: list[Tensor | None]  # the raw (unclipped) gradient, in worker.params order
    hyper: list[dict[str, Any]]  # the param groups' entries at step time (e.g. a scaled lr)
    used: tuple[bool, Tensor | None]  # (skipped, coefficient) the step used


def _stage_norm(grads: Sequence[Tensor]) -> Tensor:
    """$n_k$: the 2-norm of the per-tensor 2-norms, in float32 (0 without gradients)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = [torch.linalg.vector_norm(g.detach(), 2.0).float().cpu() for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


class PostValidation:
    r"""Global-norm clipping and NaN/Inf skipping by post-validation, for a set of stages.

    Wraps the ``step`` of every worker's optimizer (the workers call it after every
    ``update_every``-th completed backward). Construct it before the first step.

    Example::

        sim = PipelineSimulator(stages, make_optimizer, method="gpipe", n_microbatches=8)
        pv = PostValidation(sim.workers, max_norm=1.0)
        sim.step(x, y)                       # clipped by the global norm, validated
        pv.redone, pv.skipped                # counters

    Args:
        workers: Every stage's :class:`~predictopt.pipeline.StageWorker`, stage 0 first (e.g.
            ``PipelineSimulator.workers``).
        max_norm: Clip the global gradient norm of every update to this value (``None``: no
            clipping, only the NaN/Inf check).
        skip_nonfinite: Skip an update on every stage when its global norm is not finite.
        eps: $\epsilon$ of the coefficient (torch's ``clip_grad_norm_`` uses ``1e-6``).
        record: Keep, per stage, every validated update's raw gradient, group entries and
            (skip, coefficient) in :attr:`history` (for tests and audits; costs memory).
        deferred: Validate only when :meth:`validate` is called (after every step of the
            pipeline), and step optimistically with what the stage's *own* norm gives (skip if
            it is not finite, clip by it if it alone exceeds ``max_norm``). The validation
            points and the optimistic steps then depend on nothing but the stage and the step,
            which is what a distributed run can reproduce
            (:class:`DistributedPostValidation` is deferred): with it the simulator is the
            distributed run's oracle, bit for bit, redone steps included. The cost: each stage
            keeps a snapshot per update until the end of the step.

    Attributes:
        redone: Stage steps restored and redone after validation.
        skipped: Updates skipped on every stage (non-finite global norm).
        clipped: Updates whose coefficient was below 1.
        history: ``[[(grads, hyper, (skipped, coefficient)), ...] per stage]`` if ``record``.

    Raises:
        ValueError: no workers, workers of different ``update_every``, a non-positive
            ``max_norm`` or ``eps``.
        TypeError: ``deferred`` not a bool.
    """

    def __init__(self, workers: Sequence[StageWorker], *, max_norm: float | None = None,
                 skip_nonfinite: bool = True, eps: float = 1e-6, record: bool = False,
                 deferred: bool = False) -> None:
        workers = list(workers)
        if not isinstance(deferred, bool):
            raise TypeError(f"deferred must be a bool, got {deferred!r}")
        if not workers or not all(isinstance(w, StageWorker) for w in workers):
            raise ValueError("workers must be a non-empty sequence of StageWorker (stage 0 "
                             "first), e.g. PipelineSimulator.workers")
        if len({w.update_every for w in workers}) != 1:
            raise ValueError("every worker must update after the same number of micro-batches "
                             f"(update_every), got {[w.update_every for w in workers]}")
        if max_norm is not None and (isinstance(max_norm, bool) or not max_norm > 0):
            raise ValueError(f"max_norm must be None or a number > 0, got {max_norm!r}")
        if isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.workers = workers
        self.deferred = deferred
        #: The global stage index of each worker and the number of stages of the pipeline.
        self._ids: list[int] = list(range(len(workers)))
        self._total = len(workers)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.eps = float(eps)
        self.record = bool(record)
        self.redone = self.skipped = self.clipped = 0
        self.history: list[list[tuple[Any, ...]]] = [[] for _ in workers]
        self._count = [0] * len(workers)
        self._norms: dict[int, dict[int, Tensor]] = {}
        self._pending: list[list[_Pending]] = [[] for _ in workers]
        self._real: list[Callable[..., Any]] = []
        for k, w in enumerate(workers):
            self._real.append(w.optimizer.step)
            w.optimizer.step = (lambda *a, _k=k, **kw: self._step(_k))  # type: ignore[method-assign]

    # ------------------------------------------------------------------ the rule
    def coefficient(self, norms: Sequence[Tensor]) -> tuple[bool, Tensor | None]:
        """``(skip, c)`` for the stage norms given (all stages: the synchronous rule)."""
        total = torch.linalg.vector_norm(torch.stack(list(norms)), 2.0)
        if self.skip_nonfinite and not bool(torch.isfinite(total)):
            return True, None
        if self.max_norm is None:
            return False, None
        coef = torch.clamp(self.max_norm / (total + self.eps), max=1.0)
        return False, (None if bool(coef == 1.0) else coef)

    @staticmethod
    def _same(a: tuple[bool, Tensor | None], b: tuple[bool, Tensor | None]) -> bool:
        if a[0] or b[0]:
            return a[0] == b[0]
        if a[1] is None or b[1] is None:
            return a[1] is None and b[1] is None
        return bool(torch.equal(a[1], b[1]))

    # ------------------------------------------------------------------ snapshots
    @staticmethod
    @torch.no_grad()
    def _snapshot(w: StageWorker) -> dict[str, Any]:
        inner = w.optimizer.optimizer
        state = []
        for p in w.params:
            st = inner.state.get(p)
            state.append(None if st is None else {
                key: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                for key, v in st.items()})
        return {"params": [p.detach().clone() for p in w.params], "state": state,
                "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                           for g in inner.param_groups],
                "transforms": copy.deepcopy(w.transform_state)}

    @staticmethod
    @torch.no_grad()
    def _restore(w: StageWorker, snap: dict[str, Any]) -> None:
        inner = w.optimizer.optimizer
        for p, saved, st in zip(w.params, snap["params"], snap["state"]):
            p.copy_(saved)
            if st is None:
                inner.state.pop(p, None)
            else:
                inner.state[p] = {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                                  for k, v in st.items()}
        for g, saved in zip(inner.param_groups, snap["groups"]):
            for key, value in saved.items():
                if key.startswith("predictopt_"):  # the wrapper's statistics: state
                    g[key] = copy.deepcopy(value)
        w.transform_state.clear()
        w.transform_state.update(copy.deepcopy(snap["transforms"]))

    @torch.no_grad()
    def _apply(self, k: int, grads: list[Tensor | None], used: tuple[bool, Tensor | None],
               hyper: list[dict[str, Any]] | None) -> None:
        """Step stage ``k`` with ``grads`` (cloned) scaled or skipped as ``used`` says, under the
        group entries ``hyper`` (the current ones if ``None``), keeping whatever gradients the
        stage accumulates towards its next update."""
        w = self.workers[k]
        inner = w.optimizer.optimizer
        keep = [p.grad for p in w.params]
        skip, coef = used
        for p, g in zip(w.params, grads):
            p.grad = None if (g is None or skip) else g.clone()
        if coef is not None:
            present = [p.grad for p in w.params if p.grad is not None]
            if present:
                torch._foreach_mul_(present, coef.to(present[0].device))
        current = None
        if hyper is not None:
            current = [{k2: v for k2, v in g.items() if k2 != "params"}
                       for g in inner.param_groups]
            for g, h in zip(inner.param_groups, hyper):
                g.update({k2: v for k2, v in h.items() if not k2.startswith("predictopt_")})
        try:
            made = w._steps_made
            self._real[k]()
            if w._after and w._steps_made != made:  # the method's corrections of the step
                ctx = w._update_context()
                for t in w._after:
                    t.after_step(w.context, ctx)
        finally:
            if current is not None:
                for g, c in zip(inner.param_groups, current):
                    g.update({k2: v for k2, v in c.items() if not k2.startswith("predictopt_")})
            for p, g in zip(w.params, keep):
                p.grad = g

    # ------------------------------------------------------------------ the protocol
    def _step(self, k: int) -> None:
        w = self.workers[k]
        j = self._count[k]
        self._count[k] += 1
        grads = [None if p.grad is None else p.grad.detach().clone() for p in w.params]
        norms = self._norms.setdefault(j, {})
        norms[self._ids[k]] = _stage_norm([g for g in grads if g is not None])
        snapshot = self._snapshot(w)
        known = [norms[self._ids[k]]] if self.deferred else [norms[s] for s in sorted(norms)]
        used = self.coefficient(known)
        self._pending[k].append(_Pending(j, snapshot, grads, snapshot["groups"], used))
        made = w._steps_made
        self._apply(k, grads, used, None)  # runs the method's after_step corrections itself,
        w._steps_made = made                # so the worker must not run them again
        for p in w.params:  # as after a plain step: the worker zeroes them next
            p.grad = None
        self._reported(j)

    def _reported(self, j: int) -> None:
        """A stage reported update ``j``: validate it once every stage has (unless deferred)."""
        if not self.deferred and len(self._norms[j]) == self._total:
            self._validate(j)

    def validate(self) -> None:
        """Validate every update all stages have reported (``deferred=True``: call it after
        every ``step`` of the pipeline; without deferral updates validate on their own)."""
        for j in sorted(self._norms):
            if len(self._norms[j]) == self._total:
                self._validate(j)

    def _validate(self, j: int) -> None:
        norms = self._norms.pop(j)
        final = self.coefficient([norms[s] for s in range(self._total)])
        self.skipped += final[0]
        self.clipped += final[1] is not None
        for k, w in enumerate(self.workers):
            queue = self._pending[k]
            head = queue[0]
            assert head.index == j, (head.index, j)  # updates complete in order
            if not self._same(head.used, final):
                self.redone += 1
                self._restore(w, head.snapshot)
                head.used = final
                for i, entry in enumerate(queue):  # redo j, then the later optimistic ones
                    if i:
                        entry.snapshot = self._snapshot(w)
                    self._apply(k, entry.grads, entry.used, entry.hyper)
            queue.pop(0)
            if self.record:
                self.history[k].append((head.grads, head.hyper, final))

    @property
    def pending(self) -> list[int]:
        """Updates awaiting validation, per stage."""
        return [len(q) for q in self._pending]


class DistributedPostValidation(PostValidation):
    r"""Post-validation across the ranks of a pipeline: the norms travel by an asynchronous
    ``all_gather`` (see the module docstring), the validation waits for them after each step.

    Construct it on every rank, with the rank's own attached stages, after the schedule
    exists and before its first step; call :meth:`validate` after every ``schedule.step()``
    (before reading the weights or saving a checkpoint). Attaching the stages to another
    schedule makes new workers: construct a new one then::

        stages, schedule = build_pipeline(modules, "1F1B", rank=rank, world_size=world,
                                          n_microbatches=8, make_optimizer=make_opt,
                                          loss_fn=F.cross_entropy)
        pv = DistributedPostValidation(stages, max_norm=1.0)
        for x, y in batches:
            schedule.step(...)
            pv.validate()

    Args:
        stages: This rank's :class:`~predictopt.pipeline.runtime.PredictiveStage` objects,
            attached to their schedule (``build_pipeline`` or ``attach(schedule)``); every rank
            the same number.
        group: The process group of the pipeline's ranks (default: the world). The norms go
            through a new gloo group over the same ranks (created here, a collective call), so
            that they never queue behind the pipeline's own messages and work under NCCL.
        max_norm: As for :class:`PostValidation`.
        skip_nonfinite: As for :class:`PostValidation`.
        eps: As for :class:`PostValidation`.
        record: As for :class:`PostValidation`.

    Raises:
        ValueError: a stage not attached to a schedule, stages of different pipelines, ranks
            with different numbers of stages, or as :class:`PostValidation`.
        RuntimeError: ``torch.distributed`` not initialised.
    """

    def __init__(self, stages: Sequence[Any], *, group: Any = None,
                 max_norm: float | None = None, skip_nonfinite: bool = True,
                 eps: float = 1e-6, record: bool = False) -> None:
        import torch.distributed as dist

        from .runtime import PredictiveStage

        stages = list(stages)
        if not stages or not all(isinstance(s, PredictiveStage) for s in stages):
            raise ValueError("stages must be a non-empty sequence of this rank's "
                             "PredictiveStage objects")
        detached = [s.stage_index for s in stages if s.worker is None]
        if detached:
            raise ValueError(f"stages {detached} are not attached to a schedule: build them "
                             "with build_pipeline(...) or call attach(schedule) first")
        if len({s.num_stages for s in stages}) != 1:
            raise ValueError("the stages belong to pipelines of different lengths: "
                             f"{[s.num_stages for s in stages]}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedPostValidation needs torch.distributed initialised "
                               "(init_process_group) on every rank")
        super().__init__([s.worker for s in stages], max_norm=max_norm,
                         skip_nonfinite=skip_nonfinite, eps=eps, record=record, deferred=True)
        self._ids = [stages[k].stage_index for k in range(len(stages))]
        self._total = stages[0].num_stages
        ranks = None if group is None else dist.get_process_group_ranks(group)
        self._group = dist.new_group(ranks=ranks, backend="gloo")
        self._world = dist.get_world_size(self._group)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world)]
        dist.all_gather(counts, torch.tensor([len(stages)]), group=self._group)
        if len({int(c) for c in counts}) != 1:
            raise ValueError(f"every rank must pass the same number of stages, got "
                             f"{[int(c) for c in counts]} per rank")
        if len(counts) * len(stages) != self._total:
            raise ValueError(f"the ranks hold {len(counts) * len(stages)} stages, the pipeline "
                             f"has {self._total}")
        self._inflight: list[tuple[int, Any, list[Tensor]]] = []
        self._id_row = torch.tensor(self._ids, dtype=torch.float32)  # sent beside the norms

    def _reported(self, j: int) -> None:
        norms = self._norms[j]
        if not all(i in norms for i in self._ids):
            return
        local = torch.stack([self._id_row, torch.stack([norms[i] for i in self._ids])])
        outs = [torch.empty_like(local) for _ in range(self._world)]
        work = torch.distributed.all_gather(outs, local, group=self._group, async_op=True)
        self._inflight.append((j, work, outs))

    def validate(self) -> None:
        """Wait for the norms of every update this rank's stages made and validate them."""
        while self._inflight:
            j, work, outs = self._inflight.pop(0)
            work.wait()
            norms = self._norms[j]
            for t in outs:
                for i, n in zip(t[0].tolist(), t[1]):
                    norms.setdefault(int(i), n.clone())
            super().validate()
