r"""Zero Bubble pipeline schedules (Qi et al., arXiv 2401.10241) as per-rank action lists.

The backward of a stage splits into ``I`` (the input gradient, called B in the paper: on the
critical path, the previous stage waits for it) and ``W`` (the weight gradient, needed only by
the stage's own optimizer step). Delaying ``W`` fills the bubbles of 1F1B. Every function here
returns ``{rank: [Action, ...]}`` with stage ``r`` on rank ``r``; torch runs them unchanged
(:mod:`~predictopt.pipeline.action_schedule`), and their staleness tables, timelines and
bubbles come from the same lists (:mod:`~predictopt.pipeline.schedules`).

Memory is counted in micro-batches of activations per stage: a micro-batch is *in flight* at a
stage from its ``F`` to its ``W`` (the weight gradient still reads the saved inputs).

Handcrafted schedules (`handcrafted`), stage ``s`` of ``p``, ``m`` micro-batches:

* **1F1B** (with the split backward): ``p - s`` warm-up forwards, then ``I W F`` repeated;
* **ZB-H1** (`zb_h1`): the same warm-up, at most ``p`` in flight on every stage: ``W`` is
  delayed until the stage holds ``p`` micro-batches, so the last stages fill their bubbles with
  ``W`` passes. Peak memory is 1F1B's (``p``, on stage 0); with $T_F = T_B = T_W = T$ the bubble
  shrinks from $(p-1)\,3T$ to $(p-1)\,T$, i.e. $(p-1)/3m$ of the work;
* **ZB-H2** (`zb_h2`): ``2(p - s) - 1`` warm-up forwards (enough to reach the first ``I``
  without idling), at most ``2p - 1`` in flight, which gives a parallelogram with no bubble.

The automatic scheduler (`auto_schedule`, the paper's heuristic restated) places passes greedily
for given per-stage times $T_F, T_B, T_W$, a transfer time $T_{comm}$ and a memory limit, tries
a few variants of its rules plus the handcrafted schedules that fit, and keeps the one whose
simulated bubble (`~predictopt.pipeline.schedules.bubble_rate`) is smallest. `exact_schedule`
searches every order for small cases.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from .schedules import Action, action_timeline, bubble_rate, peak_activations

__all__ = [
    "BUILTIN",
    "auto_schedule",
    "exact_schedule",
    "handcrafted",
    "one_f_one_b",
    "zb_h1",
    "zb_h2",
]

Orders = dict[int, list[Action]]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _per_stage(value: Any, p: int, name: str, *, integer: bool = False,
               minimum: float = 0.0, strict: bool = True) -> list[Any]:
    """A scalar or one value per stage, checked, as a list of ``p`` values."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else \
        [value] * p
    if len(values) != p:
        raise ValueError(f"{name} must be a number or one number per stage ({p}), got {value!r}")
    for v in values:
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or (v <= minimum if strict else v < minimum):
            kind = "int" if integer else "number"
            rel = ">" if strict else ">="
            raise ValueError(f"{name} must be {'an' if integer else 'a'} {kind} {rel} {minimum} "
                             f"(or one per stage), got {value!r}")
    return [int(v) if integer else float(v) for v in values]


# ---------------------------------------------------------------------------------------------
# Handcrafted schedules
# ---------------------------------------------------------------------------------------------


def handcrafted(num_ranks: int, n_microbatches: int, *, warmup: Sequence[int],
                limit: Sequence[int]) -> Orders:
    """The 1F1B family with split backward: warm-up forwards, then ``I``, ``W`` only if needed.

    Stage ``s`` runs ``min(m, warmup[s])`` forwards, then repeats: ``I`` of the next
    micro-batch; ``W`` of the oldest pending one if the stage holds ``limit[s]`` micro-batches
    or has no forward left; ``F`` of the next one if any. The remaining ``W`` passes close the
    list. A stage never holds more than ``limit[s]`` micro-batches.

    Args:
        num_ranks: Stages ``p`` (one per rank).
        n_microbatches: Micro-batches ``m``.
        warmup: Warm-up forwards per stage, non-increasing along the pipeline (so no rank waits
            for a forward the previous one has not scheduled yet).
        limit: Micro-batches in flight allowed per stage, ``>= warmup[s]``.

    Returns:
        ``{rank: [Action, ...]}``.

    Raises:
        ValueError: bad sizes, warm-ups that increase, or a limit below the warm-up.
    """
    p = _positive_int(num_ranks, "num_ranks")
    m = _positive_int(n_microbatches, "n_microbatches")
    warm = _per_stage(list(warmup), p, "warmup", integer=True)
    lim = _per_stage(list(limit), p, "limit", integer=True)
    for s in range(p):
        if lim[s] < min(m, warm[s]):
            raise ValueError(f"limit[{s}] ({lim[s]}) must be >= warmup[{s}] ({warm[s]})")
        if s and min(m, warm[s]) > min(m, warm[s - 1]):
            raise ValueError(f"warmup must not increase along the pipeline, got {warm}")
    out: Orders = {}
    for s in range(p):
        acts = [Action("F", s, i) for i in range(min(m, warm[s]))]
        nf, nb, nw = len(acts), 0, 0
        while nb < m:
            acts.append(Action("I", s, nb))
            nb += 1
            if nf - nw == lim[s] or nf == m:
                acts.append(Action("W", s, nw))
                nw += 1
            if nf < m:
                acts.append(Action("F", s, nf))
                nf += 1
        acts += [Action("W", s, i) for i in range(nw, m)]
        out[s] = acts
    return out


