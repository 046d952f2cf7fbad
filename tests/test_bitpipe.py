"""Tests for predictopt.pipeline.bitpipe: placement, action order, eager synchronisation,
staleness and the single-process BitPipe simulator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from predictopt.data import mlp_stages
from predictopt.pipeline import PipelineSimulator
from predictopt.pipeline.bitpipe import (
    BitPipeSimulator,
    bitpipe_actions,
    bitpipe_peak_activations,
    bitpipe_placement,
    bitpipe_staleness,
    bitpipe_timeline,
    replica_of,
)

IN, HID, OUT, MB = 6, 8, 3, 2
UNIT = {"F": 1, "B": 2}


def test_placement_two_mirrored_vs():
    for k in (2, 4, 6):
        place = bitpipe_placement(k)
        for d in range(k):
            held = sorted(key for key, r in place.items() if r == d)
            assert held == sorted([("A", d), ("A", 2 * k - 1 - d), ("B", k - 1 - d),
                                   ("B", k + d)])
        for c in range(2 * k):  # the copies of a chunk sit on mirrored ranks
            assert place[("B", c)] == k - 1 - place[("A", c)]


def test_the_papers_figure():
    """4 devices, 4 micro-batches (1, 2 down; 3, 4 up), F = 1, B = 2: device 1's order and the
    makespan (28) of the authors' figure (docs/BitPipe_images/BitPipe-v.svg in their fork)."""
    acts = bitpipe_actions(4, 4)
    text = " ".join(f"{a.kind}{replica_of(a.microbatch, 4)}{a.stage}m{a.microbatch + 1}"
                    for a in acts[0])
    assert text == ("FA0m1 FA0m2 FB3m3 FB4m3 FB3m4 FB4m4 FA7m1 BA7m1 FA7m2 BA7m2 BB4m3 BB3m3 "
                    "BB4m4 BB3m4 BA0m1 BA0m2")
    assert max(e.end for e in bitpipe_timeline(4, 4, durations=UNIT)) == 28


@pytest.mark.parametrize("k,m", [(2, 2), (2, 6), (4, 4), (4, 8), (6, 12), (8, 8)])
def test_every_pass_once_in_order_and_the_waits_cost_nothing(k, m):
    acts = bitpipe_actions(k, m)
    place = bitpipe_placement(k)
    seen: Counter = Counter()
    for d, lst in acts.items():
        pos = {a: j for j, a in enumerate(lst)}
        for a in lst:
            assert place[(replica_of(a.microbatch, m), a.stage)] == d
            seen[a] += 1
            if a.kind == "B":
                assert pos[type(a)("F", a.stage, a.microbatch)] < pos[a]
    assert set(seen.values()) == {1} and len(seen) == 2 * (2 * k) * m
    synced = bitpipe_timeline(k, m, durations=UNIT)
    free = bitpipe_timeline(k, m, durations=UNIT, sync=False)
    assert max(e.end for e in synced) == max(e.end for e in free)


def test_staleness_and_memory():
    s = bitpipe_staleness(4, 4)
    assert set(s) == {(r, c) for r in "AB" for c in range(8)}
    assert all(v == ([0, 0] if c == 7 else [0, 1]) for (r, c), v in s.items())
    assert bitpipe_staleness(4, 8, update_every=4) == {key: [0] * 4 for key in s}
    assert max(bitpipe_peak_activations(4, 4).values()) == 4.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_microbatches must be even"):
        bitpipe_actions(2, 3)
    with pytest.raises(ValueError, match="num_ranks must be even"):
        bitpipe_actions(3, 6)
    with pytest.raises(ValueError, match="update_every"):
        bitpipe_staleness(2, 4, update_every=3)
    with pytest.raises(ValueError, match="even number"):
        BitPipeSimulator(mlp_stages(IN, HID, OUT, 3), torch.optim.SGD, n_microbatches=4)
    with pytest.raises(ValueError, match="does not run on pipeline schedules"):
        BitPipeSimulator(mlp_stages(IN, HID, OUT, 4), torch.optim.SGD, method="pb",
                         n_microbatches=4)


def _batches(n, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(MB * n, IN, generator=gen), torch.randint(0, OUT, (MB * n,),
                                                                   generator=gen))
            for _ in range(steps)]


def _opt(params):
    return torch.optim.AdamW(params, lr=0.02, weight_decay=0.01)


def _state(sim, rep):
    out = []
    for c in range(len(sim.stages[rep])):
        w = sim.copies[(rep, c)]
        out += [p.detach().clone() for p in w.params]
        inner = w.optimizer.optimizer
        out += [v.clone() for p in w.params for v in inner.state[p].values()
                if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "pipeoptim-lean", "gpipe", "qh-dl",
                                    "pipemare"])
def test_the_two_copies_stay_equal_and_runs_repeat(method):
    runs = []
    for _ in range(2):
        sim = BitPipeSimulator(mlp_stages(IN, HID, OUT, 8, seed=1), _opt, method=method,
                               n_microbatches=8, loss_fn=F.cross_entropy)
        losses = [v for x, y in _batches(8, 3) for v in sim.step(x, y)]
        a, b = _state(sim, "A"), _state(sim, "B")
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(w.num_updates == 3 * 8 // sim.update_every for w in sim.workers)
        runs.append((losses, a))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1]))


