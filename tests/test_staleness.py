"""Tests for predictopt.pipeline.schedules: action orders, staleness, timelines."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from predictopt.pipeline import schedules as sch
from predictopt.pipeline.schedules import (
    SUPPORTED_SCHEDULES,
    Action,
    bubble_fraction,
    global_order,
    max_staleness,
    render_timeline,
    schedule_actions,
    stage_to_rank,
    staleness,
    timeline,
)
from tests._hyp import props

SINGLE = ("GPipe", "1F1B")
LOOP_MULTI = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_MULTI = ("ZBVZeroBubble", "DualPipeV")
#: predictopt's action-list schedules (one stage per rank, run by torch's action runtime)
ACTION_LISTS = ("ZBH1", "ZBH2")


def _default_spr(schedule: str) -> int:
    return len(stage_to_rank(schedule, 1))


def _valid(schedule: str, num_ranks: int, n: int, spr: int) -> bool:
    """torch 2.13's own constraints on n_microbatches."""
    if schedule == "1F1B":
        return n >= num_ranks
    if schedule == "DualPipeV":
        return n >= 2 * num_ranks
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n // num_ranks)
        return n % rounds == 0
    return True


# ------------------------------------------------------------------ hand-derived cases


def test_1f1b_k4_n8_table():
    s = staleness("1F1B", 4, 8)
    assert s[0] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert s[1] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert s[2] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert s[3] == [0] * 8


@pytest.mark.parametrize("k_ranks", [1, 2, 3, 4, 6])
def test_1f1b_pipedream_steady_state(k_ranks):
    # Warm-up ramps s up to the PipeDream value K - 1 - k, which then holds.
    n = 3 * k_ranks
    s = staleness("1f1b", k_ranks, n)
    for k in range(k_ranks):
        assert s[k] == [min(i, k_ranks - 1 - k) for i in range(n)]
    assert max_staleness("1F1B", k_ranks, n) == {k: k_ranks - 1 - k for k in range(k_ranks)}


def test_1f1b_update_every_2_hand_derived():
    # Stage 0 order: F0 F1 F2 F3 B0 F4 B1* F5 B2 F6 B3* F7 B4 B5* B6 B7*  (* = update).
    # mb i's gradient is applied by update ceil(c_i/2) where c_i = i + 1.
    s = staleness("1F1B", 4, 8, update_every=2)
    assert s[0] == [0, 0, 1, 1, 2, 1, 2, 1]
    assert s[3] == [0] * 8


@pytest.mark.parametrize("k_ranks,n", [(1, 3), (2, 4), (4, 8), (3, 5)])
def test_gpipe_staleness_is_i(k_ranks, n):
    acts = schedule_actions("GPipe", k_ranks, n)
    for r in range(k_ranks):
        # torch's runtime: all forwards, then backwards in order 0..n-1
        assert acts[r] == [Action("F", r, i) for i in range(n)] + [
            Action("B", r, i) for i in range(n)
        ]
    s = staleness("GPipe", k_ranks, n)
    assert all(s[k] == list(range(n)) for k in range(k_ranks))


def test_interleaved_zero_bubble_k4_n8():
    # Rank 0 runs all 8 forwards of stage 0 before its first W (so s = i there), while stage 4
    # gets 4 updates (4I0 4W0 .. 4I3 4W3) between its first and second group of forwards.
    s = staleness("InterleavedZeroBubble", 4, 8)
    for k in range(4):
        assert s[k] == list(range(8))
    for k in range(4, 8):
        assert s[k] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert max(max(v) for v in s.values()) == 7


def test_looped_bfs_reverse_backward():
    # LoopedBFS runs backwards in reverse micro-batch order: s = n - 1 - i everywhere.
    s = staleness("LoopedBFS", 2, 4)
    assert all(v == [3, 2, 1, 0] for v in s.values())


def test_v_schedules_k4_n8():
    expected = {k: [min(i, 7 - k) for i in range(8)] for k in range(8)}
    assert staleness("ZBVZeroBubble", 4, 8) == expected
    assert staleness("DualPipeV", 4, 8) == expected


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("schedule", SUPPORTED_SCHEDULES)
def test_update_every_n_gives_zero(schedule):
    for k_ranks, n in [(2, 4), (4, 8)]:
        s = staleness(schedule, k_ranks, n, update_every=n)
        spr = _default_spr(schedule)
        assert set(s) == set(range(k_ranks * spr))
        assert all(v == [0] * n for v in s.values())


