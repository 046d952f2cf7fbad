"""Tests for lightning_plugin: PipeOptimStrategy under Lightning's Trainer.

The distributed tests launch 2 or 4 CPU processes with Lightning's spawn launcher (what
``start_method="auto"`` picks under pytest) and compare the trained weights with
:class:`~predictopt.pipeline.PipelineSimulator` exactly (``torch.equal``): the runtime matches
the simulator bit for bit, so the Lightning run must too, including LR schedulers stepped once
per update, a V schedule with two stages (two optimizers) per process, and a resume from a
checkpoint. Lightning shuffles the training data with a ``DistributedSampler`` (here with
``num_replicas=1``, seed 0, ``set_epoch``), which the reference reproduces.

The error tests run in this process: the strategy checks the configuration in the launching
process, before any worker starts.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_plugin
from lightning_plugin import (
    PipelineContractError,
    PipelineModule,
    PipeOptimConfigError,
    PipeOptimStrategy,
)
from lightning_plugin._core import (
    CHECKPOINT_KEY,
    check_optimizer_config,
    clone_scheduler,
    make_plan,
    rebuild_optimizer,
)
from predictopt.data import mlp_stages
from predictopt.pipeline import PipelineSimulator

IN, HID, OUT = 8, 8, 4
N_DATA = 64
LAUNCH_TIMEOUT = 60  # process-group timeout of the launched runs (seconds)


# ---------------------------------------------------------------------------------------------
# Module, data and the reference (module level: the spawned processes unpickle them)
# ---------------------------------------------------------------------------------------------


def decay(update: int) -> float:
    return 1.0 / (1.0 + 0.05 * update)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def make_schedulers(opt: torch.optim.Optimizer, kind: str) -> list[tuple[object, str]]:
    """``[(scheduler, interval)]``: ``step`` = per update, ``both`` adds a per-epoch StepLR."""
    out: list[tuple[object, str]] = []
    if kind in ("step", "both"):
        out.append((torch.optim.lr_scheduler.LambdaLR(opt, decay), "step"))
    if kind == "both":
        out.append((torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "epoch"))
    return out


class Net(PipelineModule):
    def __init__(self, num_stages: int = 2, sched: str = "step", seed: int = 1) -> None:
        super().__init__()
        self.sched = sched
        self.stages = nn.ModuleList(mlp_stages(IN, HID, OUT, num_stages, seed=seed))

    def pipeline_stages(self):
        return self.stages

    def pipeline_loss(self, output, target):
        return F.cross_entropy(output, target)

    def pipeline_metrics(self, output, target):
        return {"acc": (output.argmax(-1) == target).float().mean()}

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters())
        scheds = make_schedulers(opt, self.sched)
        if not scheds:
            return opt
        return [opt], [{"scheduler": s, "interval": i} for s, i in scheds]


def dataset(n: int = N_DATA, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN, generator=gen), torch.randint(0, OUT, (n,),
                                                                            generator=gen))


def loader(batch: int, n: int = N_DATA, seed: int = 0) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch)


class RankMetrics(Callback):
    """Writes every rank's callback metrics (and progress-bar metrics) at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({"callback": {k: float(v) for k, v in trainer.callback_metrics.items()},
                    "bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()}},
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def trainer(strategy, devices: int, tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), **kw)


