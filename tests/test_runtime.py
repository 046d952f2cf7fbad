"""Tests for predictopt.pipeline.runtime: PredictiveStage under torch's native schedules.

The central test trains every native schedule on 2 and 4 gloo/CPU ranks (one process-group
launch per world size, each rank looping over the configurations) and requires the final
weights and the per-micro-batch losses to equal the single-process PipelineSimulator's exactly.
The other tests run in this process on a one-rank group (misconfigurations, discovery,
single-rank equivalence) or launch 2 ranks for checkpoints and faults.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import _dist  # noqa: E402
from _dist import OPTIMIZERS, make_batches, make_native, make_stages  # noqa: E402

from predictopt.pipeline import (  # noqa: E402
    SUPPORTED_SCHEDULES,
    PipelineSimulator,
    available_methods,
    get_method,
)

pytest.importorskip("torch.distributed.pipelining")
runtime = pytest.importorskip("predictopt.pipeline.runtime")
PredictiveStage = runtime.PredictiveStage

torch.set_num_threads(1)

ALL = list(SUPPORTED_SCHEDULES)
#: Every registered method that runs on torch's schedules.
PIPELINE_METHODS = [m for m in available_methods()
                    if get_method(m).schedules is None and not get_method(m).staleness_free]


# ---------------------------------------------------------------------------------------------
# The central test: 2 and 4 ranks, every schedule, Adam / AdamW / SGD-momentum, several methods
# ---------------------------------------------------------------------------------------------


def _accepts(method: str, opt: str) -> bool:
    """Whether ``method`` runs with optimizer ``opt`` (e.g. Spike Compensation: SGD only)."""
    from predictopt.pipeline import StageWorker

    m = nn.Linear(2, 2)
    try:
        StageWorker(m, OPTIMIZERS[opt](m.parameters()), method=method, staleness=[0, 1])
    except ValueError:
        return False
    return True


def equivalence_configs(world_size: int) -> list[dict]:
    n, steps = (4, 3) if world_size == 2 else (8, 2)
    cfgs = []
    for s in ALL:
        for opt in ("adam", "adamw", "sgdm"):
            cfg = {"schedule": s, "method": "pipeoptim", "opt": opt, "n": n, "steps": steps}
            # vary how the user builds it: the builder, an explicit attach, plain torch code
            cfg["builder"] = opt == "adam"
            cfg["attach"] = opt == "sgdm" and s in ("1F1B", "ZBVZeroBubble")
            cfg["scale_grads"] = opt == "adamw" and s in ("GPipe", "InterleavedZeroBubble")
            cfgs.append(cfg)
    pipedream = ALL if world_size == 2 else ["1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"]
    cfgs += [{"schedule": s, "method": "pipedream", "opt": "adamw", "n": n, "steps": steps}
             for s in pipedream]
    others = [("gpipe", "1F1B", "adam", None), ("gpipe", "DualPipeV", "sgdm", None),
              ("spectrain", "Interleaved1F1B", "sgdm", None), ("spectrain", "1F1B", "adam", None),
              ("xpipe", "1F1B", "adam", None), ("xpipe", "ZBVZeroBubble", "adamw", None),
              ("pipedream-2bw", "1F1B", "sgdm", None), ("pipedream-2bw", "LoopedBFS", "adamw",
                                                         None),
              # backward on the current weights, also split into I and W (zero bubble)
              ("pipeoptim-lean", "1F1B", "adamw", None),
              ("pipeoptim-lean", "InterleavedZeroBubble", "adam", None),
              ("pipeoptim-lean", "DualPipeV", "sgdm", None)]
    if world_size == 2:
        others += [("xpipe", "InterleavedZeroBubble", "adam", 2),
                   ("pipedream-2bw", "GPipe", "adam", 4),
                   # the default with momentum SGD and with AdamW: the fresh term alone at
                   # the scaled rate, the prediction calibrated (gains fitted per horizon)
                   ("pipeoptim-qh-dm-dl", "1F1B", "sgdm", None),
                   ("pipeoptim-qh-dm-dl", "InterleavedZeroBubble", "adamw", None)]
        # every other registered pipeline method once, alternating a plain and a split-backward
        # schedule and the optimizers
        covered = {m for m, *_ in others} | {"pipeoptim", "pipedream"}
        rest = [m for m in PIPELINE_METHODS if m not in covered]
        for i, m in enumerate(rest):
            opts = ("adamw", "sgdm", "adam")[i % 3:] + ("adamw", "sgdm", "adam")[:i % 3]
            opt = next(o for o in opts if _accepts(m, o))
            others.append((m, ("1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")[i % 3], opt,
                           None))
    cfgs += [{"schedule": s, "method": m, "opt": o, "n": n, "steps": steps, "update_every": u}
             for m, s, o, u in others]
    # dropout: the random streams are a function of (seed, stage, step, micro-batch) only
    dropout = [("pipeoptim", "1F1B", "adamw"), ("pipedream", "InterleavedZeroBubble", "sgdm"),
               ("pipeoptim-lean", "ZBVZeroBubble", "adam")]
    cfgs += [{"schedule": s, "method": m, "opt": o, "n": n, "steps": steps, "dropout": 0.3}
             for m, s, o in (dropout if world_size == 2 else dropout[:1])]
    return cfgs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_matches_simulator_bit_for_bit(world_size: int) -> None:
    configs = equivalence_configs(world_size)
    t0 = time.perf_counter()
    results = _dist.launch(_dist.equivalence_worker, world_size, configs, world_size == 2,
                           timeout=240.0, pg_timeout=60.0)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r} failed:\n{res.get('error')}"
    per_rank = [res["value"] for res in results]
    bad = _dist.check_against_simulator(world_size, configs, per_rank)
    for v in per_rank:
        bad += v["bad"]
    assert not bad, "\n".join(bad[:20])
    if world_size == 2:  # the V-placement checks ran on every rank before any communication
        for r, v in enumerate(per_rank):
            assert len(v["misconfig"]) == 2
            for msg in v["misconfig"]:
                assert msg.startswith("ValueError") and "V placement" in msg, msg
                assert f"on rank {r} of 2" in msg
    print(f"\n{world_size} ranks: {len(configs)} configurations in "
          f"{time.perf_counter() - t0:.1f} s (incl. start-up)")


def test_equivalence_matrix_covers_the_brief() -> None:
    for ws in (2, 4):
        cfgs = equivalence_configs(ws)
        po = {(c["schedule"], c["opt"]) for c in cfgs if c["method"] == "pipeoptim"}
        assert po == {(s, o) for s in ALL for o in ("adam", "adamw", "sgdm")}
        methods = {c["method"] for c in cfgs}
        assert {"pipeoptim", "pipedream", "gpipe", "spectrain", "xpipe",
                "pipedream-2bw", "pipeoptim-lean"} <= methods
    assert set(PIPELINE_METHODS) <= {c["method"] for c in equivalence_configs(2)}


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_dead_rank_makes_the_others_fail_fast() -> None:
    results = _dist.launch(_dist.fault_worker, 2, "kill", timeout=90.0, pg_timeout=30.0)
    assert results[1]["exitcode"] == 17
    survivor = results[0]
    assert survivor["ok"], survivor.get("error")
    raised, seconds = survivor["value"]["raised"], survivor["value"]["seconds"]
    assert raised is not None and "RuntimeError" in raised
    assert seconds < 25.0  # well under the 30 s timeout: the closed socket is seen at once


@pytest.mark.timeout(120)
def test_hung_rank_makes_the_others_fail_within_the_timeout() -> None:
    t0 = time.perf_counter()
    results = _dist.launch(_dist.fault_worker, 2, "hang", timeout=90.0, pg_timeout=4.0,
                           wait_for=[0])
    survivor = results[0]
    assert survivor["ok"], survivor.get("error")
    raised, seconds = survivor["value"]["raised"], survivor["value"]["seconds"]
    assert raised is not None and "RuntimeError" in raised
    assert "Timed out" in raised or "timeout" in raised.lower()
    assert 3.0 < seconds < 30.0
    assert time.perf_counter() - t0 < 80.0  # the hung rank was killed, nothing waited for it


# ---------------------------------------------------------------------------------------------
# In-process tests on a one-rank group
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group exists already in this process")
    path = os.path.join(tempfile.mkdtemp(prefix="predictopt_pg1_"), "store")
    dist.init_process_group("gloo", store=dist.FileStore(path, 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _stages(schedule: str, method: str = "pipeoptim", opt: str = "adamw", seed: int = 1,
            modules=None, **kw):
    if modules is None:
        modules = make_stages(_dist.spr_of(schedule), seed)
    return _dist.local_stages(0, 1, schedule, modules, method, opt, **kw)


def _step(sched, x, y, losses=None):
    return sched.step(x, target=y, losses=losses if losses is not None else [])


@pytest.mark.parametrize("schedule", ALL)
def test_one_rank_matches_simulator(one_rank, schedule: str) -> None:
    stages = _stages(schedule)
    sched = make_native(stages, schedule, 4)
    batches = make_batches(4, 3, seed=3)
    losses = _dist.run_steps(stages, sched, batches)
    ref, ref_losses, _ = _dist.simulate(schedule, 1, "pipeoptim", "adamw", 4, batches)
    assert _dist.compare(schedule, stages, losses, ref, ref_losses) == []
    info = stages[0].schedule_info
    assert info[0] == schedule and info[1] == 1 and info[3] == 4
    assert stages[0].schedule is sched


def test_user_subclass_of_a_native_schedule_is_discovered(one_rank) -> None:
    from torch.distributed.pipelining import Schedule1F1B

    class MySchedule(Schedule1F1B):
        def step(self, *args, **kwargs):
            return super().step(*args, **kwargs)

    stages = _stages("1F1B")
    sched = MySchedule(stages[0], 4, loss_fn=F.cross_entropy)
    batches = make_batches(4, 2)
    losses = _dist.run_steps(stages, sched, batches)
    ref, ref_losses, _ = _dist.simulate("1F1B", 1, "pipeoptim", "adamw", 4, batches)
    assert _dist.compare("sub", stages, losses, ref, ref_losses) == []
    assert runtime.schedule_name(sched) == "1F1B"


def test_build_pipeline_returns_native_schedule(one_rank) -> None:
    from torch.distributed.pipelining import ScheduleZBVZeroBubble

    stages, sched = runtime.build_pipeline(
        make_stages(2), "zbvzerobubble", n_microbatches=4, make_optimizer=OPTIMIZERS["adam"],
        method="pipedream", loss_fn=F.cross_entropy)
    assert type(sched) is ScheduleZBVZeroBubble
    assert [s.stage_index for s in stages] == [0, 1]
    assert all(isinstance(s, PredictiveStage) and s.worker is not None for s in stages)
    assert sched.scale_grads is False
    batches = make_batches(4, 2)
    losses = _dist.run_steps(stages, sched, batches)
    ref, ref_losses, _ = _dist.simulate("ZBVZeroBubble", 1, "pipedream", "adam", 4, batches)
    assert _dist.compare("builder", stages, losses, ref, ref_losses) == []
    with pytest.raises(ValueError, match="needs 2 stage modules"):
        runtime.build_pipeline(make_stages(3), "ZBVZeroBubble", n_microbatches=4,
                               make_optimizer=OPTIMIZERS["adam"], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="world_size=2"):
        runtime.build_pipeline(make_stages(2), "1F1B", world_size=2, n_microbatches=4,
                               make_optimizer=OPTIMIZERS["adam"], loss_fn=F.cross_entropy)


def test_update_every_for_xpipe_and_gpipe(one_rank) -> None:
    # gpipe: one update per step (u = n); xpipe with T = 2 micro-batches per update
    for method, u, schedule in (("gpipe", None, "InterleavedZeroBubble"),
                                ("xpipe", 2, "DualPipeV"), ("pipedream-2bw", 2, "LoopedBFS")):
        stages = _stages(schedule, method=method, opt="adam", update_every=u)
        sched = make_native(stages, schedule, 4)
        batches = make_batches(4, 2, seed=5)
        losses = _dist.run_steps(stages, sched, batches)
        ref, ref_losses, _ = _dist.simulate(schedule, 1, method, "adam", 4, batches, u)
        assert _dist.compare(method, stages, losses, ref, ref_losses) == []
        expected_updates = 2 * 4 // (u or 4)
        assert all(s.worker.num_updates == expected_updates for s in stages)


def test_scale_grads_true_is_harmless(one_rank) -> None:
    batches = make_batches(4, 2)
    out = []
    for scale in (True, False):
        stages = _stages("InterleavedZeroBubble", method="xpipe", opt="sgdm", update_every=2)
        sched = make_native(stages, "InterleavedZeroBubble", 4, scale_grads=scale)
        out.append((_dist.run_steps(stages, sched, batches),
                    [p.detach().clone() for s in stages for p in s.submod.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))


def test_eval_uses_real_weights_and_does_not_train(one_rank) -> None:
    stages = _stages("1F1B")
    sched = make_native(stages, "1F1B", 4)
    x, y = make_batches(4, 1)[0]
    _step(sched, x, y)
    before = [p.detach().clone() for p in stages[0].submod.parameters()]
    updates = stages[0].worker.num_updates
    with torch.no_grad():
        out = sched.eval(x, target=y)
    with torch.no_grad():
        want = torch.cat([stages[0].submod(xi) for xi in x.split(_dist.MB)])
    assert torch.equal(out, want)
    assert stages[0].worker.num_updates == updates
    assert all(torch.equal(a, p) for a, p in zip(before, stages[0].submod.parameters()))
    _step(sched, x, y)  # training continues after the eval (torch re-infers shapes)
    assert stages[0].worker.num_updates == updates + 4


def test_checkpoint_resume_bit_for_bit_one_rank(one_rank) -> None:
    batches = make_batches(4, 3, seed=11)
    # error-feedback: a method whose transforms keep state (the update estimate) in the stage;
    # the default: calibration samples in flight (in the optimizer's state and groups)
    for method, schedule in (("pipeoptim", "DualPipeV"), ("pipedream-2bw", "1F1B"),
                             ("error-feedback", "1F1B"), ("pipeoptim-qh-dm-dl", "1F1B")):
        ref_stages = _stages(schedule, method=method, opt="adamw", update_every=None)
        ref_losses = _dist.run_steps(ref_stages, make_native(ref_stages, schedule, 4), batches)
        stages = _stages(schedule, method=method, opt="adamw")
        losses = _dist.run_steps(stages, make_native(stages, schedule, 4), batches[:2])
        saved = [_dist._save_load(s.state_dict()) for s in stages]
        fresh = _stages(schedule, method=method, opt="adamw", seed=5)
        for s, sd in zip(fresh, saved, strict=True):
            s.load_state_dict(sd)  # before the stage knows its schedule
        losses += _dist.run_steps(fresh, make_native(fresh, schedule, 4), batches[2:])
        assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses, strict=True))
        for a, b in zip(fresh, ref_stages, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a.submod.parameters(),
                                                         b.submod.parameters(), strict=True))
    with pytest.raises(ValueError, match="method"):
        _stages("1F1B", method="pipedream")[0].load_state_dict(saved[0])


# ------------------------------------------------------------------ misconfigurations


def _work_done(stages) -> int:
    return sum(s.worker.num_forwards for s in stages if s.worker is not None)


def test_batch_not_divisible_fails_before_any_work(one_rank) -> None:
    stages = _stages("1F1B")
    sched = make_native(stages, "1F1B", 4)
    x, y = torch.randn(10, _dist.IN), torch.randint(0, _dist.OUT, (10,))
    with pytest.raises(ValueError, match="multiple of n_microbatches"):
        _step(sched, x, y)
    assert _work_done(stages) == 0
    with pytest.raises(ValueError, match="different batch sizes"):
        _step(sched, torch.randn(8, _dist.IN), torch.randint(0, _dist.OUT, (12,)))
    assert _work_done(stages) == 0


def test_batch_size_change_between_steps_fails_before_any_work(one_rank) -> None:
    stages = _stages("ZBVZeroBubble")
    sched = make_native(stages, "ZBVZeroBubble", 4)
    x, y = make_batches(4, 1)[0]
    _step(sched, x, y)
    done = _work_done(stages)
    x2, y2 = torch.randn(12, _dist.IN), torch.randint(0, _dist.OUT, (12,))
    with pytest.raises(ValueError, match="shapes changed between steps"):
        _step(sched, x2, y2)
    assert _work_done(stages) == done


def test_missing_target_on_last_stage_fails_before_any_work(one_rank) -> None:
    stages = _stages("1F1B")
    sched = make_native(stages, "1F1B", 4)
    x, _ = make_batches(4, 1)[0]
    with pytest.raises(ValueError, match="must pass target"):
        sched.step(x)
    with pytest.raises(ValueError, match="must pass target"), torch.no_grad():
        sched.eval(x)
    assert _work_done(stages) == 0


def test_missing_batch_on_first_stage(one_rank) -> None:
    stages = _stages("GPipe")
    sched = make_native(stages, "GPipe", 4)
    with pytest.raises(ValueError, match="must pass the batch"):
        sched.step(target=torch.zeros(8, dtype=torch.long))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(_dist.IN, _dist.OUT)

    def forward(self, x):
        return {"logits": self.lin(x)}


def test_stage_output_must_be_tensors(one_rank) -> None:
    m = DictOut()
    stage = PredictiveStage(m, 0, 1, "cpu", optimizer=OPTIMIZERS["adam"](m.parameters()))
    sched = make_native([stage], "1F1B", 4)
    x, y = make_batches(4, 1)[0]
    with pytest.raises(Exception, match="Tensor or a tuple of Tensors") as info:
        _step(sched, x, y)
    assert "stage 0" in str(info.value)
    assert stage.worker.num_forwards == 0


def test_schedule_missing_from_installed_torch(one_rank, monkeypatch) -> None:
    import torch.distributed.pipelining.schedules as S

    real = S.get_schedule_class

    def fake(name):
        if name.lower() == "dualpipev":
            raise ValueError("unknown")
        return real(name)

    monkeypatch.setattr(S, "get_schedule_class", fake)
    monkeypatch.delattr(S, "ScheduleDualPipeV")
    with pytest.raises(ValueError, match=r"needs torch >= 2\.8.*installed torch is"):
        runtime.build_pipeline(make_stages(2), "DualPipeV", n_microbatches=4,
                               make_optimizer=OPTIMIZERS["adam"], loss_fn=F.cross_entropy)


def test_stage_without_schedule_and_unknown_schedules(one_rank) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    stage = _stages("1F1B")[0]
    stage.has_backward = True  # driven by hand for training, no schedule
    with pytest.raises(RuntimeError, match="attach"):
        stage.forward_one_chunk(0, (torch.randn(2, _dist.IN),))
    with pytest.raises(TypeError, match="torch.distributed.pipelining schedule"):
        runtime.attach(object())

    class Custom(_PipelineScheduleRuntime):
        pass

    custom = Custom([stage], 4, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="cannot run under Custom"):
        runtime.attach(custom)
    plain = PipelineStage(nn.Linear(_dist.IN, _dist.OUT), 0, 1, torch.device("cpu"))
    with pytest.raises(TypeError, match="every stage of this rank must be a PredictiveStage"):
        runtime.attach(Schedule1F1B(plain, 4, loss_fn=F.cross_entropy))


def test_constructor_and_attach_errors(one_rank) -> None:
    m = nn.Linear(_dist.IN, _dist.OUT)
    opt = OPTIMIZERS["adam"](m.parameters())
    with pytest.raises(ValueError, match="sequential"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="sequential")
    with pytest.raises(ValueError, match="method must be one of"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="bogus")
    with pytest.raises(TypeError, match="optimizer"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=None)
    with pytest.raises(ValueError, match="update_every"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, update_every=0)
    with pytest.raises(ValueError, match="dw_builder"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, dw_builder=lambda: None)
    # what is known at construction fails at construction
    with pytest.raises(ValueError, match="update_every must be 1 for method 'pipeoptim'"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="pipeoptim", update_every=2)
    with pytest.raises(ValueError, match="update_every must be >= the number of stages"):
        PredictiveStage(m, 0, 4, "cpu", optimizer=opt, method="pipedream-2bw", update_every=2)
    with pytest.raises(ValueError, match="predicting methods only"):
        PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="pipedream", horizons=[0, 0])
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"stage 0: the optimizer's parameter group 0, tensor 2 "
                                         r"\(shape \(2, 2\)\) is not a parameter"):
        PredictiveStage(m, 0, 1, "cpu",
                        optimizer=torch.optim.SGD([*m.parameters(), other.weight], lr=0.1))
    stage = PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="xpipe", update_every=3)
    with pytest.raises(ValueError, match="must divide"):
        runtime.attach(make_native([stage], "GPipe", 4))
    stage = PredictiveStage(m, 0, 1, "cpu", optimizer=opt, method="pipeoptim", horizons=[1, 1])
    with pytest.raises(ValueError, match="horizons"):
        runtime.attach(make_native([stage], "GPipe", 4))


def test_reattach_to_a_schedule_with_other_sizes(one_rank) -> None:
    """torch allows a stage under a new schedule with another n_microbatches and batch size;
    so does the stage, and its optimizer state carries over (checked against the simulator
    run the same way)."""
    stages = _stages("1F1B")
    first = make_batches(4, 2, seed=5)
    second = make_batches(2, 2, seed=6)
    _dist.run_steps(stages, make_native(stages, "1F1B", 4), first)
    losses = _dist.run_steps(stages, make_native(stages, "1F1B", 2), second)
    assert stages[0].schedule_info[3] == 2
    ref = make_stages(1)
    sim_a = PipelineSimulator(ref, OPTIMIZERS["adamw"], method="pipeoptim", n_microbatches=4)
    for x, y in first:
        sim_a.step(x, y)
    opt = sim_a.workers[0].optimizer
    sim_b = PipelineSimulator(ref, lambda p: opt, method="pipeoptim", n_microbatches=2)
    ref_losses = []
    for x, y in second:
        ref_losses += sim_b.step(x, y)
    assert _dist.compare("reattach", stages, losses, ref,
                         torch.tensor(ref_losses, dtype=torch.float32)) == []


def test_a_subclass_with_another_order_is_rejected_before_any_work(one_rank) -> None:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    class LooksLike1F1B(Schedule1F1B):
        _step_microbatches = ScheduleGPipe._step_microbatches

    stages = _stages("1F1B")
    before = [p.detach().clone() for p in stages[0].submod.parameters()]
    sched = LooksLike1F1B(stages[0], 4, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="cannot verify the order"):
        runtime.attach(sched)
    x, y = make_batches(4, 1)[0]
    with pytest.raises(ValueError, match="cannot verify the order"):
        sched.step(x, target=y)
    assert stages[0].worker is None
    assert all(torch.equal(a, b) for a, b in zip(before, stages[0].submod.parameters()))


def test_forward_without_a_schedule_raises(one_rank) -> None:
    stage = _stages("1F1B")[0]
    stage.has_backward = False
    with pytest.raises(RuntimeError, match="attach"):
        stage.forward_one_chunk(0, (torch.randn(2, _dist.IN),))


def test_the_next_step_runs_after_a_failed_one(one_rank, caplog) -> None:
    calls = {"n": 0}

    def flaky_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 7:  # the third micro-batch of the second step
            raise ArithmeticError("boom")
        return F.cross_entropy(out, y)

    from torch.distributed.pipelining import Schedule1F1B

    stages = _stages("1F1B")
    sched = Schedule1F1B(stages[0], 4, loss_fn=flaky_loss)
    batches = make_batches(4, 3, seed=2)
    sched.step(batches[0][0], target=batches[0][1])
    w = stages[0].worker
    with caplog.at_level("WARNING", logger="predictopt.pipeline.runtime"), \
            pytest.raises(ArithmeticError, match="boom"):
        sched.step(batches[1][0], target=batches[1][1])
    import re

    found = re.search(r"dropped micro-batches \[([\d, ]+)\] in flight .* the (\d+) update\(s\) "
                      r"this step had applied stay applied", caplog.text)
    assert found, caplog.text
    applied = int(found.group(2))
    assert 0 < applied < 4 and w.in_flight == [] and w.num_updates == 4 + applied
    losses: list = []
    sched.step(batches[2][0], target=batches[2][1], losses=losses)  # runs normally
    assert len(losses) == 4 and w.num_updates == 8 + applied and w.in_flight == []


def test_init_distributed_arguments(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="timeout"):
        runtime.init_distributed(timeout=0)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE"):
        runtime.init_distributed()


def test_shape_inference_leaves_buffers_alone(one_rank) -> None:
    # torch's shape inference runs the module once more (on placeholders for inner stages):
    # BatchNorm statistics must still match the simulator, which has no such pass.
    def modules():
        torch.manual_seed(0)
        return [nn.Sequential(nn.Linear(_dist.IN, _dist.HID), nn.BatchNorm1d(_dist.HID)),
                nn.Sequential(nn.ReLU(), nn.Linear(_dist.HID, _dist.OUT))]

    batches = make_batches(4, 2)
    mods = modules()
    stages = _dist.local_stages(0, 1, "ZBVZeroBubble", mods, "pipeoptim", "adam")
    losses = _dist.run_steps(stages, make_native(stages, "ZBVZeroBubble", 4), batches)
    ref = modules()
    sim = PipelineSimulator(ref, OPTIMIZERS["adam"], method="pipeoptim",
                            schedule="ZBVZeroBubble", n_microbatches=4, loss_fn=F.cross_entropy)
    ref_losses = [v for x, y in batches for v in sim.step(x, y)]
    assert torch.equal(torch.stack(losses), torch.tensor(ref_losses))
    for a, b in zip(mods, ref, strict=True):
        for (name, t), u in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(t, u), name


def test_the_torch_internals_the_runtime_reads_are_present(one_rank) -> None:
    """The runtime's private-API use (the "torch access" section of runtime.py), pinned: a torch
    release that renames any of these fails here, not in a user's run."""
    import torch.distributed.pipelining.schedules as S

    stages = _stages("1F1B")
    for name in ("1F1B", "GPipe"):
        sched = make_native(stages, name, 4)
        for attr in ("_n_microbatches", "_loss_fn", "_has_backward", "_args_chunk_spec",
                     "_kwargs_chunk_spec", "_internal_losses", "_stage"):
            assert hasattr(sched, attr), attr
        assert getattr(type(sched).step, "__predictopt_hook__", None) is not None
    multi = make_native(_stages("Interleaved1F1B"), "Interleaved1F1B", 4)
    assert hasattr(multi, "_stages") and hasattr(multi, "pipeline_order")
    hooked = [c for c in runtime._HOOKED]
    assert S.PipelineScheduleSingle in hooked and S.PipelineScheduleMulti in hooked
    for cls in hooked:  # each wrapped once, torch's own method kept
        assert cls.step.__predictopt_hook__ is runtime._HOOKED[cls]


