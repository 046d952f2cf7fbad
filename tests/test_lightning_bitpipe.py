"""Tests for ``PipeOptimStrategy(schedule="BitPipe")``: BitPipe under Lightning's Trainer.

One bounded 2-process launch (``tests/_dist.py``, gloo, a 60 s process-group timeout) runs the
scenarios of :func:`scenarios` on both ranks, each a plain ``Trainer(...).fit`` of a 4-chunk
MLP (two copies of each chunk, 8 micro-batches of 2 per batch of 16, 4 batches per epoch). The
tests compare what they returned with :class:`~predictopt.pipeline.BitPipeSimulator` run in
this process on the same initial weights, optimizer, schedulers, method, micro-batches and
data, with ``torch.equal``. Configuration errors are raised in this process, before any worker
starts.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import _dist  # noqa: E402
from test_lightning import (  # noqa: E402
    N_DATA,
    OUT,
    Net,
    assert_same,
    clip_stage,
    floats,
    make_optimizer,
    make_schedulers,
    ok,
    pipe,
    read_csv,
    run_epochs,
    train_loader,
    trainer,
    val_loader,
    weights,
)

import lightning_plugin  # noqa: E402
from lightning_plugin import PipeOptimConfigError, PipeOptimStrategy  # noqa: E402
from lightning_plugin.checkpoint import stage_state  # noqa: E402
from predictopt.pipeline import (  # noqa: E402
    DEFAULT_METHOD,
    PREDICTING_METHODS,
    BitPipeSimulator,
)

N, BATCH, CLIP = 8, 16, 0.05  # micro-batches per batch (4 per replica), batch size, clip norm
CHUNKS = 4


# ---------------------------------------------------------------------------------------------
# Scenarios (module level: the spawned processes import them)
# ---------------------------------------------------------------------------------------------


class Record(Callback):
    """The loss every batch returned, and every copy's weights at the end of training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.copies: dict[tuple[str, int], list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        runtime = trainer.strategy.pipeline_schedule
        self.copies = {key: [p.detach().clone() for p in w.module.parameters()]
                       for key, w in runtime.copies.items()}


def bitpipe(**kw: Any) -> PipeOptimStrategy:
    return pipe(schedule="BitPipe", **kw)


def run_default(rank: int, tmp: str) -> dict[str, Any]:
    """The default method with per-copy clipping and a per-update LR scheduler; validation,
    predict, a checkpoint at the end of the epoch."""
    model = Net(CHUNKS, "step")
    logger = CSVLogger(tmp, name="bitpipe", version=0)
    ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, "bp"), filename="bitpipe")
    rec = Record()
    t = trainer(bitpipe(), tmp, logger=logger, log_every_n_steps=1, enable_checkpointing=True,
                callbacks=[ckpt, rec], gradient_clip_val=CLIP)
    t.fit(model, train_loader(BATCH), val_loader())
    return {"weights": weights(model), "copies": rec.copies, "losses": rec.losses,
            "log_dir": logger.log_dir, "path": ckpt.best_model_path,
            "callback": floats(t.callback_metrics), "estimated": model.estimated,
            "last_epoch": t.lr_scheduler_configs[0].scheduler.last_epoch,
            "predict": torch.cat(t.predict(model, val_loader()))}


def run_predicting(rank: int, tmp: str) -> dict[str, Any]:
    """pipeoptim (predicting, schedule-aware with the per-update scheduler) and a per-epoch
    scheduler, over 2 epochs."""
    model = Net(CHUNKS, "both")
    rec = Record()
    trainer(bitpipe(method="pipeoptim"), tmp, callbacks=[rec], max_epochs=2).fit(
        model, train_loader(BATCH))
    return {"weights": weights(model), "copies": rec.copies, "losses": rec.losses}


def run_resume(rank: int, tmp: str) -> dict[str, Any]:
    """Resume the default run's checkpoint, and a single-device one, for a second epoch; fit
    and resume error-feedback (state in its transforms, per copy)."""
    out = {}
    for name, path, clip in (("own", os.path.join(tmp, "bp", "bitpipe.ckpt"), CLIP),
                             ("single", os.path.join(tmp, "single.ckpt"), None)):
        model = Net(CHUNKS, "step", seed=99)
        rec = Record()
        trainer(bitpipe(), tmp, max_epochs=2, gradient_clip_val=clip, callbacks=[rec]).fit(
            model, train_loader(BATCH), ckpt_path=path)
        out[name] = {"weights": weights(model), "copies": rec.copies}
    # a method whose transforms keep state per copy (error feedback's estimate)
    ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, "bp-ef"), filename="ef")
    trainer(bitpipe(method="error-feedback"), tmp, enable_checkpointing=True,
            callbacks=[ckpt]).fit(Net(CHUNKS, "step"), train_loader(BATCH))
    model = Net(CHUNKS, "step", seed=99)
    rec = Record()
    trainer(bitpipe(method="error-feedback"), tmp, max_epochs=2, callbacks=[rec]).fit(
        model, train_loader(BATCH), ckpt_path=ckpt.best_model_path)
    out["ef"] = {"weights": weights(model), "copies": rec.copies, "path": ckpt.best_model_path}
    return out


class TwoOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y, y


class TwoIn(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a, b):
        return self.inner(a + b)


class TupleNet(Net):
    """A stage returning a tuple (torch schedules take it; BitPipeRuntime sends one tensor)."""

    def __init__(self) -> None:
        super().__init__(CHUNKS, "none")
        s = list(self.stages)
        self.stages = nn.ModuleList([TwoOut(s[0]), TwoIn(s[1]), s[2], s[3]])


def run_errors(rank: int, tmp: str) -> dict[str, Any]:
    try:
        trainer(bitpipe(), tmp).fit(TupleNet(), train_loader(BATCH))
        return {"tuple": "no error"}
    except Exception as e:  # noqa: BLE001 - the message is the result
        return {"tuple": f"{type(e).__name__}: {e}"}


SCENARIOS = {"default": run_default, "predicting": run_predicting, "resume": run_resume,
             "errors": run_errors}


def scenarios(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Every scenario on this rank; a failing one is reported, the others still run."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    import warnings

    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = {"ok": True, "value": fn(rank, tmp)}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    return results


# ---------------------------------------------------------------------------------------------
# References (this process)
# ---------------------------------------------------------------------------------------------


def simulate(*, method: str = DEFAULT_METHOD, epochs: tuple[int, ...] = (0,),
             clip: float | None = None, sched: str = "step", start: dict[str, Any] | None = None
             ) -> tuple[Net, list[float], BitPipeSimulator]:
    """The same training with BitPipeSimulator: the model (replica A's chunks), the per-batch
    mean losses, the simulator. ``sched``: the schedulers of :func:`make_schedulers` (per copy);
    ``start``: a checkpoint to begin from (weights, optimizer and scheduler states loaded into
    both copies)."""
    torch.set_num_threads(1)
    model = Net(CHUNKS, "step")
    if start is not None:
        model.load_state_dict(start["state_dict"])
    modules = list(model.stages)
    sim = BitPipeSimulator(modules, make_optimizer, method=method, n_microbatches=N,
                           loss_fn=F.cross_entropy)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    per_epoch = []
    for (rep, c), w in sim.copies.items():
        inner = w.optimizer.optimizer
        if clip:
            inner.register_step_pre_hook(lambda o, *_: clip_stage(o, clip))
        made = make_schedulers(inner, sched)
        if start is not None:
            twin = {id(p): q for p, q in zip(modules[c].parameters(),
                                             sim.stages[rep][c].parameters())}
            index = {id(twin[i]) if i in twin else i: j for i, j in position.items()}
            # a copy of the state for each copy (both copies live in this one process)
            state = copy.deepcopy(start["optimizer_states"][0])
            inner.load_state_dict(stage_state(state, inner, index))
            for (s, _), sd in zip(made, start["lr_schedulers"], strict=True):
                s.load_state_dict(sd)
        per_update = [s for s, interval in made if interval == "step"]
        per_epoch += [s for s, interval in made if interval == "epoch"]
        for s in per_update:
            w.after_update.append(lambda _w, s=s: s.step())
        if method in PREDICTING_METHODS and len(per_update) == 1:
            w.optimizer.attach_scheduler(per_update[0])
    return model, run_epochs(sim, epochs, BATCH, per_epoch), sim


def copies_of(sim: BitPipeSimulator) -> dict[tuple[str, int], list[torch.Tensor]]:
    return {key: [p.detach() for p in w.module.parameters()] for key, w in sim.copies.items()}


def assert_copies(per_rank: list[dict[str, Any]], sim: BitPipeSimulator) -> None:
    """Every copy of every chunk, on the rank holding it, equals the simulator's."""
    want = copies_of(sim)
    seen = set()
    for value in per_rank:
        for key, ws in value["copies"].items():
            seen.add(key)
            assert_same(ws, want[key])
    assert seen == set(want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, dict[str, list[Any]]]:
    tmp = str(tmp_path_factory.mktemp("bitpipe"))
    torch.manual_seed(0)
    # the single-device checkpoint a BitPipe fit resumes from
    t = trainer("auto", tmp, devices=1)
    t.fit(Net(CHUNKS, "step"), train_loader(BATCH))
    t.save_checkpoint(os.path.join(tmp, "single.ckpt"))
    per_rank = _dist.launch(scenarios, 2, tmp, timeout=240, pg_timeout=60)
    for r, res in enumerate(per_rank):
        assert res["ok"], f"rank {r}: {res['error']}"
    return tmp, {name: [res["value"][name] for res in per_rank] for name in SCENARIOS}


# ---------------------------------------------------------------------------------------------
# Training, losses, evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fit_equals_the_simulator_bit_for_bit(runs) -> None:
    """The default method (per-chunk clipping of the mean gradient, a per-update LambdaLR) and
    pipeoptim (schedule-aware, and a per-epoch StepLR over 2 epochs): every copy's weights
    equal BitPipeSimulator's, both copies of every chunk are equal, the LightningModule holds
    replica A on both ranks; the returned and logged losses are the means of the simulator's
    micro-batch losses."""
    r0, r1 = ok(runs, "default")
    model, losses, sim = simulate(clip=CLIP)
    for r in (r0, r1):
        assert_same(r["weights"], weights(model))
        assert r["losses"] == losses  # on_train_batch_end's outputs["loss"], every rank
    assert_copies([r0, r1], sim)
    for c in range(CHUNKS):
        assert_same(copies_of(sim)[("A", c)], copies_of(sim)[("B", c)])
    rows = read_csv(os.path.join(r0["log_dir"], "metrics.csv"))
    assert [float(r["train_loss"]) for r in rows if r.get("train_loss")] == losses
    assert r0["callback"]["train_loss"] == r1["callback"]["train_loss"] == losses[-1]
    updates = (N_DATA // BATCH) * N // 2  # per copy: one per pair of micro-batches
    assert r0["estimated"] == r0["last_epoch"] == updates
    assert all(w.num_updates == updates for w in sim.workers)
    unclipped, _, _ = simulate()
    assert not torch.equal(r0["weights"][0], next(unclipped.parameters()).detach())

    p0, p1 = ok(runs, "predicting")
    model, losses, sim = simulate(method="pipeoptim", sched="both", epochs=(0, 1))
    assert_same(p0["weights"], weights(model))
    assert_same(p1["weights"], weights(model))
    assert p0["losses"] == p1["losses"] == losses
    assert_copies([p0, p1], sim)


@pytest.mark.timeout(300)
def test_evaluation_runs_along_replica_a(runs) -> None:
    """Validation and predict go through replica A's chunks on the real weights."""
    r0, r1 = ok(runs, "default")
    _, _, sim = simulate(clip=CLIP)
    vx, vy = val_loader().dataset.tensors
    want = torch.cat([sim.evaluate(vx[i:i + 12]) for i in range(0, 28, 12)])
    assert torch.equal(r0["predict"], want) and torch.equal(r1["predict"], want)
    val = sum(float(F.cross_entropy(sim.evaluate(vx[i:i + 12]), vy[i:i + 12])) *
              len(vy[i:i + 12]) for i in range(0, 28, 12)) / 28
    assert r0["callback"]["val_loss"] == pytest.approx(val, rel=1e-6)
    acc = float((sim.evaluate(vx).argmax(-1) == vy).float().mean())
    assert r0["callback"]["val_acc"] == pytest.approx(acc, abs=1e-6) == r1["callback"]["val_acc"]
    assert sim.evaluate(vx).shape[-1] == OUT


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class StateAtStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


@pytest.mark.timeout(300)
def test_checkpoints_are_single_device_ones(runs, tmp_path) -> None:
    """The checkpoint holds replica A's optimizer states in the single-device format (equal to
    the simulator's); a one-device fit resumes from it; BitPipe resumes from it and from a
    single-device checkpoint with both copies restored (equal to the simulator's runs), and a
    method with transform state (error-feedback) resumes with it."""
    tmp, _ = runs
    r0, _ = ok(runs, "default")
    model, _, sim = simulate(clip=CLIP)
    mine = torch.load(r0["path"], weights_only=False)
    single = torch.load(os.path.join(tmp, "single.ckpt"), weights_only=False)
    a, b = mine["optimizer_states"][0], single["optimizer_states"][0]
    assert a["param_groups"] == [{**g, "lr": a["param_groups"][0]["lr"]}
                                 for g in b["param_groups"]]
    assert sorted(a["state"]) == sorted(b["state"]) == list(range(2 * CHUNKS))
    position = {id(p): i for i, p in enumerate(model.parameters())}
    for c in range(CHUNKS):
        inner = sim.copies[("A", c)].optimizer.optimizer
        for p in model.stages[c].parameters():
            for key, v in inner.state[p].items():
                assert torch.equal(a["state"][position[id(p)]][key], v), (c, key)
    assert mine["lr_schedulers"][0]["last_epoch"] == (N_DATA // BATCH) * N // 2
    assert mine[lightning_plugin.CHECKPOINT_KEY]["schedule"] == "BitPipe"

    one = Net(CHUNKS, "step", seed=99)
    at_start = StateAtStart()
    trainer("auto", str(tmp_path), devices=1, max_epochs=2, callbacks=[at_start]).fit(
        one, train_loader(BATCH), ckpt_path=r0["path"])
    for i, st in a["state"].items():
        for key, v in st.items():
            assert torch.equal(at_start.state["state"][i][key], v)
    assert all(torch.isfinite(p).all() for p in one.parameters())

    s0, s1 = ok(runs, "resume")
    model, _, sim = simulate(clip=CLIP, epochs=(0, 1))
    for s in (s0, s1):
        assert_same(s["own"]["weights"], weights(model))
    assert_copies([s0["own"], s1["own"]], sim)
    model, _, sim = simulate(epochs=(1,), start=single)
    for s in (s0, s1):
        assert_same(s["single"]["weights"], weights(model))
    assert_copies([s0["single"], s1["single"]], sim)
    model, _, sim = simulate(method="error-feedback", epochs=(0, 1))
    for s in (s0, s1):
        assert_same(s["ef"]["weights"], weights(model))
    assert_copies([s0["ef"], s1["ef"]], sim)
    blob = torch.load(s0["ef"]["path"], weights_only=False)[lightning_plugin.CHECKPOINT_KEY]
    assert {rep for rep, _ in blob["transforms"]} == {"A", "B"}


# ---------------------------------------------------------------------------------------------
# What BitPipe does not run
# ---------------------------------------------------------------------------------------------


def _fit_error(tmp, model, devices: int = 2, strategy=None, **kw) -> None:
    strategy = strategy or PipeOptimStrategy("BitPipe", start_method="spawn")
    t = trainer(strategy, str(tmp), devices=devices, **kw)
    t.fit(model, train_loader(BATCH))  # raises in this process, before any worker starts


def test_unsupported_options_raise_before_any_worker(tmp_path) -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry.get("pipeoptim_bitpipe").schedule == "BitPipe"
    assert PipeOptimStrategy("bitpipe").schedule == "BitPipe"
    for kw, match in (({"rule": "observed"}, "rule='observed' is not supported"),
                      ({"stages_per_rank": 4}, "stages_per_rank=4 is not supported"),
                      ({"clip_scope": "global"}, "clip_scope='global' is not supported"),
                      ({"process_group_backend": "nccl"}, "gloo"),
                      ({"scale_grads": True}, "no torch schedule arguments.*scale_grads")):
        with pytest.raises(PipeOptimConfigError, match=match):
            PipeOptimStrategy("BitPipe", **kw)
    with pytest.raises(PipeOptimConfigError, match="schedule must be one of .*BitPipe"):
        PipeOptimStrategy("BitPipes")
    with pytest.raises(PipeOptimConfigError, match="4 stage.*needs devices=2.*runs 1 process"):
        _fit_error(tmp_path, Net(CHUNKS), devices=1)
    with pytest.raises(PipeOptimConfigError, match="6 stage.*multiple of 4 stages"):
        _fit_error(tmp_path, Net(6), devices=3)
    with pytest.raises(PipeOptimConfigError, match="even n_microbatches.*got n_microbatches=5"):
        _fit_error(tmp_path, Net(CHUNKS), strategy=PipeOptimStrategy("BitPipe", n_microbatches=5))
    with pytest.raises(PipeOptimConfigError, match="update_every=3 must be even"):
        _fit_error(tmp_path, Net(CHUNKS), strategy=PipeOptimStrategy("BitPipe", update_every=3))
    with pytest.raises(PipeOptimConfigError,
                       match="accumulate_grad_batches=4.*update_every must be 1"):
        _fit_error(tmp_path, Net(CHUNKS), accumulate_grad_batches=4)
    with pytest.raises(PipeOptimConfigError, match="precision='bf16-mixed' is not supported"):
        _fit_error(tmp_path, Net(CHUNKS), precision="bf16-mixed")
    with pytest.raises(PipeOptimConfigError, match="precision='16-mixed' is not supported"):
        _fit_error(tmp_path, Net(CHUNKS), plugins=[MixedPrecision("16-mixed", "cpu")])


@pytest.mark.timeout(300)
def test_a_stage_returning_a_tuple_raises_on_every_rank(runs) -> None:
    e0, e1 = ok(runs, "errors")
    for e in (e0, e1):
        assert e["tuple"].startswith("PipelineContractError: stage 0 returned a tuple"), e
