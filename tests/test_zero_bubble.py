"""Tests for the Zero Bubble schedules: ZB-H1, ZB-H2, the automatic scheduler, the exact solver,
their torch classes (predictopt.pipeline.action_schedule) and the schedule registry."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from predictopt.pipeline import zero_bubble as zb
from predictopt.pipeline.schedules import (
    Action,
    action_timeline,
    available_schedules,
    bubble_rate,
    peak_activations,
    register_schedule,
    schedule_actions,
    staleness,
    timeline,
)
from tests._hyp import props

UNIT = {"F": 1, "I": 1, "W": 1, "B": 2}  # the paper's setting T_F = T_B = T_W


def _exact_rate(tl) -> Fraction:
    """bubble_rate with integer durations, as an exact fraction."""
    spans: dict[int, list[float]] = {}
    busy: Counter = Counter()
    for e in tl:
        lo_hi = spans.setdefault(e.rank, [e.start, e.end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], e.start), max(lo_hi[1], e.end)
        busy[e.rank] += e.end - e.start
    span = max(hi - lo for lo, hi in spans.values())
    assert span == int(span)
    return Fraction(int(span), int(max(busy.values()))) - 1


def _text(acts) -> str:
    return " ".join(f"{a.kind}{a.microbatch + 1}" for a in acts)


# ------------------------------------------------------------------ the paper's figure 3


def test_zb_h1_and_zb_h2_are_the_papers_figure():
    """Figure 3 of the paper (p = 4, m = 8, micro-batches numbered from 1; B there is I here)."""
    h1 = zb.zb_h1(4, 8)
    assert _text(h1[0]) == ("F1 F2 F3 F4 I1 W1 F5 I2 W2 F6 I3 W3 F7 I4 W4 F8 I5 W5 I6 W6 I7 W7 "
                            "I8 W8")
    assert _text(h1[3]) == ("F1 I1 F2 I2 F3 I3 F4 I4 W1 F5 I5 W2 F6 I6 W3 F7 I7 W4 F8 I8 W5 W6 "
                            "W7 W8")
    h2 = zb.zb_h2(4, 8)
    assert _text(h2[0]) == ("F1 F2 F3 F4 F5 F6 F7 I1 W1 F8 I2 W2 I3 W3 I4 W4 I5 W5 I6 W6 I7 W7 "
                            "I8 W8")
    assert _text(h2[3]) == ("F1 I1 F2 I2 F3 I3 F4 I4 F5 I5 F6 I6 F7 I7 W1 F8 I8 W2 W3 W4 W5 W6 "
                            "W7 W8")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
def test_bubble_rates_at_the_papers_setting(p):
    """T_F = T_B = T_W: 1F1B (p-1)/m, ZB-H1 (p-1)/3m, ZB-H2 0, exactly."""
    for m in range(p, 3 * p + 2):
        assert _exact_rate(timeline("1F1B", p, m, durations=UNIT)) == Fraction(p - 1, m)
        assert _exact_rate(timeline("ZBH1", p, m, durations=UNIT)) == Fraction(p - 1, 3 * m)
        if m >= 2 * p - 1:
            assert _exact_rate(timeline("ZBH2", p, m, durations=UNIT)) == 0
    assert bubble_rate(timeline("ZBH1", 4, 8, durations=UNIT)) == pytest.approx(3 / 24)


@pytest.mark.parametrize("p", [1, 2, 4, 5])
def test_peak_memory(p):
    m = 3 * p
    assert max(peak_activations(schedule_actions("1F1B", p, m)).values()) == p
    assert peak_activations(zb.zb_h1(p, m)) == {s: p for s in range(p)}
    assert peak_activations(zb.zb_h2(p, m)) == {s: 2 * p - 1 for s in range(p)}
    assert peak_activations(zb.one_f_one_b(p, m)) == {s: p - s for s in range(p)}


def test_staleness_of_the_zero_bubble_schedules():
    # W is delayed until p (ZB-H1) or 2p-1 (ZB-H2) micro-batches are held, and the update comes
    # after W: every stage lags like 1F1B's first stage, or twice as much.
    assert staleness("ZBH1", 4, 8) == {k: [0, 1, 2, 3, 3, 3, 3, 3] for k in range(4)}
    assert staleness("zbh2", 4, 8) == {k: [0, 1, 2, 3, 4, 5, 6, 6] for k in range(4)}
    assert staleness("ZBH1", 4, 8, update_every=8) == {k: [0] * 8 for k in range(4)}


def test_one_f_one_b_is_torchs_order_with_the_backward_split():
    for p, m in [(2, 4), (4, 8), (3, 7)]:
        fused = [[Action("B" if a.kind == "I" else a.kind, a.stage, a.microbatch)
                  for a in acts if a.kind != "W"] for acts in zb.one_f_one_b(p, m).values()]
        assert fused == list(schedule_actions("1F1B", p, m).values())


def test_handcrafted_arguments():
    with pytest.raises(ValueError, match="warmup must not increase"):
        zb.handcrafted(2, 4, warmup=[1, 2], limit=[2, 2])
    with pytest.raises(ValueError, match=r"limit\[0\] \(1\) must be >= warmup\[0\] \(2\)"):
        zb.handcrafted(2, 4, warmup=[2, 1], limit=[1, 1])
    with pytest.raises(ValueError, match="num_ranks"):
        zb.zb_h1(0, 4)
    with pytest.raises(ValueError, match="n_microbatches"):
        zb.zb_h2(2, 0)
    with pytest.raises(ValueError, match="warmup must be"):
        zb.handcrafted(2, 4, warmup=[1], limit=[2, 2])


# ------------------------------------------------------------------ automatic scheduler


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_auto_schedule_finds_the_handcrafted_ones_at_the_papers_setting(p):
    for m in range(1, 3 * p):
        assert zb.auto_schedule(p, m, mem_limit=p) == zb.zb_h1(p, m)
        if m >= 2 * p - 1:
            assert zb.auto_schedule(p, m, mem_limit=2 * p - 1) == zb.zb_h2(p, m)


def _check_valid(orders, p, m, mem, costs):
    """One F, I, W per (stage, micro-batch) on rank = stage, F < I < W, memory within the limit,
    and a timeline in which every action starts after its dependencies (plus the transfer)."""
    assert sorted(orders) == list(range(p))
    for s, acts in orders.items():
        assert Counter(acts) == Counter(Action(k, s, i) for k in "FIW" for i in range(m))
        pos = {a: j for j, a in enumerate(acts)}
        for i in range(m):
            assert pos[Action("F", s, i)] < pos[Action("I", s, i)] < pos[Action("W", s, i)]
    peaks = peak_activations(orders)
    assert all(peaks[s] <= mem[s] for s in range(p))
    tl = action_timeline(orders, durations=costs["durations"], comm=costs["comm"])
    end = {(e.action.kind, e.action.stage, e.action.microbatch): e.end for e in tl}
    c = costs["comm"]
    for e in tl:
        a = e.action
        if a.kind == "F" and a.stage > 0:
            assert e.start >= end[("F", a.stage - 1, a.microbatch)] + c
        if a.kind == "I":
            assert e.start >= end[("F", a.stage, a.microbatch)]
            if a.stage < p - 1:
                assert e.start >= end[("I", a.stage + 1, a.microbatch)] + c
        if a.kind == "W":
            assert e.start >= end[("I", a.stage, a.microbatch)]
    return tl


@st.composite
def _problems(draw):
    p = draw(st.integers(1, 5))
    m = draw(st.integers(1, 10))
    times = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])
    t_f = draw(st.lists(times, min_size=p, max_size=p))
    t_b = draw(st.lists(times, min_size=p, max_size=p))
    t_w = draw(st.lists(times, min_size=p, max_size=p))
    comm = draw(st.sampled_from([0.0, 0.25, 1.0]))
    mem = draw(st.lists(st.integers(1, 2 * p + 1), min_size=p, max_size=p))
    return p, m, t_f, t_b, t_w, comm, mem


@props(60)
@given(_problems())
def test_auto_schedule_properties(problem):
    p, m, t_f, t_b, t_w, comm, mem = problem
    orders = zb.auto_schedule(p, m, t_f=t_f, t_b=t_b, t_w=t_w, t_comm=comm, mem_limit=mem)
    durations = {"F": t_f, "I": t_b, "W": t_w, "B": [b + w for b, w in zip(t_b, t_w)]}
    tl = _check_valid(orders, p, m, mem, {"durations": durations, "comm": comm})
    rate = bubble_rate(tl)
    assert rate >= 0.0
    if m >= p and all(mem[s] >= p - s for s in range(p)):  # 1F1B fits in the memory limit
        one_f_one_b = timeline("1F1B", p, m, durations=durations, comm=comm)
        assert rate <= bubble_rate(one_f_one_b) + 1e-12


@props(15)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4),
       st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 0.5]))
def test_exact_schedule_is_a_lower_bound_of_the_heuristic(p, m, mem, t_w, comm):
    kw = {"t_f": 1.0, "t_b": 1.0, "t_w": t_w, "t_comm": comm, "mem_limit": mem}
    durations = {"F": 1.0, "I": 1.0, "W": t_w, "B": 1.0 + t_w}
    exact = zb.exact_schedule(p, m, **kw)
    tl = _check_valid(exact, p, m, [mem] * p, {"durations": durations, "comm": comm})
    auto = zb.auto_schedule(p, m, **kw)
    assert bubble_rate(tl) <= bubble_rate(
        action_timeline(auto, durations=durations, comm=comm)) + 1e-12


def test_exact_schedule_known_optima_and_limits():
    # two stages, three micro-batches, unit costs: ZB-H2's zero bubble needs 3 in flight;
    # with 2 the optimum is ZB-H1's (p-1)/3m = 1/9
    assert _exact_rate(action_timeline(zb.exact_schedule(2, 3, mem_limit=3), durations=UNIT)) \
        == 0
    assert _exact_rate(action_timeline(zb.exact_schedule(2, 3, mem_limit=2), durations=UNIT)) \
        == Fraction(1, 9)
    with pytest.raises(ValueError, match="use auto_schedule"):
        zb.exact_schedule(3, 4, mem_limit=6)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"t_f": 0}, "t_f"), ({"t_b": [1, 2, 3]}, "t_b"), ({"t_w": -1}, "t_w"),
    ({"t_comm": -0.5}, "t_comm"), ({"mem_limit": 0}, "mem_limit"),
    ({"mem_limit": 1.5}, "mem_limit"), ({"t_f": True}, "t_f"),
])
def test_auto_schedule_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        zb.auto_schedule(2, 4, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        zb.exact_schedule(2, 2, **kwargs)


# ------------------------------------------------------------------ registry


_COSTS = {"t_f": [1.0, 1.0, 1.0, 1.5], "t_b": 1.2, "t_w": 0.6, "t_comm": 0.2, "mem_limit": 5}


def _auto_test(k: int, n: int):
    return zb.auto_schedule(k, n, **{**_COSTS, "t_f": _COSTS["t_f"][:k]}) if k <= 4 else \
        zb.auto_schedule(k, n)


def test_register_schedule_makes_a_name_work_everywhere():
    name = "ZBAutoTestReg"
    if name not in available_schedules():
        assert register_schedule(name, _auto_test, description="auto, test costs") == name
    assert name in available_schedules()
    assert schedule_actions(name.lower(), 4, 8) == _auto_test(4, 8)
    assert staleness(name, 4, 8)[0][0] == 0
    assert timeline(name, 2, 4)
    with pytest.raises(ValueError, match="is taken"):
        register_schedule("zbh1", zb.zb_h1)
    with pytest.raises(ValueError, match="name must be"):
        register_schedule("bad name", zb.zb_h1)
    with pytest.raises(ValueError, match="build must be callable"):
        register_schedule("ZBNotCallable", 3)  # type: ignore[arg-type]


def test_unknown_schedule_lists_the_new_names():
    with pytest.raises(ValueError, match="accepted names") as exc:
        schedule_actions("ZBH3", 2, 4)
    assert "ZBH1" in str(exc.value) and "ZBH2" in str(exc.value)


# ------------------------------------------------------------------ torch's action-list runtime


def _fake_stages(k_ranks: int, rank: int):
    from predictopt.pipeline.schedules import _fake_stage

    return [_fake_stage(rank, k_ranks, rank, k_ranks)]


def test_the_torch_internals_action_schedule_uses_are_present():
    """action_schedule's private-API use, pinned: a torch release that renames or changes any
    of these fails here, not in a user's run."""
    import torch.distributed.pipelining.schedules as S

    from predictopt.pipeline import action_schedule as A

    assert issubclass(A.ActionSchedule, S._PipelineScheduleRuntime)
    assert issubclass(A.ActionSchedule, S.PipelineScheduleMulti)
    assert callable(S._PipelineScheduleRuntime._prepare_schedule_with_comms)
    a = S._Action.from_str("3I7")
    assert (a.stage_index, a.computation_type.value, a.microbatch_index) == (3, "I", 7)
    assert str(S._Action.from_str(str(Action("W", 1, 2)))) == "1W2"
    for k in (1, 2, 4):
        for r in range(k):
            sched = A.ScheduleZBH1(_fake_stages(k, r), 8)
            assert (sched.pp_group_size, sched.rank) == (k, r)
            ours = zb.zb_h1(k, 8)
            assert {q: [str(x) for x in v] for q, v in sched.pipeline_order.items()} == \
                {q: [str(x) for x in v] for q, v in ours.items()}
            # the lowered order torch runs keeps the compute order and adds transfers
            compute = [str(x) for x in sched.pipeline_order_with_comms[r] if x.is_compute_op]
            assert compute == [str(x) for x in ours[r]]
            kinds = {x.computation_type.value for x in sched.pipeline_order_with_comms[r]}
            assert ({"SEND_F", "RECV_B"} <= kinds) == (r < k - 1)
            assert ({"RECV_F", "SEND_B"} <= kinds) == (r > 0)
    assert A.ScheduleZBH1.schedule_name == "ZBH1" and A.schedule_class("zbh2") is A.ScheduleZBH2