def reference(num_stages: int, schedule: str, n: int, batch: int, epochs: int, sched: str,
              method: str = "pipeoptim"
              ) -> tuple[list[nn.Module], list[float], PipelineSimulator]:
    """The same training in one process: weights, per-step mean losses, the simulator."""
    torch.set_num_threads(1)
    modules = mlp_stages(IN, HID, OUT, num_stages, seed=1)
    sim = PipelineSimulator(modules, make_optimizer, method=method, schedule=schedule,
                            n_microbatches=n, loss_fn=F.cross_entropy)
    epoch_scheds = []
    for w in sim.workers:
        inner = w.optimizer.optimizer
        scheds = make_schedulers(inner, sched)
        per_update = [s for s, i in scheds if i == "step"]
        epoch_scheds += [s for s, i in scheds if i == "epoch"]
        for s in per_update:
            inner.register_step_post_hook(lambda _o, _a, _k, s=s: s.step())
        if len(per_update) == 1:  # the strategy's schedule-aware prediction
            w.optimizer.attach_scheduler(per_update[0])
    ds = dataset()
    losses: list[float] = []
    for epoch in range(epochs):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True,
                                     seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        sampler.set_epoch(epoch)
        idx = list(sampler)
        for b in range(len(idx) // batch):
            x, y = ds[idx[b * batch:(b + 1) * batch]]
            step = sim.step(x, y)
            losses.append(float(torch.tensor(step).mean()))
        for s in epoch_scheds:
            s.step()
    return modules, losses, sim


def assert_same_weights(model: Net, ref: list[nn.Module]) -> None:
    for k, (stage, want) in enumerate(zip(model.stages, ref, strict=True)):
        for (name, p), q in zip(stage.named_parameters(), want.parameters(), strict=True):
            assert torch.equal(p.detach(), q.detach()), \
                f"stage {k} {name}: max diff {(p - q).abs().max().item():.3g}"


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Distributed runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_string_form_four_processes_logs_on_every_rank(tmp_path) -> None:
    """``strategy="pipeoptim"`` on 4 processes: exact weights, losses logged on every rank."""
    model = Net(4, "step")
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    t = trainer("pipeoptim", 4, tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1,
                num_sanity_val_steps=0, callbacks=[RankMetrics(str(tmp_path))])
    assert isinstance(t.strategy, PipeOptimStrategy) and t.strategy.schedule == "1F1B"
    t.fit(model, loader(16), DataLoader(dataset(28, seed=5), batch_size=12))  # 12, 12, 4
    # default n_microbatches: 2 x 4 stages = 8
    ref, ref_losses, sim = reference(4, "1F1B", 8, 16, 1, "step")
    assert_same_weights(model, ref)

    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for r, m in enumerate(per_rank):
        assert m == per_rank[0], f"rank {r} logged other values than rank 0"
        assert {"train_loss", "val_loss", "val_acc"} <= set(m["callback"])
        assert {"train_loss", "val_loss"} <= set(m["bar"])
    assert per_rank[0]["callback"]["train_loss"] == pytest.approx(ref_losses[-1], abs=0.0)

    rows = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert train == ref_losses  # the mean of the last stage's micro-batch losses, every step
    (val,) = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    vx, vy = dataset(28, seed=5).tensors
    want = sum(float(F.cross_entropy(sim.evaluate(vx[i:i + 12]), vy[i:i + 12])) * len(vy[i:i + 12])
               for i in range(0, 28, 12)) / 28
    assert val == pytest.approx(want, rel=1e-6)
    assert "val_loss" in t.callback_metrics  # back in the launching process


@pytest.mark.timeout(300)
def test_lean_method_on_two_processes(tmp_path) -> None:
    """``PipeOptimStrategy(method="pipeoptim-lean")`` (backward on the current weights) trains
    exactly as the simulator does. ZBV, 4 stages on 2 processes: the inner stages have stale
    micro-batches whose input gradient goes through the weights (with one linear layer per
    stage, the first stage's backward never reads its weights, and the last is never stale)."""
    model = Net(4, "none")
    strategy = PipeOptimStrategy(method="pipeoptim-lean", schedule="ZBVZeroBubble",
                                 start_method="spawn")
    trainer(strategy, 2, tmp_path, max_epochs=1).fit(model, loader(8))
    ref, _, _ = reference(4, "ZBVZeroBubble", 8, 8, 1, "none", method="pipeoptim-lean")
    assert_same_weights(model, ref)
    other, _, _ = reference(4, "ZBVZeroBubble", 8, 8, 1, "none")  # pipeoptim differs
    assert any(not torch.equal(a, b) for m, o in zip(ref, other)
               for a, b in zip(m.parameters(), o.parameters()))


@pytest.mark.timeout(300)
def test_v_schedule_checkpoint_and_exact_resume(tmp_path) -> None:
    """``"pipeoptim_zbv"``: ZBVZeroBubble, 4 stages on 2 processes (two stages, two optimizers
    each), a per-update and a per-epoch LR scheduler. One epoch with a checkpoint (full model,
    every stage's optimizer state), then a resume into another module for the second epoch:
    both equal the reference exactly."""
    ckpt_dir = tmp_path / "ckpt"
    model = Net(4, "both")
    t = trainer("pipeoptim_zbv", 2, tmp_path, max_epochs=1, enable_checkpointing=True,
                callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1)])
    assert t.strategy.schedule == "ZBVZeroBubble"
    t.fit(model, loader(8))  # default n_microbatches: 2 x 4 stages = 8, micro-batches of 1
    ref1, _, sim1 = reference(4, "ZBVZeroBubble", 8, 8, 1, "both")
    assert_same_weights(model, ref1)

    (path,) = glob.glob(str(ckpt_dir / "*.ckpt"))
    ckpt = torch.load(path, weights_only=False)
    assert list(ckpt["state_dict"]) == list(Net(4).state_dict())  # the usual keys, all stages
    for k, stage in enumerate(ref1):
        for name, p in stage.state_dict().items():
            assert torch.equal(ckpt["state_dict"][f"stages.{k}.{name}"], p)
    blob = ckpt["optimizer_states"][0][CHECKPOINT_KEY]
    assert blob["schedule"] == "ZBVZeroBubble" and sorted(blob["stages"]) == [0, 1, 2, 3]
    for k, w in enumerate(sim1.workers):  # gathered from both processes
        want = w.optimizer.optimizer.state_dict()
        got = blob["stages"][k]["optimizer"]
        assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
        for pid, st in want["state"].items():
            for key, v in st.items():
                assert torch.equal(got["state"][pid][key], v), (k, pid, key)
        assert blob["stages"][k]["schedulers"][0]["last_epoch"] == 8 * 8  # one per update
        assert blob["stages"][k]["schedulers"][1]["last_epoch"] == 1  # one per epoch
    assert len(ckpt["lr_schedulers"]) == 2

    resumed = Net(4, "both", seed=99)
    t2 = trainer("pipeoptim_zbv", 2, tmp_path, max_epochs=2)
    t2.fit(resumed, loader(8), ckpt_path=path)
    ref2, _, _ = reference(4, "ZBVZeroBubble", 8, 8, 2, "both")
    assert_same_weights(resumed, ref2)