def one_f_one_b(num_ranks: int, n_microbatches: int) -> Orders:
    """1F1B with the backward split into ``I`` then ``W`` right after it (same order as torch's
    ``Schedule1F1B``; ``p - s`` in flight at stage ``s``)."""
    p = _positive_int(num_ranks, "num_ranks")
    warm = [p - s for s in range(p)]
    return handcrafted(p, n_microbatches, warmup=warm, limit=warm)


def zb_h1(num_ranks: int, n_microbatches: int) -> Orders:
    """ZB-H1: 1F1B's warm-up, ``W`` delayed up to ``p`` micro-batches in flight per stage."""
    p = _positive_int(num_ranks, "num_ranks")
    return handcrafted(p, n_microbatches, warmup=[p - s for s in range(p)], limit=[p] * p)


def zb_h2(num_ranks: int, n_microbatches: int) -> Orders:
    """ZB-H2: ``2(p - s) - 1`` warm-up forwards, up to ``2p - 1`` in flight per stage."""
    p = _positive_int(num_ranks, "num_ranks")
    return handcrafted(p, n_microbatches, warmup=[2 * (p - s) - 1 for s in range(p)],
                       limit=[2 * p - 1] * p)


# ---------------------------------------------------------------------------------------------
# Automatic scheduler
# ---------------------------------------------------------------------------------------------


class _Costs:
    """Checked per-stage costs, memory limit and the timeline they give an order."""

    def __init__(self, p: int, t_f: Any, t_b: Any, t_w: Any, t_comm: Any, mem_limit: Any):
        self.p = p
        self.f = _per_stage(t_f, p, "t_f")
        self.b = _per_stage(t_b, p, "t_b")
        self.w = _per_stage(t_w, p, "t_w")
        if isinstance(t_comm, bool) or not isinstance(t_comm, (int, float)) or t_comm < 0:
            raise ValueError(f"t_comm must be a number >= 0, got {t_comm!r}")
        self.comm = float(t_comm)
        self.mem = _per_stage(p if mem_limit is None else mem_limit, p, "mem_limit",
                              integer=True, minimum=1, strict=False)

    def durations(self) -> dict[str, list[float]]:
        return {"F": self.f, "I": self.b, "W": self.w,
                "B": [b + w for b, w in zip(self.b, self.w)]}

    def score(self, orders: Orders) -> tuple[float, float]:
        """(bubble rate, peak memory) of an order under these costs (lower is better)."""
        tl = action_timeline(orders, durations=self.durations(), comm=self.comm)
        return bubble_rate(tl), max(peak_activations(orders).values())

    def fits(self, orders: Orders) -> bool:
        peaks = peak_activations(orders)
        return all(peaks[s] <= self.mem[s] for s in range(self.p))