def test_csv_round_trip_through_torchs_loader(tmp_path):
    """write_csv writes what torch's own _load_csv (torchtitan's schedule CSV) reads."""
    import torch.distributed.pipelining.schedules as S

    from predictopt.pipeline.action_schedule import read_csv, write_csv

    ours = zb.auto_schedule(3, 6, t_f=[1, 2, 1], t_w=0.5, mem_limit=4)
    path = write_csv(ours, tmp_path / "zb.csv")
    assert read_csv(path) == ours
    sched = S._PipelineScheduleRuntime(_fake_stages(3, 1), 6)
    sched._load_csv(str(path))
    assert {r: [str(x) for x in v] for r, v in sched.pipeline_order.items()} == \
        {r: [str(x) for x in v] for r, v in ours.items()}


def test_action_schedule_errors():
    from predictopt.pipeline.action_schedule import ActionSchedule, ScheduleZBH1, schedule_class

    with pytest.raises(TypeError, match="needs a schedule name"):
        ActionSchedule(_fake_stages(2, 0), 4)
    wrong = _fake_stages(2, 0)
    wrong[0].stage_index = 1
    with pytest.raises(ValueError, match=r"ZBH1 puts stage\(s\) \[0\] on rank 0 of 2, but this "
                                         r"rank holds stage\(s\) \[1\]"):
        ScheduleZBH1(wrong, 4)
    with pytest.raises(ValueError, match="is a torch schedule"):
        schedule_class("1F1B")