def test_warns_once_about_the_per_tensor_optimizer_loop(one_rank, monkeypatch) -> None:
    import warnings

    monkeypatch.setattr(runtime, "_WARNED_SLOW", [])
    slow = _stages("1F1B")
    with pytest.warns(UserWarning, match="per-tensor loop on CPU.*fused=True"):
        runtime.attach(make_native(slow, "1F1B", 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.attach(make_native(_stages("1F1B"), "1F1B", 4))  # once per process
    monkeypatch.setattr(runtime, "_WARNED_SLOW", [])
    m = make_stages(1)[0]
    fused = PredictiveStage(m, 0, 1, "cpu",
                            optimizer=torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.attach(make_native([fused], "1F1B", 4))
        m2 = make_stages(1)[0]
        gp = PredictiveStage(m2, 0, 1, "cpu", optimizer=OPTIMIZERS["adamw"](m2.parameters()),
                             method="gpipe")
        runtime.attach(make_native([gp], "1F1B", 4))  # one update per step: no warning


@pytest.mark.timeout(120)
def test_check_determinism_warns_when_thread_counts_differ() -> None:
    same = _dist.launch(_dist.determinism_worker, 2, [1, 1], timeout=90.0)
    diff = _dist.launch(_dist.determinism_worker, 2, [1, 2], timeout=90.0)
    for res in same + diff:
        assert res["ok"], res.get("error")
    assert all(not r["value"]["warnings"] for r in same)
    for r in diff:
        msgs = r["value"]["warnings"]
        assert len(msgs) == 1 and "threads (rank 0: 1, rank 1: 2)" in msgs[0]
        assert [s["threads"] for s in r["value"]["settings"]] == [1, 2]


def test_distributed_post_validation_on_one_rank(one_rank) -> None:
    """Not attached: an error naming the fix. Attached (one rank holds the whole pipeline):
    clipping by post-validation equals the simulator's deferred post-validation bit for bit."""
    from predictopt.pipeline import DistributedPostValidation, PostValidation, attach

    stages = _stages("1F1B", method="gpipe")
    with pytest.raises(ValueError, match="not attached to a schedule"):
        DistributedPostValidation(stages, max_norm=0.1)
    sched = make_native(stages, "1F1B", 4)
    attach(sched)
    pv = DistributedPostValidation(stages, max_norm=0.1)
    sim = PipelineSimulator(make_stages(1, 1), OPTIMIZERS["adamw"], method="gpipe",
                            schedule="1F1B", n_microbatches=4, loss_fn=F.cross_entropy)
    ref = PostValidation(sim.workers, max_norm=0.1, deferred=True)
    for x, y in make_batches(4, 3):
        _step(sched, 3 * x, y)
        pv.validate()
        sim.step(3 * x, y)
        ref.validate()
    assert pv.clipped == ref.clipped == 3 and pv.pending == [0]
    for p, q in zip(stages[0].submod.parameters(), sim.stages[0].parameters()):
        assert torch.equal(p, q)


def test_bitpipe_runtime_needs_its_k_ranks(one_rank) -> None:
    from predictopt.pipeline import BitPipeRuntime

    with pytest.raises(ValueError, match="runs on K = 2 ranks; the process group has 1"):
        BitPipeRuntime(make_stages(4), OPTIMIZERS["adamw"], n_microbatches=4)
    with pytest.raises(ValueError, match="num_chunks"):
        BitPipeRuntime(lambda c: make_stages(4)[c], OPTIMIZERS["adamw"], n_microbatches=4)