# ---------------------------------------------------------------------------------------------
# Registration and configuration errors (in this process)
# ---------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    names = lightning_plugin.registered_names()
    assert {"pipeoptim", "pipeoptim_spawn", "pipeoptim_popen", "pipeoptim_1f1b",
            "pipeoptim_gpipe", "pipeoptim_zbv", "pipeoptim_dualpipev"} <= set(names)
    for name in names:
        assert name in StrategyRegistry
    s = StrategyRegistry.get("pipeoptim_gpipe")
    assert isinstance(s, PipeOptimStrategy) and s.schedule == "GPipe" and s.method == "pipeoptim"
    t = pl.Trainer(strategy="pipeoptim", accelerator="cpu", devices=2, logger=False)
    assert t.strategy._start_method == "spawn"  # under pytest
    assert t.strategy.timeout.total_seconds() == 120.0


def test_pytorch_lightning_registration() -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.strategies import StrategyRegistry

    assert lightning_plugin.PLPipeOptimStrategy is not None
    assert "pipeoptim" in StrategyRegistry and "pipeoptim_zbv" in StrategyRegistry
    t = pytorch_lightning.Trainer(strategy="pipeoptim_zbv", accelerator="cpu", devices=2,
                                  logger=False)
    assert isinstance(t.strategy, lightning_plugin.PLPipeOptimStrategy)
    assert isinstance(t.strategy, pytorch_lightning.strategies.DDPStrategy)


def _fit_error(model, devices: int = 2, strategy=None, **kw) -> None:
    strategy = strategy or PipeOptimStrategy(start_method="spawn")
    t = pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, **kw)
    t.fit(model, loader(8))  # raises in this process, before any worker starts


def test_devices_must_match_the_stages() -> None:
    with pytest.raises(PipeOptimConfigError, match="needs devices=2.*runs 3 process"):
        _fit_error(Net(2), devices=3)
    with pytest.raises(PipeOptimConfigError, match="exactly 2 stages on each device.*devices=2"):
        _fit_error(Net(4), devices=1, strategy=PipeOptimStrategy("ZBVZeroBubble"))
    with pytest.raises(PipeOptimConfigError, match="odd"):
        _fit_error(Net(3), devices=2, strategy=PipeOptimStrategy("DualPipeV"))
    with pytest.raises(PipeOptimConfigError, match="multiple of the number of devices"):
        _fit_error(Net(5), devices=2, strategy=PipeOptimStrategy("Interleaved1F1B"))
    plan = make_plan("Interleaved1F1B", 6, 2)
    assert plan.stages_per_rank == 3 and plan.local(1) == [1, 3, 5]
    assert plan.n_microbatches == 12 and plan.updates_per_step == 12
    assert make_plan("1F1B", 2, 2, method="gpipe", n_microbatches=4).updates_per_step == 1


class NoStages(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(IN, OUT)

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Unregistered(NoStages):
    def pipeline_stages(self):
        return [nn.Linear(IN, HID), nn.Linear(HID, OUT)]  # not submodules

    def pipeline_loss(self, output, target):
        return F.cross_entropy(output, target)


class NoLoss(NoStages):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(IN, HID), nn.Linear(HID, OUT)])

    def pipeline_stages(self):
        return self.stages


class Tied(NoLoss):
    def __init__(self) -> None:
        super().__init__()
        self.stages[1].weight = self.stages[0].weight

    def pipeline_loss(self, output, target):
        return F.cross_entropy(output, target)


class NoTrainingStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(mlp_stages(IN, HID, OUT, 2))

    def pipeline_stages(self):
        return self.stages

    def pipeline_loss(self, output, target):
        return F.cross_entropy(output, target)


class Manual(Net):
    def __init__(self) -> None:
        super().__init__(2)
        self.automatic_optimization = False