def _greedy(c: _Costs, m: int, *, fill_small_gaps: bool, cap: list[int]) -> Orders:
    """One pass of the list scheduler: every stage, when it becomes free, runs

    1. ``I`` of its next micro-batch if it is ready (the critical path);
    2. else ``F`` of its next micro-batch if it is ready and fewer than ``cap[s]`` micro-batches
       are in flight;
    3. else a pending ``W``: always when memory is full, otherwise when the stage would idle at
       least ``T_W`` (or, with ``fill_small_gaps``, any time);
    4. else it waits for the next event.

    Stages are visited in order of the time they become free, so every action that ends by
    that time is already placed when a stage decides.
    """
    p = c.p
    nf, nb, nw = [0] * p, [0] * p, [0] * p
    free = [0.0] * p
    end_f: list[dict[int, float]] = [{} for _ in range(p)]
    end_i: list[dict[int, float]] = [{} for _ in range(p)]
    out: Orders = {s: [] for s in range(p)}
    inf = float("inf")

    def ready_i(s: int) -> float:
        if nb[s] >= nf[s]:
            return inf
        dep = 0.0 if s == p - 1 else end_i[s + 1].get(nb[s], inf) + c.comm
        return max(end_f[s][nb[s]], dep)

    def ready_f(s: int) -> float:
        if nf[s] >= m:
            return inf
        return 0.0 if s == 0 else end_f[s - 1].get(nf[s], inf) + c.comm

    def run(s: int, kind: str, t: float) -> None:
        if kind == "F":
            i, dur, table = nf[s], c.f[s], end_f[s]
            nf[s] += 1
        elif kind == "I":
            i, dur, table = nb[s], c.b[s], end_i[s]
            nb[s] += 1
        else:
            i, dur, table = nw[s], c.w[s], None
            nw[s] += 1
        out[s].append(Action(kind, s, i))
        if table is not None:
            table[i] = t + dur
        free[s] = t + dur

    waiting: set[int] = set()  # stages that wait for an action nobody has placed yet
    while True:
        todo = [s for s in range(p) if nw[s] < m]
        if not todo:
            return out
        movable = [s for s in todo if s not in waiting]
        if not movable:
            raise RuntimeError("the automatic scheduler deadlocked (a bug)")
        s = min(movable, key=lambda j: (free[j], j))
        t = free[s]
        r_i, r_f = ready_i(s), ready_f(s)
        full = nf[s] - nw[s] >= cap[s]
        if r_i <= t:
            run(s, "I", t)
        elif r_f <= t and not full:
            run(s, "F", t)
        elif nw[s] < nb[s] and (full or fill_small_gaps
                                or min(r_i, r_f) - t >= c.w[s] or min(r_i, r_f) == inf):
            run(s, "W", t)
        else:
            later = [x for x in (r_i, r_f if not full else inf) if t < x < inf]
            later += [free[j] for j in todo if free[j] > t]
            if later:
                free[s] = min(later)
            else:
                waiting.add(s)
            continue
        waiting.clear()


def auto_schedule(
    num_ranks: int,
    n_microbatches: int,
    *,
    t_f: float | Sequence[float] = 1.0,
    t_b: float | Sequence[float] = 1.0,
    t_w: float | Sequence[float] = 1.0,
    t_comm: float = 0.0,
    mem_limit: int | Sequence[int] | None = None,
    max_evaluations: int = 2000,
) -> Orders:
    r"""The Zero Bubble paper's automatic scheduler: a schedule for given costs and memory.

    Greedy list scheduling (see `_greedy`) under the memory limit, in a few variants (``W``
    only into gaps of at least $T_W$ or into any gap; forwards capped by the memory limit or
    by 1F1B's warm-up $p - s$), together with the handcrafted schedules that fit in the limit
    (1F1B with split backward, its warm-up capped by the limit; ZB-H1; ZB-H2). Each candidate is
    simulated with the given costs (`~predictopt.pipeline.schedules.action_timeline`) and the
    one with the smallest bubble rate (then the smallest peak memory) is refined by a local
    search (swapping neighbouring passes of a rank while the score improves, at most
    ``max_evaluations`` simulations; the paper refines with an ILP instead). Because 1F1B
    with the backward split into ``I`` then ``W`` is a candidate whenever the limit allows
    1F1B's ``p - s`` micro-batches at stage ``s``, and splitting can only make actions start
    earlier, the result's bubble is never larger than 1F1B's (``B`` lasting $T_B + T_W$).

    Args:
        num_ranks: Stages ``p`` (one per rank).
        n_microbatches: Micro-batches ``m``.
        t_f: Forward time $T_F$ (one number, or one per stage).
        t_b: Input-gradient time $T_B$ (action ``I``).
        t_w: Weight-gradient time $T_W$ (action ``W``).
        t_comm: Transfer time between consecutive ranks ($\ge 0$).
        mem_limit: Micro-batches in flight allowed per stage (one int, or one per stage);
            default ``p``, 1F1B's peak.
        max_evaluations: Simulations the local search may run (0: none).

    Returns:
        ``{rank: [Action, ...]}``, every stage within its memory limit.

    Raises:
        ValueError: a bad argument (the message names it).
    """
    p = _positive_int(num_ranks, "num_ranks")
    m = _positive_int(n_microbatches, "n_microbatches")
    c = _Costs(p, t_f, t_b, t_w, t_comm, mem_limit)
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) \
            or max_evaluations < 0:
        raise ValueError(f"max_evaluations must be an int >= 0, got {max_evaluations!r}")
    candidates: list[Orders] = []
    base = [min(c.mem[s], p - s) for s in range(p)]
    base = [min(base[: s + 1]) for s in range(p)]  # non-increasing warm-up
    candidates.append(handcrafted(p, m, warmup=base, limit=base))
    for build in (zb_h1, zb_h2):
        orders = build(p, m)
        if c.fits(orders):
            candidates.append(orders)
    caps = {tuple(c.mem), tuple(min(x, p) for x in c.mem), tuple(base)}
    for fill, cap in itertools.product((False, True), sorted(caps)):
        candidates.append(_greedy(c, m, fill_small_gaps=fill, cap=list(cap)))
    return _improve(min(candidates, key=c.score), c, max_evaluations)