def test_gpipe_on_bitpipe_is_synchronous_training():
    """One update per step: the mean over both directions' micro-batches, as any synchronous
    schedule (equal up to the summation order of the mean: 1e-6 relative)."""
    batches = _batches(4, 3)
    bp = BitPipeSimulator(mlp_stages(IN, HID, OUT, 4, seed=1), _opt, method="gpipe",
                          n_microbatches=4, loss_fn=F.cross_entropy)
    ref = PipelineSimulator(mlp_stages(IN, HID, OUT, 4, seed=1), _opt, method="gpipe",
                            schedule="1F1B", n_microbatches=4, loss_fn=F.cross_entropy)
    for x, y in batches:
        assert bp.step(x, y) == pytest.approx(ref.step(x, y), rel=1e-6)
    for a, b in zip(bp.stages["A"], ref.stages):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def _violating(order, m):
    """``order`` with one forward of a copy moved before its partner's update (the data
    dependencies kept)."""
    pos = {a: j for j, a in enumerate(order)}
    for j, a in enumerate(order):
        if a.kind != "B":
            continue
        rep = replica_of(a.microbatch, m)
        partner = [b for b in order[j + 1:] if b.kind == "B" and b.stage == a.stage
                   and replica_of(b.microbatch, m) != rep]
        if not partner:
            continue
        q = pos[partner[0]]
        for f in order[q + 1:]:
            if f.kind == "F" and f.stage == a.stage and replica_of(f.microbatch, m) == rep:
                prev = type(f)("F", f.stage - 1, f.microbatch)
                if f.stage == 0 or pos[prev] < q:
                    new = [x for x in order if x != f]
                    new.insert(q, f)
                    return new
    raise AssertionError("no violating order found")


def test_an_order_that_ignores_the_synchronisation_is_caught():
    """A copy that forwards before its partner's update would train on the wrong version: the
    simulator refuses such an order."""
    sim = BitPipeSimulator(mlp_stages(IN, HID, OUT, 4, seed=1), _opt, n_microbatches=8,
                           loss_fn=F.cross_entropy)
    sim.order = _violating(sim.order, 8)
    x, y = _batches(8, 1)[0]
    with pytest.raises(RuntimeError, match="eager synchronisation"):
        sim.step(x, y)


def test_cli_staleness_and_compare(tmp_path, capsys):
    import json

    from predictopt.cli import main

    assert main(["staleness", "--schedule", "bitpipe", "--ranks", "4", "--microbatches", "4",
                 "--out", str(tmp_path / "bp.png")]) == 0
    text = capsys.readouterr().out
    assert "A            7     0    0    0    0" in text and "B            0     3    0    1    1" \
        in text
    assert (tmp_path / "bp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", "--task", "mlp", "--schedule", "BitPipe", "--stages", "4",
                 "--methods", "sequential,pipeoptim,gpipe", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert res["config"]["schedule"] == "BitPipe" and res["config"]["num_ranks"] == 2
    assert res["methods"]["pipeoptim"]["schedule"] == "BitPipe"
    assert res["methods"]["gpipe"]["updates_per_step"] == 1
    assert res["methods"]["pipeoptim"]["updates_per_step"] == 4  # 8 micro-batches, pairs


# ------------------------------------------------------------------ across processes

_RUNTIME_CONFIGS = [
    {"method": "pipeoptim", "opt": "adamw", "n": 4, "steps": 2},
    {"method": "qh-dl", "opt": "adamw", "n": 4, "steps": 2},
    {"method": "pipedream", "opt": "sgdm", "n": 8, "steps": 2},
    {"method": "gpipe", "opt": "adam", "n": 4, "steps": 2},
    {"method": "pipeoptim", "opt": "adamw", "n": 4, "steps": 2, "dropout": 0.3},
]


@pytest.mark.timeout(240)
def test_bitpipe_runtime_equals_the_simulator_bit_for_bit():
    """Two gloo ranks (K = 2, four chunks, both replicas): every copy's weights and every
    micro-batch's loss equal BitPipeSimulator's, dropout included."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _dist

    values = _dist.launch_ok(_dist.bitpipe_worker, 2, _RUNTIME_CONFIGS, timeout=200.0,
                             pg_timeout=60.0)
    for i, cfg in enumerate(_RUNTIME_CONFIGS):
        tag = _dist.config_tag({**cfg, "schedule": "BitPipe"})
        ref = _dist.simulate_bitpipe(cfg, i, 2)
        seen, losses = set(), {}
        for value in values:
            got = value[tag]
            for key, ws in got["weights"].items():
                seen.add(key)
                for p, q in zip(ws, ref["weights"][key], strict=True):
                    assert torch.equal(p, q), (tag, key)
            losses.update(got["losses"])
        assert seen == set(ref["weights"]), tag
        assert losses == ref["losses"], tag


def test_bitpipe_runtime_needs_a_process_group():
    from predictopt.pipeline import BitPipeRuntime

    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        BitPipeRuntime([torch.nn.Linear(2, 2) for _ in range(4)], torch.optim.SGD,
                       n_microbatches=4)


def test_release_update_without_a_postponed_update_raises():
    from predictopt.pipeline import StageWorker

    m = torch.nn.Linear(2, 2)
    w = StageWorker(m, torch.optim.SGD(m.parameters(), lr=0.1), method="pipedream",
                    staleness=[0, 0])
    with pytest.raises(RuntimeError, match="no update is waiting"):
        w.release_update()