def test_module_contract_errors() -> None:
    with pytest.raises(PipelineContractError, match="must define pipeline_stages"):
        _fit_error(NoStages())
    with pytest.raises(PipelineContractError, match=r"stage\(s\) \[0, 1\].*not submodules"):
        _fit_error(Unregistered())
    with pytest.raises(PipelineContractError, match="must define pipeline_loss"):
        _fit_error(NoLoss())
    with pytest.raises(PipelineContractError, match="tied weights"):
        _fit_error(Tied())
    with pytest.raises(PipelineContractError, match="must define training_step"):
        _fit_error(NoTrainingStep())


def test_unsupported_configurations() -> None:
    with pytest.raises(PipeOptimConfigError, match="accumulate_grad_batches=2 is not supported"):
        _fit_error(Net(2), accumulate_grad_batches=2)
    with pytest.raises(PipeOptimConfigError, match="gradient clipping"):
        _fit_error(Net(2), gradient_clip_val=1.0)
    with pytest.raises(PipeOptimConfigError, match="precision='bf16-mixed' is not supported"):
        _fit_error(Net(2), precision="bf16-mixed")
    with pytest.raises(PipeOptimConfigError, match="manual optimization"):
        _fit_error(Manual())
    with pytest.raises(PipeOptimConfigError, match="sync_batchnorm"):
        _fit_error(Net(2), sync_batchnorm=True)
    with pytest.raises(PipeOptimConfigError, match="schedule"):
        PipeOptimStrategy("NoSuchSchedule")
    with pytest.raises(ValueError, match="method"):
        PipeOptimStrategy(method="adam")
    with pytest.raises(PipeOptimConfigError, match="sequential"):
        PipeOptimStrategy(method="sequential")
    with pytest.raises(PipeOptimConfigError, match="n_microbatches"):
        PipeOptimStrategy(n_microbatches=0)
    with pytest.raises(PipeOptimConfigError, match="start_method"):
        PipeOptimStrategy(start_method="thread")


def test_optimizer_configuration_errors() -> None:
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from predictopt import PredictiveOptimizer

    model = Net(2)
    stages = list(model.stages)
    opt = make_optimizer(model.parameters())
    assert check_optimizer_config([opt], [], stages, model) is opt
    with pytest.raises(PipeOptimConfigError, match="exactly one optimizer.*got 2"):
        check_optimizer_config([opt, make_optimizer(model.parameters())], [], stages, model)
    with pytest.raises(PipeOptimConfigError, match="exactly one optimizer.*got 0"):
        check_optimizer_config([], [], stages, model)
    with pytest.raises(PipeOptimConfigError, match="not a PredictiveOptimizer"):
        check_optimizer_config([PredictiveOptimizer(opt)], [], stages, model)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(PipelineContractError, match="outside pipeline_stages.*extra"):
        check_optimizer_config([make_optimizer(model.parameters())], [], stages, model)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    cfg = LRSchedulerConfig(plateau, interval="step", reduce_on_plateau=True, monitor="val_loss")
    with pytest.raises(PipeOptimConfigError, match="ReduceLROnPlateau with interval='step'"):
        check_optimizer_config([opt], [cfg], stages, model)


def test_rebuilt_optimizer_and_cloned_scheduler_match_direct_construction() -> None:
    model = Net(2)
    s0, s1 = model.stages
    groups = [{"params": list(s0.parameters()), "lr": 0.1},
              {"params": list(s1.parameters()), "weight_decay": 0.0}]
    full = torch.optim.AdamW(groups, lr=0.2, betas=(0.8, 0.9), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.SequentialLR(full, [
        torch.optim.lr_scheduler.LinearLR(full, start_factor=0.1, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(full, T_max=5)], milestones=[3])
    local = rebuild_optimizer(full, list(s1.parameters()))
    assert type(local) is torch.optim.AdamW and len(local.param_groups) == 2
    assert local.param_groups[0]["params"] == [] and \
        local.param_groups[1]["params"] == list(s1.parameters())
    for g, h in zip(full.param_groups, local.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == \
            {k: v for k, v in h.items() if k != "params"}
    clone = clone_scheduler(sched, full, local, keep=[model])
    assert clone.optimizer is local and all(s.optimizer is local for s in clone._schedulers)
    for _ in range(9):
        for o in (full, local):
            o.step()
        sched.step()
        clone.step()
        assert [g["lr"] for g in full.param_groups] == [g["lr"] for g in local.param_groups]
    assert all(not math.isnan(g["lr"]) for g in local.param_groups)


def test_mixin_trains_on_one_device_without_the_strategy() -> None:
    model = Net(3, sched="none")
    x, y = dataset(8).tensors
    ref = x
    for s in model.stages:
        ref = s(ref)
    assert torch.equal(model(x), ref)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
