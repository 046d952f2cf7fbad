"""Tests for lightning_plugin: PipeOptimStrategy under Lightning's Trainer.

Most distributed runs share two processes: one bounded launch (``tests/_dist.py``, gloo, a
60 s process-group timeout, killed at its deadline) in which every rank runs the scenarios
of :func:`scenarios` one after the other, each a plain ``Trainer(...).fit`` (Lightning sees
the processes as externally launched). The tests then compare what each scenario returned
with a reference computed in this process, exactly (``torch.equal``) wherever the math allows:

* :class:`~predictopt.pipeline.PipelineSimulator` for the asynchronous methods (the runtime
  reproduces it bit for bit, so a Lightning run must too);
* a single-device Lightning run for the configurations that are the same math (``gpipe``:
  one update per batch from the mean gradient of its micro-batches, which is what
  ``accumulate_grad_batches`` over batches of one micro-batch computes, bit for bit when the
  number of micro-batches is a power of two).

A 4-process run goes through Lightning's own spawn launcher (``strategy="pipeoptim"``).
Configuration errors are tested in this process: the strategy checks them in the launching
process, before any worker starts.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import traceback
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))

import _dist  # noqa: E402

import lightning_plugin  # noqa: E402
from lightning_plugin import (  # noqa: E402
    CHECKPOINT_KEY,
    PipelineModule,
    PipeOptimConfigError,
    PipeOptimStrategy,
)
from predictopt.data import mlp_stages  # noqa: E402
from predictopt.pipeline import (  # noqa: E402
    DEFAULT_METHOD,
    PREDICTING_METHODS,
    PipelineSimulator,
    get_method,
)
from predictopt.pipeline.transforms import ErrorFeedback  # noqa: E402

IN, HID, OUT = 8, 8, 4
N_DATA = 64
LR = 1e-2


# ---------------------------------------------------------------------------------------------
# Modules, data and references (module level: the spawned processes import them)
# ---------------------------------------------------------------------------------------------


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)


def decay(update: int) -> float:
    return 1.0 / (1.0 + 0.05 * update)


class WarmupCosine:
    """The factor of a linear warm-up then cosine decay to 0 over ``total`` steps."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup) /
                                     max(1, self.total - self.warmup)))