def test_registered_schedule_distributed_matches_simulator_bit_for_bit():
    """A registered automatic schedule (I passes ahead of pending W passes) on 2 gloo ranks,
    under plain torch code, attach() and the builder, reproduces the simulator exactly."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _dist

    name = _dist.ensure_test_schedule()
    acts = schedule_actions(name, 2, 4)
    assert acts not in (zb.zb_h1(2, 4), zb.zb_h2(2, 4), zb.one_f_one_b(2, 4))
    configs = [
        {"schedule": name, "method": "pipeoptim", "opt": "adamw", "n": 4, "steps": 3},
        {"schedule": name, "method": "pipedream", "opt": "sgdm", "n": 4, "steps": 3,
         "attach": True},
        {"schedule": name, "method": "pipeoptim-lean", "opt": "adam", "n": 4, "steps": 3,
         "builder": True},
        {"schedule": "ZBH2", "method": "xpipe", "opt": "adam", "n": 4, "steps": 2,
         "update_every": 2, "dropout": 0.3},
    ]
    results = _dist.launch(_dist.registered_equivalence_worker, 2, configs, timeout=150.0,
                           pg_timeout=60.0)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r} failed:\n{res.get('error')}"
    bad = _dist.check_against_simulator(2, configs, [res["value"] for res in results])
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ the entry points


def test_cli_accepts_and_draws_the_new_schedules(tmp_path, capsys):
    from predictopt.cli import build_parser, main

    assert build_parser().parse_args(["compare", "--schedule", "zbh1"]).schedule == "ZBH1"
    out = tmp_path / "zbh2.png"
    assert main(["staleness", "--schedule", "ZBH2", "--ranks", "4", "--microbatches", "8",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0    1    2    3    4    5    6    6    6" in text
    assert "bubble rate per unit of work, Zero Bubble's measure (T_F=T_B=T_W): 0.000" in text
    assert "peak activations: 7 micro-batches" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _lightning_worker(rank: int, world_size: int, tmp: str) -> list:
    """One rank of a Lightning fit with ``PipeOptimStrategy(schedule="zbh1")``."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    from tests import test_lightning as L

    strategy = L.pipe(schedule="zbh1")
    assert strategy.schedule == "ZBH1"
    model = L.Net(2, "none")
    L.trainer(strategy, tmp).fit(model, L.train_loader(8))
    return L.weights(model)


@pytest.mark.timeout(300)
def test_lightning_strategy_takes_the_name(tmp_path):
    """``PipeOptimStrategy(schedule="zbh1")`` on 2 processes trains exactly like the simulator
    (the strategy calls predictopt's builder with the name)."""
    pytest.importorskip("lightning")
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _dist

    from tests import test_lightning as L

    results = _dist.launch(_lightning_worker, 2, str(tmp_path), timeout=240.0, pg_timeout=60.0)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r} failed:\n{res.get('error')}"
    ref, _, _ = L.simulate(schedule="ZBH1")  # 2 stages, n = 4 micro-batches of 2
    for res in results:
        L.assert_same(res["value"], ref)