@pytest.mark.parametrize("k_ranks,n", [(2, 2), (3, 7), (4, 8), (4, 13)])
def test_1f1b_ordering_invariants(k_ranks, n):
    s = staleness("1F1B", k_ranks, n)
    assert s[k_ranks - 1] == [0] * n
    for k in range(k_ranks):
        assert len(s[k]) == n
        for later in range(k, k_ranks):
            assert all(a >= b for a, b in zip(s[k], s[later], strict=True))


def test_stage_to_rank_placements():
    assert stage_to_rank("1F1B", 3) == {0: 0, 1: 1, 2: 2}
    assert stage_to_rank("Interleaved1F1B", 2, 3) == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1}
    assert stage_to_rank("ZBVZeroBubble", 3) == {0: 0, 1: 1, 2: 2, 3: 2, 4: 1, 5: 0}
    assert stage_to_rank("dualpipev", 2, 2) == {0: 0, 1: 1, 2: 1, 3: 0}


def test_bubble_fraction_matches_formula():
    # GPipe / 1F1B with T_B = 2 T_F: bubble = (p - 1) / (m + p - 1).
    for schedule in SINGLE:
        for p, m in [(2, 4), (4, 8), (3, 9)]:
            tl = timeline(schedule, p, m)
            assert bubble_fraction(tl) == pytest.approx((p - 1) / (m + p - 1))
    # Equal F, I, W durations: ZB-V on a long enough run has a much smaller bubble than 1F1B.
    eq = {"F": 1, "B": 2, "I": 1, "W": 1}
    assert bubble_fraction(timeline("ZBVZeroBubble", 4, 16, durations=eq)) < 0.5 * (
        bubble_fraction(timeline("1F1B", 4, 16, durations=eq))
    )
    assert bubble_fraction([]) == 0.0


def test_render_timeline(tmp_path):
    for schedule in ("1F1B", "InterleavedZeroBubble"):
        tl = timeline(schedule, 4, 8)
        out = render_timeline(tl, tmp_path / f"{schedule}.png", title=schedule)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ------------------------------------------------------------------ torch cross-checks


@pytest.mark.parametrize("k_ranks,n", [(1, 2), (2, 4), (4, 8), (3, 7)])
def test_single_stage_orders_vs_torch_ir(k_ranks, n):
    """GPipe's IR equals the runtime order; 1F1B's IR may only differ on the last rank, and
    then only because the IR is inconsistent there (torch 2.13 lists F1..F{n} for it)."""
    for schedule in SINGLE:
        ir = sch._torch_ir(schedule, k_ranks, n)
        if ir is None:
            pytest.skip("installed torch has no IR for single-stage schedules")
        ours = schedule_actions(schedule, k_ranks, n)
        for r in range(k_ranks):
            if schedule == "1F1B" and r == k_ranks - 1 and ir[r] != ours[r]:
                forwards = sorted(a.microbatch for a in ir[r] if a.kind == "F")
                assert forwards != list(range(n))  # the IR is the broken one
            else:
                assert ir[r] == ours[r]


class _RecordingStage:
    """Stand-in for a PipelineStage that records the compute calls the runtime makes."""

    def __init__(self, stage_index, num_stages, rank, num_ranks, log):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_rank, self.group_size = rank, num_ranks
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod, self.stage_index_to_group_rank, self.log = None, {}, log
        self.has_backward = True

    def _none(self, *args, **kwargs):
        return []

    get_fwd_recv_ops = get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = _none

    def forward_one_chunk(self, mb, *args, **kwargs):
        self.log.append(Action("F", self.stage_index, mb))

    def backward_one_chunk(self, mb, loss=None, full_backward=True, last_backward=False):
        self.log.append(Action("B" if full_backward else "I", self.stage_index, mb))

    def backward_weight_one_chunk(self, mb, last_backward=False):
        self.log.append(Action("W", self.stage_index, mb))

    def set_local_fwd_input(self, *args):
        pass

    def set_local_bwd_input(self, *args):
        pass

    def get_local_bwd_output(self, mb):
        return None

    def perform_reduce_grad(self, *args):
        pass


def _runtime_trace(schedule: str, k_ranks: int, n: int) -> dict[int, list[Action]]:
    """Run torch's own ``_step_microbatches`` per rank with recording stages."""
    import torch.distributed.pipelining.schedules as S

    info, cls = sch._resolve_schedule(schedule)
    placement = stage_to_rank(schedule, k_ranks)
    num_stages = len(placement)
    trace = {}
    for r in range(k_ranks):
        log: list[Action] = []
        stages = [
            _RecordingStage(s, num_stages, r, k_ranks, log)
            for s in sorted(placement)
            if placement[s] == r
        ]
        if issubclass(cls, S.PipelineScheduleMulti):
            sched = cls(stages, n)
            sched._initialize_stages = lambda *a, **k: None
        else:
            sched = cls(stages[0], n)
            sched._initialize_stage = lambda *a, **k: None
        sched._step_microbatches()
        trace[r] = log
    return trace