def make_schedulers(opt: torch.optim.Optimizer, kind: str, total: int = 0
                    ) -> list[tuple[Any, str]]:
    """``[(scheduler, interval)]`` of a named configuration (``total``: the updates)."""
    sched = torch.optim.lr_scheduler
    if kind == "step":
        return [(sched.LambdaLR(opt, decay), "step")]
    if kind == "both":
        return [(sched.LambdaLR(opt, decay), "step"),
                (sched.StepLR(opt, step_size=1, gamma=0.5), "epoch")]
    if kind == "cosine":
        return [(sched.LambdaLR(opt, WarmupCosine(total, max(1, total // 8))), "step")]
    if kind in ("onecycle", "onecycle-short"):
        steps = total if kind == "onecycle" else total - 1
        return [(sched.OneCycleLR(opt, max_lr=LR, total_steps=steps), "step")]
    return []


class Net(PipelineModule):
    """A chain of MLP stages with the PipelineModule defaults."""

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
        self.estimated = self.trainer.estimated_stepping_batches
        scheds = make_schedulers(opt, self.sched, int(self.estimated))
        if not scheds:
            return opt
        return [opt], [{"scheduler": s, "interval": i} for s, i in scheds]


class UserNet(pl.LightningModule):
    """Written for one device (its own steps, logs, metric, scheduler, hooks), plus
    ``pipeline_stages()``."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassF1Score

        self.body, self.head = mlp_stages(IN, HID, OUT, 2, seed=1)
        self.val_f1 = MulticlassF1Score(num_classes=OUT, average="macro")
        self.hooks: Counter[str] = Counter()

    def forward(self, x):
        return self.head(self.body(x))

    def pipeline_stages(self):
        return [self.body, self.head]

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.val_f1.update(logits.argmax(-1), y)
        self.log("val/f1_macro", self.val_f1)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch[0]), -1)

    def on_before_backward(self, loss):
        self.hooks["on_before_backward"] += 1

    def on_after_backward(self):
        self.hooks["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer):
        self.hooks["on_before_optimizer_step"] += 1
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.log("grad/norm", torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters())
        self.estimated = self.trainer.estimated_stepping_batches
        (sched, _), = make_schedulers(opt, "cosine", int(self.estimated))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ConfiguredNet(Net):
    """Builds its stages in configure_model."""

    def __init__(self, sched: str = "onecycle") -> None:
        super().__init__(2, sched)
        self.stages = None

    def configure_model(self) -> None:
        if self.stages is None:
            self.stages = nn.ModuleList(mlp_stages(IN, HID, OUT, 2, seed=1))


class VectorLoss(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


class FailingValidation(Net):
    def validation_step(self, batch, batch_idx):
        raise ValueError("a mistake in validation_step")


def dataset(n: int = N_DATA, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, IN, generator=gen),
                         torch.randint(0, OUT, (n,), generator=gen))


def train_loader(batch: int) -> DataLoader:
    """The order Lightning gives a distributed run: one replica, shuffled with seed 0."""
    ds = dataset()
    return DataLoader(ds, batch_size=batch,
                      sampler=DistributedSampler(ds, num_replicas=1, rank=0, seed=0))


def val_loader() -> DataLoader:
    return DataLoader(dataset(28, seed=5), batch_size=12)  # batches of 12, 12, 4


def clip_stage(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Per-stage gradient clipping, as the strategy does for the asynchronous methods."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, value)


def simulate(*, num_stages: int = 2, schedule: str = "1F1B", n: int = 4, batch: int = 8,
             epochs: int = 1, method: str = DEFAULT_METHOD, sched: str = "none",
             update_every: int | None = None, clip: float | None = None
             ) -> tuple[list[nn.Module], list[float], PipelineSimulator]:
    """The same training in one process: stage modules, per-batch mean losses, simulator."""
    torch.set_num_threads(1)
    modules = mlp_stages(IN, HID, OUT, num_stages, seed=1)
    sim = PipelineSimulator(modules, make_optimizer, method=method, schedule=schedule,
                            n_microbatches=n, loss_fn=F.cross_entropy, update_every=update_every)
    updates = epochs * (N_DATA // batch) * (n // sim.update_every)
    epoch_scheds = []
    for w in sim.workers:
        inner = w.optimizer.optimizer
        if clip:
            inner.register_step_pre_hook(lambda o, *_: clip_stage(o, clip))
        made = make_schedulers(inner, sched, updates)
        per_update = [s for s, i in made if i == "step"]
        epoch_scheds += [s for s, i in made if i == "epoch"]
        for s in per_update:  # after the update, once the method restored any lr it scaled
            w.after_update.append(lambda _w, s=s: s.step())
        if len(per_update) == 1 and method in PREDICTING_METHODS:
            w.optimizer.attach_scheduler(per_update[0])  # the strategy's schedule-aware default
    return modules, run_epochs(sim, range(epochs), batch, epoch_scheds), sim


def run_epochs(sim: Any, epochs: Any, batch: int, epoch_scheds: list[Any]) -> list[float]:
    """Feed ``sim`` the batches Lightning's training sampler gives in each of ``epochs`` (the
    mean micro-batch loss of every batch), stepping the per-epoch schedulers after each."""
    ds = dataset()
    losses: list[float] = []
    for epoch in epochs:
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, seed=0)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        for b in range(len(idx) // batch):
            x, y = ds[idx[b * batch:(b + 1) * batch]]
            losses.append(float(torch.tensor(sim.step(x, y)).mean()))
        for s in epoch_scheds:
            s.step()
    return losses


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor] | list[nn.Module]) -> None:
    if want and isinstance(want[0], nn.Module):
        want = [p.detach() for m in want for p in m.parameters()]
    assert len(got) == len(want)
    for i, (p, q) in enumerate(zip(got, want)):
        assert torch.equal(p, q), f"parameter {i}: max diff {(p - q).abs().max().item():.3g}"


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def trainer(strategy: Any, tmp: str, devices: int = 2, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("max_epochs", 1)
    kw.setdefault("num_sanity_val_steps", 0)
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp, **kw)


def pipe(**kw: Any) -> PipeOptimStrategy:
    """The strategy in an externally launched process (the scenario harness)."""
    return PipeOptimStrategy(start_method="popen", **kw)


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The scenarios (every rank of one 2-process launch runs all of them)
# ---------------------------------------------------------------------------------------------


def run_user(rank: int, tmp: str) -> dict[str, Any]:
    model = UserNet()
    ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, "user"), monitor="val/f1_macro",
                           mode="max")
    logger = CSVLogger(tmp, name="user", version=0)
    t = trainer(pipe(), tmp, max_epochs=2, logger=logger, log_every_n_steps=1,
                enable_checkpointing=True, callbacks=[ckpt, LearningRateMonitor("step")])
    t.fit(model, train_loader(8), val_loader())
    sched = t.lr_scheduler_configs[0].scheduler
    out = {"callback": floats(t.callback_metrics), "estimated": model.estimated,
           "last_epoch": sched.last_epoch, "lr": t.optimizers[0].param_groups[0]["lr"],
           "hooks": dict(model.hooks), "best": float(ckpt.best_model_score),
           "best_path": ckpt.best_model_path, "weights": weights(model),
           "log_dir": logger.log_dir}
    out["decisions"] = [t.strategy.reduce_boolean_decision(True),
                        t.strategy.reduce_boolean_decision(rank == 0),
                        t.strategy.reduce_boolean_decision(rank == 0, all=False)]
    out["test"] = t.test(model, val_loader(), verbose=False)
    out["predict"] = torch.cat(t.predict(model, val_loader()))
    return out


def run_onecycle(rank: int, tmp: str) -> dict[str, Any]:
    model = ConfiguredNet("onecycle")
    t = trainer(pipe(), tmp)
    t.fit(model, train_loader(8))
    out = {"weights": weights(model), "estimated": model.estimated,
           "last_epoch": t.lr_scheduler_configs[0].scheduler.last_epoch}
    try:
        trainer(pipe(), tmp).fit(Net(2, "onecycle-short"), train_loader(8))
        out["short"] = "no error"
    except PipeOptimConfigError as e:
        out["short"] = str(e)
    return out


def run_exact(rank: int, tmp: str) -> dict[str, Any]:
    out = {}
    model = Net(2, "none")
    trainer(pipe(schedule="GPipe", method="gpipe", n_microbatches=1), tmp,
            precision="bf16-mixed", gradient_clip_val=0.05).fit(model, train_loader(8))
    out["bf16"] = weights(model)
    model = Net(2, "step")
    trainer(pipe(method="gpipe"), tmp, plugins=[MixedPrecision("16-mixed", "cpu")],
            gradient_clip_val=0.05).fit(model, train_loader(8))
    out["fp16"] = weights(model)
    model = Net(2, "none")
    trainer(pipe(), tmp, gradient_clip_val=0.05).fit(model, train_loader(8))
    out["stage_clip"] = weights(model)
    model = Net(2, "step")
    trainer(pipe(method="xpipe"), tmp, accumulate_grad_batches=2).fit(model, train_loader(8))
    out["accumulate"], out["accumulate_estimated"] = weights(model), model.estimated
    for key, kw in (("method_value", {}), ("method_every", {"calibration_every": 3})):
        model = Net(2, "none")  # a Method value, not a name
        trainer(pipe(method=get_method(DEFAULT_METHOD).with_(name=key, **kw)), tmp).fit(
            model, train_loader(8))
        out[key] = weights(model)
    return out


def run_checkpoints(rank: int, tmp: str) -> dict[str, Any]:
    """gpipe over 2 micro-batches: the same math as one device accumulating 2 batches."""
    out = {}
    model = Net(2, "step", seed=99)
    trainer(pipe(schedule="GPipe", method="gpipe", n_microbatches=2), tmp, max_epochs=2).fit(
        model, train_loader(8), ckpt_path=os.path.join(tmp, "single.ckpt"))
    out["from_single"] = weights(model)
    ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, "pipe"))
    model = Net(2, "step")
    trainer(pipe(schedule="GPipe", method="gpipe", n_microbatches=2), tmp,
            enable_checkpointing=True, callbacks=[ckpt]).fit(model, train_loader(8))
    out["path"] = ckpt.best_model_path
    model = Net(2, "step", seed=99)
    trainer(pipe(schedule="1F1B", method="gpipe", n_microbatches=2), tmp, max_epochs=2).fit(
        model, train_loader(8), ckpt_path=out["path"])
    out["other_schedule"] = weights(model)
    return out


def run_resume(rank: int, tmp: str) -> dict[str, Any]:
    """Per-stage state a single device has not: pipedream-2bw's previous weights, error
    feedback's estimate (a transform's state); two stages and optimizers per process under a V
    schedule."""
    out = {}
    for name, kw, num_stages, sched in (
            ("2bw", {"method": "pipedream-2bw"}, 2, "none"),
            ("ef", {"method": "error-feedback"}, 2, "none"),
            ("zbv", {"schedule": "ZBVZeroBubble"}, 4, "both")):
        ckpt = ModelCheckpoint(dirpath=os.path.join(tmp, name))
        trainer(pipe(**kw), tmp, enable_checkpointing=True, callbacks=[ckpt]).fit(
            Net(num_stages, sched), train_loader(8))
        model = Net(num_stages, sched, seed=99)
        trainer(pipe(**kw), tmp, max_epochs=2).fit(model, train_loader(8),
                                                  ckpt_path=ckpt.best_model_path)
        out[name] = {"path": ckpt.best_model_path, "weights": weights(model)}
    model = Net(4, "none")
    trainer(pipe(schedule="ZBVZeroBubble", method="pipeoptim-lean"), tmp).fit(
        model, train_loader(8))
    out["lean"] = weights(model)
    return out


def run_errors(rank: int, tmp: str) -> dict[str, Any]:
    out = {}
    for name, model in (("vector_loss", VectorLoss()), ("validation", FailingValidation())):
        try:
            trainer(pipe(), tmp).fit(model, train_loader(8), val_loader())
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is the result
            out[name] = f"{type(e).__name__}: {e}"
    return out


def run_pytorch_lightning(rank: int, tmp: str) -> dict[str, Any]:
    import pytorch_lightning

    class PLNet(lightning_plugin.PipelineMixin, pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(mlp_stages(IN, HID, OUT, 2, seed=1))

        def pipeline_stages(self):
            return self.stages

        def pipeline_loss(self, output, target):
            return F.cross_entropy(output, target)

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    model = PLNet()
    t = pytorch_lightning.Trainer(
        strategy=lightning_plugin.PLPipeOptimStrategy(start_method="popen"), accelerator="cpu",
        devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    t.fit(model, train_loader(8))
    return {"weights": weights(model), "callback": floats(t.callback_metrics)}


SCENARIOS = {"user": run_user, "onecycle": run_onecycle, "exact": run_exact,
             "checkpoints": run_checkpoints, "resume": run_resume,
             "pytorch_lightning": run_pytorch_lightning, "errors": run_errors}


def scenarios(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Every scenario on this rank; a failing one is reported, the others still run."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    import warnings

    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    only = os.environ.get("PIPEOPTIM_SCENARIOS")
    for name, fn in SCENARIOS.items():
        if only and name not in only.split(","):
            continue
        try:
            results[name] = {"ok": True, "value": fn(rank, tmp)}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    return results


# ---------------------------------------------------------------------------------------------
# Single-device references (this process)
# ---------------------------------------------------------------------------------------------


def single_device(model: nn.Module, tmp: str, batch: int, ckpt_path: str | None = None,
                  **kw: Any) -> pl.Trainer:
    t = trainer("auto", tmp, devices=1, **kw)
    t.fit(model, train_loader(batch), ckpt_path=ckpt_path)
    return t


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("pipeline"))
    torch.manual_seed(0)
    # the checkpoint a pipeline resumes from: one device, 2 batches of 4 per step
    t = trainer("auto", tmp, devices=1, accumulate_grad_batches=2)
    t.fit(Net(2, "step"), train_loader(4))
    t.save_checkpoint(os.path.join(tmp, "single.ckpt"))
    per_rank = _dist.launch(scenarios, 2, tmp, timeout=480, pg_timeout=60)
    for r, res in enumerate(per_rank):
        assert res["ok"], f"rank {r}: {res['error']}"
    missing = {"ok": False, "error": "not run (PIPEOPTIM_SCENARIOS)"}
    return tmp, {name: [res["value"].get(name, missing) for res in per_rank]
                 for name in SCENARIOS}


def ok(runs: tuple[str, dict[str, Any]], name: str) -> list[Any]:
    values = runs[1][name]
    for r, v in enumerate(values):
        assert v["ok"], f"scenario {name}, rank {r}:\n{v['error']}"
    return [v["value"] for v in values]


# ---------------------------------------------------------------------------------------------
# Point 1: the module's own steps, logs, callbacks and hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_user_steps_logs_callbacks_and_hooks(runs) -> None:
    """A module written for one device: its training_step's loss is the pipeline's (the
    weights equal the simulator's), what its steps log reaches callback_metrics on both ranks,
    a torchmetrics F1 drives ModelCheckpoint, predict returns what predict_step returns, and
    the backward / optimizer hooks fire on the rank of the stage they concern."""
    r0, r1 = ok(runs, "user")
    ref, ref_losses, sim = simulate(epochs=2, sched="cosine")
    assert_same(r0["weights"], ref)
    assert_same(r1["weights"], ref)
    assert r0["callback"] == r1["callback"]
    assert {"train/loss", "train/acc", "val/loss", "val/f1_macro", "grad/norm"} <= \
        set(r0["callback"])
    assert r0["callback"]["train/loss"] == ref_losses[-1]
    rows = read_csv(os.path.join(r0["log_dir"], "metrics.csv"))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert train == ref_losses  # the mean of the micro-batch losses of every batch

    from torchmetrics.functional.classification import multiclass_f1_score

    vx, vy = val_loader().dataset.tensors
    f1 = float(multiclass_f1_score(sim.evaluate(vx).argmax(-1), vy, num_classes=OUT,
                                   average="macro"))
    assert r0["callback"]["val/f1_macro"] == pytest.approx(f1, abs=1e-6)
    f1s = [float(r["val/f1_macro"]) for r in rows if r.get("val/f1_macro")]
    assert len(f1s) == 2 and r0["best"] == max(f1s) and os.path.exists(r0["best_path"])
    for r in (r0, r1):  # ModelCheckpoint / EarlyStopping agree across ranks
        assert r["decisions"] == [True, False, True]
    assert list(torch.load(r0["best_path"], weights_only=False)["state_dict"]) == \
        list(UserNet().state_dict())

    want = torch.cat([torch.softmax(sim.evaluate(vx[i:i + 12]), -1) for i in range(0, 28, 12)])
    assert torch.equal(r0["predict"], want) and torch.equal(r1["predict"], want)
    acc = float((sim.evaluate(vx).argmax(-1) == vy).float().mean())
    assert r0["test"][0]["test/acc"] == pytest.approx(acc, abs=1e-6) == r1["test"][0]["test/acc"]

    updates = 2 * (N_DATA // 8) * 4  # epochs x batches x micro-batches (one update each)
    assert r1["hooks"]["on_before_backward"] == updates  # rank 1 holds the last stage
    assert "on_before_backward" not in r0["hooks"]
    for r in (r0, r1):  # one stage per rank, one update per micro-batch
        assert r["hooks"]["on_after_backward"] == r["hooks"]["on_before_optimizer_step"] == \
            updates


# ---------------------------------------------------------------------------------------------
# Point 2: schedulers
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_schedulers_sized_by_estimated_stepping_batches(runs) -> None:
    """estimated_stepping_batches counts optimizer updates, interval='step' schedulers step
    once per update: a warm-up + cosine LambdaLR and the textbook OneCycleLR span training
    exactly; a OneCycleLR one step short fails before training, on both ranks."""
    r0, _ = ok(runs, "user")
    updates = 2 * (N_DATA // 8) * 4
    assert r0["estimated"] == r0["last_epoch"] == updates
    assert r0["lr"] == pytest.approx(LR * WarmupCosine(updates, updates // 8)(updates), abs=0)
    rows = read_csv(os.path.join(r0["log_dir"], "metrics.csv"))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    sched = WarmupCosine(updates, updates // 8)
    assert lrs == [LR * sched(4 * j) for j in range(len(lrs))] and len(lrs) == 16

    c0, c1 = ok(runs, "onecycle")
    ref, _, _ = simulate(sched="onecycle")  # stages built in configure_model
    assert_same(c0["weights"], ref)
    assert c0["estimated"] == c0["last_epoch"] == 32
    for c in (c0, c1):
        assert "OneCycleLR(total_steps=31)" in c["short"] and "estimated_stepping_batches" \
            in c["short"], c["short"]


# ---------------------------------------------------------------------------------------------
# Point 3: clipping, precision, accumulation, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_precision_clipping_and_accumulation_match_one_device(runs, tmp_path) -> None:
    """gpipe with global-norm clipping equals one device bit for bit, under bf16-mixed and
    under 16-mixed with its loss scaling; an asynchronous method clips each stage by its own
    norm (as the simulator with per-stage clipping); accumulate_grad_batches is update_every."""
    r0, r1 = ok(runs, "exact")
    tmp = str(tmp_path)
    one = Net(2, "none")
    single_device(one, tmp, 8, precision="bf16-mixed", gradient_clip_val=0.05)
    assert_same(r0["bf16"], weights(one))
    assert_same(r1["bf16"], weights(one))
    one = Net(2, "step")
    single_device(one, tmp, 2, plugins=[MixedPrecision("16-mixed", "cpu")],
                  gradient_clip_val=0.05, accumulate_grad_batches=4)
    assert_same(r0["fp16"], weights(one))
    ref, _, _ = simulate(clip=0.05)
    assert_same(r0["stage_clip"], ref)
    unclipped, _, _ = simulate()
    assert not torch.equal(r0["stage_clip"][0], next(unclipped[0].parameters()).detach())
    ref, _, _ = simulate(method="xpipe", update_every=2, sched="step")
    assert_same(r0["accumulate"], ref)
    assert r0["accumulate_estimated"] == (N_DATA // 8) * 2
    # a Method value: the registered default's copy trains as the default does, and its
    # calibration_every reaches the stages (the simulator with the same value)
    assert_same(r0["method_value"], unclipped)
    every = get_method(DEFAULT_METHOD).with_(name="method_every", calibration_every=3)
    ref, _, _ = simulate(method=every)
    assert_same(r0["method_every"], ref)
    assert not torch.equal(r0["method_every"][0], next(unclipped[0].parameters()).detach())


@pytest.mark.timeout(600)
def test_mistakes_raise_on_every_rank(runs) -> None:
    """A non-scalar loss is caught before the first pipeline step, a failing validation_step
    on the last stage's rank is raised on both ranks: nobody waits for a peer."""
    e0, e1 = ok(runs, "errors")
    for e in (e0, e1):
        assert e["vector_loss"].startswith("PipelineContractError") and "scalar" in \
            e["vector_loss"] and "[2]" in e["vector_loss"], e["vector_loss"]
        assert e["validation"] == "ValueError: a mistake in validation_step"


# ---------------------------------------------------------------------------------------------
# Point 4: checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_checkpoints_move_between_one_device_schedules_and_methods(runs, tmp_path) -> None:
    """The optimizer state is saved as on one device: a single-device checkpoint resumes in the
    pipeline, a pipeline checkpoint resumes on one device and under another schedule, and all
    three equal the uninterrupted single-device run."""
    tmp, _ = runs
    c0, c1 = ok(runs, "checkpoints")
    ref = Net(2, "step")
    single_device(ref, str(tmp_path), 4, max_epochs=2, accumulate_grad_batches=2)
    for c in (c0, c1):
        assert_same(c["from_single"], weights(ref))
        assert_same(c["other_schedule"], weights(ref))
    resumed = Net(2, "step", seed=99)
    single_device(resumed, str(tmp_path), 4, max_epochs=2, accumulate_grad_batches=2,
                  ckpt_path=c0["path"])
    assert_same(weights(resumed), weights(ref))

    mine = torch.load(c0["path"], weights_only=False)
    single = torch.load(os.path.join(tmp, "single.ckpt"), weights_only=False)
    a, b = mine["optimizer_states"][0], single["optimizer_states"][0]
    assert a["param_groups"] == b["param_groups"] and sorted(a["state"]) == sorted(b["state"])
    for i, st in b["state"].items():
        for key, v in st.items():
            assert torch.equal(a["state"][i][key], v), (i, key)
    assert mine["lr_schedulers"] == single["lr_schedulers"]
    assert mine[CHECKPOINT_KEY]["method"] == "gpipe" and CHECKPOINT_KEY not in single


@pytest.mark.timeout(600)
def test_exact_resume_with_pipeline_state(runs) -> None:
    """pipedream-2bw resumes with its previous weights, error-feedback with its estimate, ZBV
    with two stages, two optimizers and a per-update and a per-epoch scheduler per process: all
    equal the uninterrupted run; so does pipeoptim-lean."""
    r0, r1 = ok(runs, "resume")
    ref, _, _ = simulate(epochs=2, method="pipedream-2bw")
    assert_same(r0["2bw"]["weights"], ref)
    blob = torch.load(r0["2bw"]["path"], weights_only=False)[CHECKPOINT_KEY]
    assert blob["method"] == "pipedream-2bw" and sorted(blob["previous"]) == list(range(4))
    ref, _, _ = simulate(epochs=2, method="error-feedback")
    assert_same(r0["ef"]["weights"], ref)
    blob = torch.load(r0["ef"]["path"], weights_only=False)[CHECKPOINT_KEY]
    # stage 0 (delay 1) keeps the estimate of its 2 tensors; the last stage has no delay
    assert sorted(blob["transforms"]) == [0, 1]
    assert all(ErrorFeedback.AVERAGE in st for st in blob["transforms"].values())
    ref, _, _ = simulate(num_stages=4, schedule="ZBVZeroBubble", n=8, epochs=2, sched="both")
    assert_same(r0["zbv"]["weights"], ref)
    assert_same(r1["zbv"]["weights"], ref)
    ckpt = torch.load(r0["zbv"]["path"], weights_only=False)
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [8 * 8, 1]
    # the default calibrates its prediction: each stage's record (its own horizons) is kept
    # per stage, not in the single-device optimizer state
    from predictopt.optimizer import CALIBRATION_KEY

    own = ckpt[CHECKPOINT_KEY]["stage_groups"]
    assert sorted(own) == [0, 1, 2, 3]
    records = [[g.get(CALIBRATION_KEY) for g in own[k]] for k in range(4)]
    assert records[0][0] and records[0][0]["fit"] and records[0] != records[1]
    assert all(CALIBRATION_KEY not in g for g in ckpt["optimizer_states"][0]["param_groups"])
    ref, _, _ = simulate(num_stages=4, schedule="ZBVZeroBubble", n=8, method="pipeoptim-lean")
    assert_same(r0["lean"], ref)
    other, _, _ = simulate(num_stages=4, schedule="ZBVZeroBubble", n=8)
    assert not all(torch.equal(p, q.detach()) for p, q in
                   zip(r0["lean"], (q for m in other for q in m.parameters())))


@pytest.mark.timeout(600)
def test_pytorch_lightning_package(runs) -> None:
    r0, r1 = ok(runs, "pytorch_lightning")
    ref, losses, _ = simulate()
    assert_same(r0["weights"], ref)
    assert r0["callback"] == r1["callback"] == {"train_loss": losses[-1]}


# ---------------------------------------------------------------------------------------------
# Lightning's own spawn launcher, 4 processes (inner stages)
# ---------------------------------------------------------------------------------------------


class RankMetrics(Callback):
    """Writes every rank's callback metrics at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(floats(trainer.callback_metrics),
                   os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.mark.timeout(300)
def test_string_form_four_processes(tmp_path) -> None:
    """``strategy="pipeoptim"`` on 4 spawned processes: exact weights, the same logged values
    on every rank, the trained model back in this process."""
    model = Net(4, "step")
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    t = trainer("pipeoptim", str(tmp_path), devices=4, logger=logger, log_every_n_steps=1,
                callbacks=[RankMetrics(str(tmp_path))])
    assert isinstance(t.strategy, PipeOptimStrategy) and t.strategy.schedule == "1F1B"
    t.fit(model, train_loader(16), val_loader())
    ref, ref_losses, sim = simulate(num_stages=4, n=8, batch=16, sched="step")
    assert_same(weights(model), ref)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert all(m == per_rank[0] for m in per_rank)
    assert {"train_loss", "val_loss", "val_acc"} <= set(per_rank[0])
    rows = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    assert [float(r["train_loss"]) for r in rows if r.get("train_loss")] == ref_losses
    (val,) = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    vx, vy = val_loader().dataset.tensors
    want = sum(float(F.cross_entropy(sim.evaluate(vx[i:i + 12]), vy[i:i + 12])) *
               len(vy[i:i + 12]) for i in range(0, 28, 12)) / 28
    assert val == pytest.approx(want, rel=1e-6)
    assert "val_loss" in t.callback_metrics