def _improve(orders: Orders, c: _Costs, budget: int) -> Orders:
    """Local search: swap neighbouring passes of a rank (kinds stay in micro-batch order,
    ``F(i) < I(i) < W(i)``, memory within the limit) while the score strictly improves, for at
    most ``budget`` simulations."""
    best = {s: list(a) for s, a in orders.items()}
    best_score = c.score(best)
    improved = True
    while improved and budget > 0:
        improved = False
        for s in range(c.p):
            acts = best[s]
            for j in range(len(acts) - 1):
                a, b = acts[j], acts[j + 1]
                if a.kind == b.kind or a.microbatch == b.microbatch or budget <= 0:
                    continue
                trial = dict(best)
                trial[s] = acts[:j] + [b, a] + acts[j + 2:]
                if peak_activations({s: trial[s]})[s] > c.mem[s]:
                    continue
                budget -= 1
                try:
                    score = c.score(trial)
                except RuntimeError:  # the swap deadlocks
                    continue
                if score < best_score:
                    best, best_score, improved = trial, score, True
                    acts = best[s]
    return best


def exact_schedule(
    num_ranks: int,
    n_microbatches: int,
    *,
    t_f: float | Sequence[float] = 1.0,
    t_b: float | Sequence[float] = 1.0,
    t_w: float | Sequence[float] = 1.0,
    t_comm: float = 0.0,
    mem_limit: int | Sequence[int] | None = None,
    max_candidates: int = 20000,
) -> Orders:
    """The schedule with the smallest bubble rate over *every* order (small cases only).

    Enumerates, per stage, every order of its ``F``, ``I``, ``W`` passes that keeps each kind in
    micro-batch order, ``F(i)`` before ``I(i)`` before ``W(i)`` and the memory limit, then
    every combination across stages, simulates each (deadlocking combinations are skipped) and
    returns the best (ties: smaller peak memory, then the first found). The arguments are those
    of `auto_schedule`.

    Args:
        max_candidates: Largest number of combinations to simulate.

    Raises:
        ValueError: a bad argument, or more than ``max_candidates`` combinations (use
            `auto_schedule`).
    """
    p = _positive_int(num_ranks, "num_ranks")
    m = _positive_int(n_microbatches, "n_microbatches")
    c = _Costs(p, t_f, t_b, t_w, t_comm, mem_limit)
    _positive_int(max_candidates, "max_candidates")
    per_stage = [_stage_orders(s, m, c.mem[s]) for s in range(p)]
    total = 1
    for orders in per_stage:
        total *= len(orders)
    if total > max_candidates:
        raise ValueError(f"exact_schedule would simulate {total} combinations of orders "
                         f"(p={p}, m={m}), more than max_candidates={max_candidates}; use "
                         "auto_schedule for this size")
    best: tuple[tuple[float, float], Orders] | None = None
    for combo in itertools.product(*per_stage):
        orders = dict(enumerate(list(o) for o in combo))
        try:
            score = c.score(orders)
        except RuntimeError:  # deadlock
            continue
        if best is None or score < best[0]:
            best = (score, orders)
    assert best is not None  # 1F1B-like orders never deadlock
    return best[1]


def _stage_orders(s: int, m: int, mem: int) -> list[tuple[Action, ...]]:
    """Every order of stage ``s``'s passes with F, I, W each in micro-batch order, F(i) < I(i)
    < W(i) and at most ``mem`` micro-batches in flight."""
    out: list[tuple[Action, ...]] = []

    def walk(nf: int, nb: int, nw: int, acc: list[Action]) -> None:
        if nw == m:
            out.append(tuple(acc))
            return
        if nf < m and nf - nw < mem:
            walk(nf + 1, nb, nw, acc + [Action("F", s, nf)])
        if nb < nf:
            walk(nf, nb + 1, nw, acc + [Action("I", s, nb)])
        if nw < nb:
            walk(nf, nb, nw + 1, acc + [Action("W", s, nw)])

    walk(0, 0, 0, [])
    return out


#: The builders behind the schedule names ``ZBH1`` and ``ZBH2`` of
#: :data:`~predictopt.pipeline.SUPPORTED_SCHEDULES`. (At the paper's setting $T_F = T_B = T_W$,
#: $T_{comm} = 0$, `auto_schedule` with memory ``p`` and ``2p - 1`` returns exactly these.)
BUILTIN: Mapping[str, Any] = {"ZBH1": zb_h1, "ZBH2": zb_h2}