@pytest.mark.parametrize("schedule", SUPPORTED_SCHEDULES)
def test_orders_match_torch_runtime(schedule):
    """schedule_actions equals what torch's runtime executes, rank by rank."""
    for k_ranks, n in [(2, 4), (4, 8)]:
        try:
            trace = _runtime_trace(schedule, k_ranks, n)
        except (AttributeError, TypeError) as exc:  # pragma: no cover - other torch versions
            pytest.skip(f"runtime internals differ in this torch: {exc}")
        assert trace == schedule_actions(schedule, k_ranks, n)


# ------------------------------------------------------------------ property test


@st.composite
def _configs(draw):
    schedule = draw(st.sampled_from(SUPPORTED_SCHEDULES))
    k_ranks = draw(st.integers(1, 4))
    if schedule in SINGLE or schedule in ACTION_LISTS:
        spr = 1
    elif schedule in V_MULTI:
        spr = 2
    else:
        spr = draw(st.integers(2, 3))
    n = draw(st.integers(1, 12).filter(lambda m: _valid(schedule, k_ranks, m, spr)))
    u = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    return schedule, k_ranks, n, spr, u


@props(120)
@given(_configs())
def test_schedule_properties(cfg):
    schedule, k_ranks, n, spr, u = cfg
    acts = schedule_actions(schedule, k_ranks, n, stages_per_rank=spr)
    placement = stage_to_rank(schedule, k_ranks, spr)
    num_stages = k_ranks * spr
    assert sorted(acts) == list(range(k_ranks))

    # Per-rank action lists: exactly one F and one completed backward per (stage, mb).
    for r, lst in acts.items():
        assert all(placement[a.stage] == r for a in lst)
        counts = Counter(lst)
        assert all(c == 1 for c in counts.values())
        pos = {a: j for j, a in enumerate(lst)}
        for s in (s for s in placement if placement[s] == r):
            for i in range(n):
                f = Action("F", s, i)
                assert f in pos
                has_b = Action("B", s, i) in pos
                has_i = Action("I", s, i) in pos
                has_w = Action("W", s, i) in pos
                assert has_b != (has_i and has_w) and has_i == has_w
                if has_b:
                    assert pos[f] < pos[Action("B", s, i)]
                else:
                    assert pos[f] < pos[Action("I", s, i)] < pos[Action("W", s, i)]
    # ... and nothing else (a stage may mix B and I/W across micro-batches, as in DualPipeV).
    assert sum(len(v) for v in acts.values()) == sum(
        2 if Action("B", s, i) in acts[placement[s]] else 3 for s in placement for i in range(n)
    )

    # Global order respects dependencies and every rank's own order.
    order = global_order(schedule, k_ranks, n, stages_per_rank=spr)
    gpos = {a: j for j, a in enumerate(order)}
    assert len(gpos) == len(order) == sum(len(v) for v in acts.values())
    for lst in acts.values():
        assert [gpos[a] for a in lst] == sorted(gpos[a] for a in lst)

    def bwd(s, i):
        return Action("B", s, i) if Action("B", s, i) in gpos else Action("I", s, i)

    for s in range(num_stages):
        for i in range(n):
            f = Action("F", s, i)
            if s > 0:
                assert gpos[Action("F", s - 1, i)] < gpos[f]
            assert gpos[f] < gpos[bwd(s, i)]
            if s < num_stages - 1:
                assert gpos[bwd(s + 1, i)] < gpos[bwd(s, i)]
            if bwd(s, i).kind == "I":
                assert gpos[bwd(s, i)] < gpos[Action("W", s, i)]

    # The timeline: no overlap within a rank.
    tl = timeline(schedule, k_ranks, n, stages_per_rank=spr)
    for r in range(k_ranks):
        mine = [e for e in tl if e.rank == r]
        assert [e.action for e in mine] == acts[r]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:], strict=False))
    assert 0.0 <= bubble_fraction(tl) < 1.0

    # Staleness: one entry per micro-batch, 0 <= s <= n, zeros when updating once per step.
    s_tab = staleness(schedule, k_ranks, n, stages_per_rank=spr, update_every=u)
    assert sorted(s_tab) == list(range(num_stages))
    for v in s_tab.values():
        assert len(v) == n and all(0 <= x <= n for x in v)
        assert all(x <= n // u for x in v)
    zero = staleness(schedule, k_ranks, n, stages_per_rank=spr, update_every=n)
    assert all(v == [0] * n for v in zero.values())


# ------------------------------------------------------------------ bad arguments


def test_unknown_schedule_lists_names():
    with pytest.raises(ValueError, match="accepted names") as exc:
        schedule_actions("PipeDream", 4, 8)
    for name in SUPPORTED_SCHEDULES:
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="not supported by predictopt"):
        schedule_actions("PipelineScheduleSingle", 4, 8)
    with pytest.raises(ValueError, match="schedule must be a str"):
        staleness(3, 4, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"num_ranks": 0}, "num_ranks"),
        ({"num_ranks": -1}, "num_ranks"),
        ({"num_ranks": 2.0}, "num_ranks"),
        ({"n_microbatches": 0}, "n_microbatches"),
        ({"stages_per_rank": 0}, "stages_per_rank"),
    ],
)
def test_non_positive_sizes(kwargs, pattern):
    args = {"num_ranks": 2, "n_microbatches": 4, **kwargs}
    spr = args.pop("stages_per_rank", None)
    with pytest.raises(ValueError, match=pattern):
        schedule_actions("1F1B", args["num_ranks"], args["n_microbatches"], stages_per_rank=spr)
    with pytest.raises(ValueError, match=pattern):
        staleness("GPipe", args["num_ranks"], args["n_microbatches"], stages_per_rank=spr)


