r"""BitPipe (Wu et al., arXiv 2410.19367): two V-shaped interleaved pipelines in opposite
directions on the same ranks, with the replicas' gradients synchronised eagerly.

Placement
---------
The model is cut into ``S = 2K`` chunks for ``K`` ranks and held twice. Replica ``A`` ("down")
runs the chunks in a V from rank 0: chunk ``c`` on rank ``c`` for ``c < K`` and on rank
``2K - 1 - c`` after the turn; replica ``B`` ("up") runs the mirrored V from rank ``K - 1``:
chunk ``c`` on rank ``K - 1 - c``, then ``c - K``. Rank ``d`` holds chunks ``d`` and
``2K - 1 - d`` of ``A`` and ``K - 1 - d`` and ``K + d`` of ``B``: twice 1F1B's weights, and the
copies of every chunk sit on ranks ``d`` and ``K - 1 - d`` (``K`` even, so that these differ).
The first half of a step's ``m`` micro-batches flows through ``A``, the second half through
``B``.

Order
-----
`bitpipe_actions` is the earliest-start list schedule of both pipelines with unit costs
($T_F = 1$, $T_B = 2$, the full backward ``B`` as in the authors' Megatron fork): each rank,
when free, runs a ready forward before a ready backward and the deeper chunk first, and a
direction admits a new micro-batch only while fewer than ``K`` of its micro-batches are in
flight (1F1B's warm-up). For 4 ranks and 4 micro-batches this is the order of the paper's figure
on device 1, with its makespan (28 units). The authors' fork (wuhouming/BitPipe) was readable
to us only in a version whose schedule file is Megatron's own, so the rule is ours; the
placement and the split are the paper's.

Eager synchronisation and staleness
-----------------------------------
Both copies of chunk ``c`` always hold the same weights. Update ``u`` of chunk ``c`` applies the
mean of the gradients of copy ``A``'s and copy ``B``'s ``u``-th completed update window
($(g_A + g_B) / 2$, reduced as soon as both are complete: *eager*, not at the end of the step),
and a rank waits for its partner at that point. A copy's weight version at a forward is
therefore the number of its own completed windows before it in its rank's order, so the
staleness of a micro-batch comes from the local order exactly as for the other schedules
(`bitpipe_staleness`). The mirror symmetry of the two pipelines makes partners reach their
synchronisation points at the same time: the wait costs nothing (`bitpipe_timeline` checks it
with the waits included).

Scope: `BitPipeSimulator` trains with it in one process (every method that runs on torch's
schedules); each copy's update runs in its own worker (its learning-rate factor, its after-step
corrections), the first copy of a pair postponed until its partner's window completes.
`~predictopt.pipeline.bitpipe_runtime.BitPipeRuntime` runs it across processes, bit for bit
the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .methods import DEFAULT_METHOD, Method, get_method
from .schedules import Action, TimelineEntry, _duration_table, _staleness_of_orders
from .semantics import StageWorker

__all__ = [
    "BITPIPE_SCHEDULE",
    "BitPipeSimulator",
    "bitpipe_actions",
    "bitpipe_peak_activations",
    "bitpipe_placement",
    "bitpipe_staleness",
    "bitpipe_timeline",
    "replica_of",
]

#: The schedule's name (a simulator-only schedule, like ``"PB"``).
BITPIPE_SCHEDULE = "BitPipe"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check(num_ranks: int, n: int) -> tuple[int, int]:
    k = _positive_int(num_ranks, "num_ranks")
    if k % 2:
        raise ValueError(f"num_ranks must be even for BitPipe (rank d and its mirror K-1-d hold "
                         f"the two copies of the same chunks), got {k}")
    m = _positive_int(n, "n_microbatches")
    if m % 2:
        raise ValueError(f"n_microbatches must be even for BitPipe (half of them flow through "
                         f"each direction), got {m}")
    return k, m


def replica_of(microbatch: int, n_microbatches: int) -> str:
    """``"A"`` for the first half of the micro-batches, ``"B"`` for the second."""
    return "A" if microbatch < n_microbatches // 2 else "B"


def bitpipe_placement(num_ranks: int) -> dict[tuple[str, int], int]:
    """``{(replica, chunk): rank}`` for the ``2K`` chunks of both replicas."""
    k = _positive_int(num_ranks, "num_ranks")
    out: dict[tuple[str, int], int] = {}
    for c in range(2 * k):
        out[("A", c)] = c if c < k else 2 * k - 1 - c
        out[("B", c)] = k - 1 - c if c < k else c - k
    return out


def bitpipe_actions(num_ranks: int, n_microbatches: int) -> dict[int, list[Action]]:
    """Every rank's compute actions (``Action(kind, chunk, micro-batch)``; the replica is the
    micro-batch's half, `replica_of`).

    Raises:
        ValueError: non-positive sizes or an odd number of micro-batches.
    """
    k, m = _check(num_ranks, n_microbatches)
    cap = k  # micro-batches of one direction in flight (entered, backward not done)
    place = bitpipe_placement(k)
    s = 2 * k
    mbs = {"A": list(range(m // 2)), "B": list(range(m // 2, m))}
    nxt = {(r, c, kind): 0 for r in "AB" for c in range(s) for kind in "FB"}
    end: dict[tuple[str, int, int], float] = {}
    free = [0.0] * k
    out: dict[int, list[Action]] = {d: [] for d in range(k)}
    copies = {d: [rc for rc, dd in place.items() if dd == d] for d in range(k)}
    total = 2 * s * m
    inf = float("inf")

    def ready(rep: str, c: int, kind: str) -> float:
        j = nxt[(rep, c, kind)]
        if j >= m // 2:
            return inf
        i = mbs[rep][j]
        if kind == "F":
            if c == 0 and j - nxt[(rep, 0, "B")] >= cap:  # micro-batches in flight
                return inf
            return 0.0 if c == 0 else end.get(("F", c - 1, i), inf)
        deps = [end.get(("F", c, i), inf)]
        if c < s - 1:
            deps.append(end.get(("B", c + 1, i), inf))
        return max(deps)

    while len(end) < total:
        best = None
        for d in range(k):
            options = []
            for rep, c in copies[d]:
                for kind in "BF":
                    t = max(free[d], ready(rep, c, kind))
                    if t < inf:  # forward first, then the deeper chunk
                        options.append((t, kind == "B", -c, rep, c, kind))
            if options:
                pick = min(options)
                if best is None or (pick[0], d) < (best[0][0], best[1]):
                    best = (pick, d)
        assert best is not None, "BitPipe list scheduling stalled (a bug)"
        (t, _, _, rep, c, kind), d = best
        i = mbs[rep][nxt[(rep, c, kind)]]
        nxt[(rep, c, kind)] += 1
        end[(kind, c, i)] = t + (1.0 if kind == "F" else 2.0)
        free[d] = end[(kind, c, i)]
        out[d].append(Action(kind, c, i))
    return out


def _copy_orders(actions: Mapping[int, Sequence[Action]], m: int) -> dict[tuple[str, int], list]:
    """Each copy's actions in its rank's order."""
    out: dict[tuple[str, int], list[Action]] = {}
    for acts in actions.values():
        for a in acts:
            out.setdefault((replica_of(a.microbatch, m), a.stage), []).append(a)
    return out


def bitpipe_staleness(num_ranks: int, n_microbatches: int, *,
                      update_every: int = 1) -> dict[tuple[str, int], list[int]]:
    """Staleness of every copy's micro-batches: ``{(replica, chunk): [s(i) for i in its half]}``.

    Each copy updates (with its partner) after every ``update_every``-th of its completed
    backwards, counted in its rank's order (see the module docstring).

    Raises:
        ValueError: bad sizes, or ``update_every`` not dividing ``n_microbatches / 2``.
    """
    k, m = _check(num_ranks, n_microbatches)
    _positive_int(update_every, "update_every")
    if (m // 2) % update_every:
        raise ValueError(f"update_every ({update_every}) must divide the micro-batches of one "
                         f"direction ({m // 2})")
    out = {}
    for key, acts in _copy_orders(bitpipe_actions(k, m), m).items():
        table = _staleness_of_orders([acts], update_every)
        out[key] = table[key[1]]
    return dict(sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def bitpipe_peak_activations(num_ranks: int, n_microbatches: int) -> dict[int, float]:
    """Peak activations per rank, in micro-batches of a ``1/K`` share of the model (a chunk is
    half of one, so every held (chunk, micro-batch) counts ``1/2``): comparable with 1F1B's
    ``p``."""
    k, m = _check(num_ranks, n_microbatches)
    out = {}
    for d, acts in bitpipe_actions(k, m).items():
        held = peak = 0
        for a in acts:
            held += 1 if a.kind == "F" else -1
            peak = max(peak, held)
        out[d] = peak / 2
    return out


def bitpipe_timeline(num_ranks: int, n_microbatches: int, *,
                     durations: Mapping[str, float] | None = None, update_every: int = 1,
                     sync: bool = True) -> list[TimelineEntry]:
    """Earliest-start execution of `bitpipe_actions`, with the eager synchronisation waits.

    Besides the data dependencies (``F(c-1, i) -> F(c, i)``, ``F(c, i), B(c+1, i) -> B(c, i)``),
    with ``sync`` a rank's action after a copy's ``u``-th update window waits for the partner
    copy to complete its ``u``-th window (transfers take no time).

    Returns:
        ``[TimelineEntry(rank, start, end, action), ...]``.

    Raises:
        RuntimeError: the waits deadlock (the schedule's symmetry prevents it).
    """
    k, m = _check(num_ranks, n_microbatches)
    dur = _duration_table(durations, 2 * k)
    actions = bitpipe_actions(k, m)
    s = 2 * k
    # (replica, chunk, window) -> the action completing that window
    window_end: dict[tuple[str, int, int], tuple[str, int, int]] = {}
    done: dict[tuple[str, int], int] = {}
    for acts in actions.values():
        for a in acts:
            if a.kind == "B":
                key = (replica_of(a.microbatch, m), a.stage)
                done[key] = done.get(key, 0) + 1
                if done[key] % update_every == 0:
                    window_end[(*key, done[key] // update_every)] = ("B", a.stage, a.microbatch)
    end_of: dict[tuple[str, int, int], float] = {}
    pos = {d: 0 for d in actions}
    free = {d: 0.0 for d in actions}
    wait: dict[int, tuple[str, int, int] | None] = {d: None for d in actions}
    counts: dict[tuple[str, int], int] = {}
    entries: list[TimelineEntry] = []
    remaining = sum(len(v) for v in actions.values())
    while remaining:
        progressed = False
        for d, acts in actions.items():
            while pos[d] < len(acts):
                a = acts[pos[d]]
                deps = []
                if a.kind == "F" and a.stage > 0:
                    deps.append(("F", a.stage - 1, a.microbatch))
                if a.kind == "B":
                    deps.append(("F", a.stage, a.microbatch))
                    if a.stage < s - 1:
                        deps.append(("B", a.stage + 1, a.microbatch))
                if wait[d] is not None:
                    deps.append(wait[d])
                if any(x not in end_of for x in deps):
                    break
                start = max([free[d], *(end_of[x] for x in deps)])
                stop = start + dur[a.kind][a.stage]
                end_of[(a.kind, a.stage, a.microbatch)] = stop
                entries.append(TimelineEntry(d, start, stop, a))
                free[d], pos[d], wait[d] = stop, pos[d] + 1, None
                remaining -= 1
                progressed = True
                if a.kind == "B" and sync:
                    rep = replica_of(a.microbatch, m)
                    counts[(rep, a.stage)] = counts.get((rep, a.stage), 0) + 1
                    n_done = counts[(rep, a.stage)]
                    if n_done % update_every == 0:
                        other = "B" if rep == "A" else "A"
                        wait[d] = window_end[(other, a.stage, n_done // update_every)]
        if not progressed:
            raise RuntimeError("BitPipe's eager synchronisation deadlocks")
    return sorted(entries, key=lambda e: (e.rank, e.start))


def _global_order(num_ranks: int, n: int, update_every: int) -> list[Action]:
    tl = bitpipe_timeline(num_ranks, n, update_every=update_every)
    return [e.action for e in sorted(tl, key=lambda e: (e.start, e.rank))]


def _configure(method: str | Method, num_chunks: int, n_microbatches: int,
               update_every: int | None) -> tuple[Method, int, int, int]:
    """``(method, K, m, u)`` of a BitPipe run over ``num_chunks`` chunks; ``u``: completed
    backwards of one copy per update."""
    spec = get_method(method)
    if spec.staleness_free or spec.schedules is not None:
        raise ValueError(f"method {spec.name!r} does not run on pipeline schedules")
    if num_chunks % 2:
        raise ValueError(f"BitPipe needs an even number (2K) of chunks, got {num_chunks}")
    k, m = _check(num_chunks // 2, n_microbatches)
    half = m // 2
    u = spec.cadence.default(2 * k, half) if update_every is None else \
        spec.cadence.check(_positive_int(update_every, "update_every"), 2 * k, half, spec.name)
    return spec, k, m, u


def _copy_workers(modules: Mapping[tuple[str, int], nn.Module],
                  make_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer], spec: Method,
                  k: int, m: int, u: int) -> dict[tuple[str, int], StageWorker]:
    """A :class:`StageWorker` per copy ``(replica, chunk)`` of ``modules``, with the copy's
    staleness table."""
    tables = bitpipe_staleness(k, m, update_every=u)
    return {(rep, c): StageWorker(mod, make_optimizer(mod.parameters()), method=spec,
                                  staleness=tables[(rep, c)], update_every=u, input_grads=c > 0,
                                  stage=c, num_stages=2 * k)
            for (rep, c), mod in sorted(modules.items(), key=lambda kv: (kv[0][1], kv[0][0]))}


def _pair_mean(rep: str, mine: Sequence[Tensor | None],
               theirs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """$(g_A + g_B) / 2$ per parameter, replica ``A``'s first whichever copy computes it."""
    ga, gb = (mine, theirs) if rep == "A" else (theirs, mine)
    return [None if a is None else (a + b) / 2 for a, b in zip(ga, gb)]


class BitPipeSimulator:
    """Trains a model with BitPipe in one process: two copies of every chunk, eager pair sync.

    Args:
        stages: The ``2K`` chunk modules of the model in order (replica ``A``); replica ``B``
            starts as a deep copy.
        make_optimizer: ``make_optimizer(params)``, once per copy (both copies of a chunk must
            get the same kind of optimizer, so that equal gradients keep them equal).
        method: A method that runs on torch's schedules (``pipeoptim``, ``pipedream``,
            ``gpipe``, ...).
        n_microbatches: Micro-batches per step (even; half per direction).
        loss_fn: ``loss_fn(output, target)`` (a per-micro-batch mean).
        update_every: Completed backwards of one copy per update; default the method's
            (``n / 2`` for ``gpipe``). The attribute ``update_every`` counts both copies'
            (micro-batches per update), ``copy_update_every`` one copy's.

    Attributes:
        copies: ``{(replica, chunk): StageWorker}``.
        workers: The same workers as a list, replica ``A``'s chunks first.
        staleness: `bitpipe_staleness` of the configuration.
        order: The actions of one step in execution order (waits included).

    Raises:
        ValueError: an odd number of stages or micro-batches, a method that does not run on
            torch's schedules, or a bad ``update_every``.
    """

    def __init__(self, stages: Sequence[nn.Module],
                 make_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer], *,
                 method: str | Method = DEFAULT_METHOD, n_microbatches: int,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 update_every: int | None = None) -> None:
        if isinstance(stages, nn.Module) or not stages or len(stages) % 2:
            raise ValueError("stages must be a non-empty sequence of an even number (2K) of "
                             "nn.Module")
        spec, k, m, u = _configure(method, len(stages), n_microbatches, update_every)
        self.num_ranks, self.n_microbatches = k, m
        #: Completed backwards of one copy per update, and of both copies (micro-batches).
        self.copy_update_every, self.update_every = u, 2 * u
        self.loss_fn, self.method = loss_fn, spec.name
        self.stages = {"A": list(stages), "B": [copy.deepcopy(s) for s in stages]}
        self.staleness = bitpipe_staleness(k, m, update_every=u)
        self.order = _global_order(k, m, u)
        self.schedule = BITPIPE_SCHEDULE
        self.copies = _copy_workers({(r, c): self.stages[r][c] for r in "AB"
                                     for c in range(2 * k)}, make_optimizer, spec, k, m, u)
        self.workers = [self.copies[(r, c)] for r in "AB" for c in range(2 * k)]
        #: chunk -> (replica, forwards) of the copy whose window completed first
        self._waiting: dict[int, tuple[str, int]] = {}
        #: chunk -> the gradient the copy that stepped first used (its partner's turn next)
        self._sent: dict[int, list[Tensor | None]] = {}
        self._real = {key: w.optimizer.step for key, w in self.copies.items()}
        for key, w in self.copies.items():
            w.optimizer.step = (lambda _key=key: self._step(_key))  # type: ignore[method-assign]
            w.update_gate = (lambda _w, _key=key: self._gate(_key))

    def _gate(self, key: tuple[str, int]) -> bool:
        """A copy completed an update window: the first of a pair waits (its update is
        postponed); the second releases the first's update, then makes its own. Each update
        runs in its own worker (its learning-rate factor, its after-step corrections), as on
        two ranks."""
        rep, c = key
        if c not in self._waiting:
            self._waiting[c] = (rep, self.copies[key].num_forwards)
            return False
        first, forwards = self._waiting.pop(c)
        w = self.copies[(first, c)]
        if w.num_forwards != forwards:
            raise RuntimeError(f"chunk {c}: a copy ran a forward between its update window and "
                               "its partner's; the order ignores the eager synchronisation")
        w.release_update()
        return True

    @torch.no_grad()
    def _step(self, key: tuple[str, int]) -> None:
        """A copy's optimizer step: on the mean of both copies' gradients of the window, the
        first copy's (``A``) first. The copy stepping first reads its partner's gradient as the
        partner's update will see it (the window's mean: divided by its size)."""
        rep, c = key
        w = self.copies[key]
        mine = [None if p.grad is None else p.grad.clone() for p in w.params]
        if c in self._sent:
            theirs = self._sent.pop(c)
        else:
            partner = self.copies[("B" if rep == "A" else "A", c)]
            u = partner.update_every
            theirs = [None if p.grad is None else (p.grad / float(u) if u > 1 else p.grad.clone())
                      for p in partner.params]
            self._sent[c] = mine
        # the step and the method's after-step corrections see the mean (the worker clears it)
        for p, g in zip(w.params, _pair_mean(rep, mine, theirs)):
            p.grad = g
        self._real[key]()

    def step(self, x: Tensor, y: Tensor) -> list[float]:
        """One step on a batch (``n`` micro-batches, half per direction); the losses in
        micro-batch order."""
        m = self.n_microbatches
        if x.shape[0] != y.shape[0] or x.shape[0] == 0 or x.shape[0] % m:
            raise ValueError(f"x and y need the same batch size, a positive multiple of "
                             f"n_microbatches ({m})")
        size = x.shape[0] // m
        xs, ys = x.split(size), y.split(size)
        last, half = 2 * self.num_ranks - 1, m // 2
        acts: dict[tuple[int, int], Any] = {}
        grads: dict[tuple[int, int], Any] = {}
        losses: list[Tensor | None] = [None] * m
        for a in self.order:
            c, i = a.stage, a.microbatch
            rep = replica_of(i, m)
            w, local = self.copies[(rep, c)], i - (half if rep == "B" else 0)
            if a.kind == "F":
                out = w.forward(local, xs[i] if c == 0 else acts.pop((c - 1, i)))
                if c == last:
                    losses[i] = self.loss_fn(out, ys[i])
                else:
                    acts[(c, i)] = out
            else:
                kw = {"loss": losses[i]} if c == last else {"grad_output": grads.pop((c + 1, i))}
                g = w.backward(local, **kw)
                if c > 0:
                    grads[(c, i)] = g
        return [float(v.detach()) for v in losses]  # type: ignore[union-attr]

    @property
    def max_staleness(self) -> int:
        """Largest staleness of any copy's forward (``pipedream-2bw``: 1, by design)."""
        if self.copies[("A", 0)].spec.forward == "previous":
            return 1
        return max(max(v) for v in self.staleness.values())

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> Tensor:
        """The model's output with replica ``A``'s (= ``B``'s) current weights."""
        out: Any = x
        for mod in self.stages["A"]:
            out = mod(out)
        return out

    @torch.no_grad()
    def loss_and_accuracy(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """``(loss_fn(output, y), accuracy)`` with the current weights."""
        out = self.evaluate(x)
        acc = float((out.argmax(-1) == y).float().mean()) if out.ndim > 1 else float("nan")
        return float(self.loss_fn(out, y)), acc