def test_stages_per_rank_rules():
    with pytest.raises(ValueError, match=r"stages_per_rank .* must be 1"):
        schedule_actions("GPipe", 2, 4, stages_per_rank=2)
    with pytest.raises(ValueError, match=r"stages_per_rank .* must be >= 2"):
        schedule_actions("Interleaved1F1B", 2, 4, stages_per_rank=1)
    with pytest.raises(ValueError, match=r"stages_per_rank .* exactly 2"):
        staleness("ZBVZeroBubble", 2, 4, stages_per_rank=3)
    with pytest.raises(ValueError, match=r"stages_per_rank .* exactly 2"):
        stage_to_rank("DualPipeV", 2, 1)
    assert len(schedule_actions("LoopedBFS", 2, 4, stages_per_rank=3)[0]) == 2 * 3 * 4


def test_update_every_must_divide():
    with pytest.raises(ValueError, match="update_every"):
        staleness("1F1B", 4, 8, update_every=3)
    with pytest.raises(ValueError, match="update_every"):
        staleness("1F1B", 4, 8, update_every=0)
    with pytest.raises(ValueError, match="update_every"):
        max_staleness("1F1B", 4, 8, update_every=16)


def test_torch_constraints_become_value_errors():
    with pytest.raises(ValueError, match="greater than or equal to the number of stages"):
        schedule_actions("1F1B", 4, 3)
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        schedule_actions("Interleaved1F1B", 2, 5)
    with pytest.raises(ValueError, match="Zero bubble requires"):
        staleness("InterleavedZeroBubble", 4, 9)
    with pytest.raises(ValueError, match="at least as many microbatches as stages"):
        timeline("DualPipeV", 4, 7)


def test_bad_durations():
    with pytest.raises(ValueError, match="durations"):
        timeline("1F1B", 2, 4, durations={"F": 0})
    with pytest.raises(ValueError, match="durations"):
        timeline("1F1B", 2, 4, durations={"X": 1})


def test_missing_schedule_names_torch_version(monkeypatch):
    """A schedule absent from the installed torch gives a ValueError naming its release."""
    mod = sch._schedules_module()

    def old_get_schedule_class(name):
        if name.lower() == "dualpipev":
            raise ValueError(f"Unknown schedule name '{name}'")
        return SimpleNamespace  # never constructed in this test

    sch._torch_compute_orders.cache_clear()
    try:
        monkeypatch.delattr(mod, "ScheduleDualPipeV")
        monkeypatch.setattr(mod, "get_schedule_class", old_get_schedule_class)
        with pytest.raises(ValueError, match=r"DualPipeV.*torch >= 2\.8"):
            schedule_actions("DualPipeV", 2, 4)
        monkeypatch.delattr(mod, "get_schedule_class")  # torch 2.4 had no get_schedule_class
        with pytest.raises(ValueError, match=r"torch >= 2\.8"):
            staleness("dualpipev", 2, 4)
    finally:
        sch._torch_compute_orders.cache_clear()
