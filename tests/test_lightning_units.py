"""In-process tests of lightning_plugin: registration, early configuration errors, and the
pieces the strategy is made of (no worker process is started here)."""

from __future__ import annotations

import math
import os
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from test_lightning import IN, OUT, Net, VectorLoss, dataset, train_loader  # noqa: E402

import lightning_plugin  # noqa: E402
from lightning_plugin import (  # noqa: E402
    PipelineContractError,
    PipelineModule,
    PipeOptimConfigError,
    PipeOptimStrategy,
)
from lightning_plugin._compat import (  # noqa: E402
    count_updates,
    make_api,
    pipeline_methods,
    process_group_timeout,
    schedule_facts,
    trainer_of,
    uncount_updates,
    uses_sync_batchnorm,
)
from lightning_plugin.checkpoint import assemble, param_index, stage_part, stage_state  # noqa
from lightning_plugin.optim import (  # noqa: E402
    check_optimizer_config,
    check_scheduler_horizons,
    clone_scheduler,
    rebuild_optimizer,
    track_steps,
)
from lightning_plugin.plan import make_plan  # noqa: E402
from lightning_plugin.updates import next_scaler_state  # noqa: E402
from lightning_plugin.user_steps import (  # noqa: E402
    LogEntry,
    capture_logs,
    check_training_step,
    extract_loss,
    merge_step_logs,
    redirect_forward,
)
from predictopt.data import mlp_stages  # noqa: E402
from predictopt.pipeline import DEFAULT_METHOD, get_method  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Registration and the private-API surface
# ---------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    names = lightning_plugin.registered_names()
    assert {"pipeoptim", "pipeoptim_spawn", "pipeoptim_popen", "pipeoptim_1f1b",
            "pipeoptim_gpipe", "pipeoptim_zbv", "pipeoptim_dualpipev"} <= set(names)
    for name in names:
        assert name in StrategyRegistry
    s = StrategyRegistry.get("pipeoptim_gpipe")
    assert isinstance(s, PipeOptimStrategy) and s.schedule == "GPipe" and s.method == DEFAULT_METHOD
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


def test_compat_surface() -> None:
    """The private Lightning names and the Trainer property the strategy relies on exist, and
    the predictopt facts are read through its public API."""
    for package in ("lightning.pytorch", "pytorch_lightning"):
        api = make_api(package)
        for name in ("TrainerFn", "LightningModule", "is_overridden", "Precision",
                     "MixedPrecision", "init_optimizers", "MockOptimizer", "SpawnLauncher",
                     "ScriptLauncher"):
            assert getattr(api, name) is not None, (package, name)
    assert isinstance(pl.Trainer.estimated_stepping_batches, property)
    from lightning.pytorch.strategies import DDPStrategy

    assert callable(DDPStrategy._configure_launcher)
    strategy = PipeOptimStrategy(timeout=7)
    assert process_group_timeout(strategy).total_seconds() == 7
    assert not uses_sync_batchnorm(strategy) and trainer_of(Net()) is None
    t = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False,
                   sync_batchnorm=True)
    assert uses_sync_batchnorm(t.strategy)
    assert t.strategy.launcher._pipeoptim_strategy is t.strategy  # installed by us

    t = pl.Trainer(strategy=PipeOptimStrategy(), accelerator="cpu", devices=2, logger=False,
                   max_epochs=-1, max_steps=10)
    t.strategy._plan = make_plan("1F1B", 2, 2)  # 4 micro-batches, one update each
    count_updates(t)
    assert isinstance(t, pl.Trainer) and t.estimated_stepping_batches == 40
    uncount_updates(t)
    assert type(t) is pl.Trainer and t.estimated_stepping_batches == 10

    from predictopt.pipeline import PIPELINE_METHODS, SUPPORTED_SCHEDULES, get_method

    assert set(pipeline_methods()) == set(PIPELINE_METHODS)
    assert not any(get_method(m).staleness_free for m in pipeline_methods())
    facts = {s: schedule_facts(s.lower()) for s in SUPPORTED_SCHEDULES}
    assert facts["1F1B"].name == "1F1B" and not facts["1F1B"].multi_stage
    assert facts["ZBVZeroBubble"].v_placement and facts["DualPipeV"].v_placement
    assert facts["Interleaved1F1B"].multi_stage and not facts["Interleaved1F1B"].v_placement
    from lightning_plugin._compat import bitpipe_copy_update_every

    assert schedule_facts("bitpipe").bitpipe and not facts["ZBVZeroBubble"].bitpipe
    assert bitpipe_copy_update_every("pipeoptim", 4, 8, None) == 1  # BitPipe's private helpers
    assert bitpipe_copy_update_every("gpipe", 4, 8, None) == 4


# ---------------------------------------------------------------------------------------------
# Errors before any worker starts
# ---------------------------------------------------------------------------------------------


def _fit_error(model, devices: int = 2, strategy=None, **kw) -> None:
    strategy = strategy or PipeOptimStrategy(start_method="spawn")
    t = pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, **kw)
    t.fit(model, train_loader(8))  # raises in this process, before any worker starts


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
        return [nn.Linear(IN, 8), nn.Linear(8, OUT)]  # not submodules


class Tied(NoStages):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(IN, IN), nn.Linear(IN, IN)])
        self.stages[1].weight = self.stages[0].weight

    def pipeline_stages(self):
        return self.stages


class NoTrainingStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(mlp_stages(IN, 8, OUT, 2))

    def pipeline_stages(self):
        return self.stages


class Manual(Net):
    def __init__(self) -> None:
        super().__init__(2)
        self.automatic_optimization = False


class OwnOptimizerStep(Net):
    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)


def test_module_contract_errors() -> None:
    with pytest.raises(PipelineContractError, match="must define pipeline_stages"):
        _fit_error(NoStages())
    with pytest.raises(PipelineContractError,
                       match=r"stage\(s\) \[0, 1\].*not the LightningModule's"):
        _fit_error(Unregistered())
    from lightning_plugin.contract import pipeline_stages_of

    wrapped = NoStages()
    wrapped.pipeline_stages = lambda: [nn.Sequential(wrapped.layer), nn.Identity()]
    assert len(pipeline_stages_of(wrapped)) == 2  # containers of registered layers are fine
    with pytest.raises(PipelineContractError, match="tied weights"):
        _fit_error(Tied())
    with pytest.raises(PipelineContractError, match="must define training_step"):
        _fit_error(NoTrainingStep())


def test_unsupported_configurations() -> None:
    with pytest.raises(PipeOptimConfigError,
                       match="accumulate_grad_batches=2 on 2 device.*update_every must be 1"):
        _fit_error(Net(2), accumulate_grad_batches=2)
    with pytest.raises(PipeOptimConfigError, match="accumulate_grad_batches=3 must divide"):
        _fit_error(Net(2), strategy=PipeOptimStrategy(method="xpipe"), accumulate_grad_batches=3)
    with pytest.raises(PipeOptimConfigError, match="precision='64-true'.*32-true, bf16-mixed"):
        _fit_error(Net(2), precision="64-true")
    with pytest.raises(PipeOptimConfigError, match="manual optimization"):
        _fit_error(Manual())
    with pytest.raises(PipeOptimConfigError, match="overrides optimizer_step"):
        _fit_error(OwnOptimizerStep())
    with pytest.raises(PipeOptimConfigError, match="sync_batchnorm"):
        _fit_error(Net(2), sync_batchnorm=True)
    with pytest.raises(PipeOptimConfigError, match="clip_scope='global' needs"):
        _fit_error(Net(2), strategy=PipeOptimStrategy(clip_scope="global"),
                   gradient_clip_val=1.0)
    with pytest.raises(PipeOptimConfigError, match=r"Number of microbatches \(1\)"):
        _fit_error(Net(2), strategy=PipeOptimStrategy(n_microbatches=1))
    with pytest.raises(PipeOptimConfigError, match="schedule must be one of"):
        PipeOptimStrategy("NoSuchSchedule")
    accepted = ", ".join(pipeline_methods())
    with pytest.raises(PipeOptimConfigError,
                       match=f"method must be one of {accepted} or a predictopt.pipeline.Method; "
                             f"got 'adam'"):
        PipeOptimStrategy(method="adam")
    with pytest.raises(PipeOptimConfigError, match="got 'sequential'"):
        PipeOptimStrategy(method="sequential")
    with pytest.raises(PipeOptimConfigError, match="'sequential-qh-dl' is staleness-free"):
        PipeOptimStrategy(method=get_method("sequential-qh-dl"))
    mine = get_method("pipeoptim").with_(name="mine", calibrate=True)
    assert PipeOptimStrategy(method=mine).method is mine  # a Method value, kept as it is
    with pytest.raises(PipeOptimConfigError, match="n_microbatches"):
        PipeOptimStrategy(n_microbatches=0)
    with pytest.raises(PipeOptimConfigError, match="start_method"):
        PipeOptimStrategy(start_method="thread")
    with pytest.raises(PipeOptimConfigError, match="clip_scope must be one of auto, global"):
        PipeOptimStrategy(clip_scope="local")


def test_optimizer_configuration_errors() -> None:
    from lightning.pytorch.utilities.types import LRSchedulerConfig

    from predictopt import PredictiveOptimizer

    model = Net(2)
    stages = list(model.stages)
    opt = torch.optim.AdamW(model.parameters())
    assert check_optimizer_config([opt], [], stages, model) is opt
    with pytest.raises(PipeOptimConfigError, match="exactly one optimizer.*got 2"):
        check_optimizer_config([opt, torch.optim.AdamW(model.parameters())], [], stages, model)
    with pytest.raises(PipeOptimConfigError, match="not a PredictiveOptimizer"):
        check_optimizer_config([PredictiveOptimizer(opt)], [], stages, model)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(PipelineContractError, match="outside pipeline_stages.*extra"):
        check_optimizer_config([torch.optim.AdamW(model.parameters())], [], stages, model)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    cfg = LRSchedulerConfig(plateau, interval="step", reduce_on_plateau=True, monitor="val_loss")
    with pytest.raises(PipeOptimConfigError, match="ReduceLROnPlateau with interval='step'"):
        check_optimizer_config([opt], [cfg], stages, model)


# ---------------------------------------------------------------------------------------------
# Optimizers, schedulers, checkpoints, loss scaling
# ---------------------------------------------------------------------------------------------


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
    clone = clone_scheduler(sched, full, local, keep=[model])
    track_steps(local)
    assert clone.optimizer is local and all(s.optimizer is local for s in clone._schedulers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(9):
            for o in (full, local):
                o.step()
            sched.step()
            clone.step()
            assert [g["lr"] for g in full.param_groups] == [g["lr"] for g in local.param_groups]


def test_scheduler_horizons() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    short = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=63)
    with pytest.raises(PipeOptimConfigError, match=r"OneCycleLR\(total_steps=63\).*64 more"):
        check_scheduler_horizons([(short, "step", 1)], remaining_updates=64,
                                 remaining_epochs=1, total_updates=64)
    assert check_scheduler_horizons([(short, "step", 1)], remaining_updates=63,
                                    remaining_epochs=1, total_updates=63) == []
    assert check_scheduler_horizons([(short, "step", 2)], remaining_updates=126,
                                    remaining_epochs=1, total_updates=126) == []
    quarter = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 16))
    lr = opt.param_groups[0]["lr"]
    (note,) = check_scheduler_horizons([(quarter, "step", 1)], remaining_updates=64,
                                       remaining_epochs=1, total_updates=64)
    assert "every learning rate to 0 from optimizer update 17 of the 64" in note
    assert check_scheduler_horizons([(quarter, "step", 1)], remaining_updates=16,
                                    remaining_epochs=1, total_updates=16) == []
    assert opt.param_groups[0]["lr"] == lr and quarter.last_epoch == 0  # untouched


def test_checkpoint_is_the_single_device_optimizer_state() -> None:
    """Two stage optimizers, renumbered, give exactly the state of one optimizer over both
    stages, and cut back into stage states that load."""
    model = Net(2)
    s0, s1 = model.stages
    source = torch.optim.AdamW([{"params": list(s0.parameters())},
                                {"params": list(s1.parameters()), "lr": 0.5}], lr=0.1)
    twin = Net(2)
    single = torch.optim.AdamW([{"params": list(twin.stages[0].parameters())},
                                {"params": list(twin.stages[1].parameters()), "lr": 0.5}], lr=0.1)
    stages = [rebuild_optimizer(source, list(m.parameters())) for m in model.stages]
    x, y = dataset(8).tensors
    for _ in range(3):
        for m, opts in ((model, stages), (twin, [single])):
            F.cross_entropy(m(x), y).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    index = param_index(source)
    full = assemble([stage_part(o, index) for o in stages], source, index)
    want = single.state_dict()
    assert full["param_groups"] == want["param_groups"]
    assert sorted(full["state"]) == sorted(want["state"]) == list(range(4))
    for i, st in want["state"].items():
        for key, v in st.items():
            assert torch.equal(full["state"][i][key], v)
    fresh = rebuild_optimizer(torch.optim.AdamW([{"params": list(s0.parameters())},
                                                 {"params": list(s1.parameters()), "lr": 0.5}],
                                                lr=0.1), list(s1.parameters()))
    fresh.load_state_dict(stage_state(full, fresh, index))
    for a, b in zip(fresh.state_dict()["state"].values(), stages[1].state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(PipeOptimConfigError, match="1 param group"):
        stage_state({"param_groups": [full["param_groups"][0]], "state": {}}, fresh, index)


def test_loss_scale_update_is_gradscalers() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    state = scaler.state_dict()
    for grad in (1.0, 1.0, float("inf"), 1.0, 1.0, 1.0):
        scaler.scale(p.sum()).backward()
        p.grad.fill_(grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        state = next_scaler_state(state, found_inf=math.isinf(grad))
        assert state == scaler.state_dict(), grad


# ---------------------------------------------------------------------------------------------
# Running the module's own steps
# ---------------------------------------------------------------------------------------------


def test_logs_are_captured_merged_and_nested_blocks_restore() -> None:
    model = Net(2)
    with capture_logs(model) as outer:
        model.log("a", torch.tensor(1.0))
        with capture_logs(model) as inner:
            model.log_dict({"b": 2.0, "c": torch.tensor(3.0)}, prog_bar=True)
        model.log("a", torch.tensor(2.0), batch_size=3)
    assert "log" not in model.__dict__
    assert [(e.name, e.kwargs) for e in inner.entries] == [
        ("b", {"prog_bar": True, "logger": None, "on_step": None, "on_epoch": None,
               "reduce_fx": "mean", "enable_graph": False, "sync_dist": False,
               "sync_dist_group": None, "add_dataloader_idx": True, "batch_size": None,
               "rank_zero_only": False}), ("c", inner.entries[0].kwargs)]
    assert [e.name for e in outer.entries] == ["a", "a"]
    merged = merge_step_logs([[LogEntry("a", torch.tensor(9.0), {}),
                               LogEntry("z", 1.0, {"batch_size": 2})],
                              [LogEntry("a", torch.tensor(1.0), {"batch_size": 2}),
                               LogEntry("a", torch.tensor(2.0), {"batch_size": 2})]],
                             last_rank=1)
    by_name = {e.name: e for e in merged}
    assert float(by_name["a"].value) == 1.5 and by_name["a"].kwargs["batch_size"] == 4
    assert by_name["z"].value == 1.0
    from lightning_plugin.user_steps import MetricRef

    with pytest.raises(PipelineContractError, match="'m' was logged as a torchmetrics Metric"):
        merge_step_logs([[LogEntry("m", MetricRef("acc"), {})]], last_rank=0)


def test_redirected_forward_and_loss_checks() -> None:
    model = Net(2)
    x, y = dataset(4).tensors
    out = torch.ones(4, OUT, requires_grad=True)
    with redirect_forward(model, out, (x,), "training_step") as r:
        assert model(x) is out and model(x.clone()) is out
        with pytest.raises(PipelineContractError, match=r"inputs \[\(2, 8\)\] that are not"):
            model(x[:2])
    assert r.calls == 2 and "forward" not in model.__dict__
    with pytest.raises(PipelineContractError, match="returned None"):
        extract_loss(None, "training_step")
    with pytest.raises(PipelineContractError, match=r"scalar.*shape \[4\]"):
        extract_loss(out.sum(-1), "training_step")
    with pytest.raises(PipelineContractError, match="does not depend"):
        extract_loss(torch.tensor(1.0), "training_step")
    with pytest.raises(PipelineContractError, match="without 'loss'"):
        extract_loss({"x": out.sum()}, "training_step")
    loss, extras = extract_loss({"loss": out.sum(), "n": 4}, "training_step")
    assert extras == {"n": 4}


class Bypass(Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.stages[1](self.stages[0](x)), y)


class ShiftedForward(Net):
    def forward(self, x):
        return super().forward(x) + 1.0


def test_training_step_checked_before_the_pipeline() -> None:
    import contextlib

    batch = dataset(8).tensors
    for model, match in ((VectorLoss(), r"scalar.*\[2\]"), (Bypass(), "never called self"),
                         (ShiftedForward(), "forward must be the stages in sequence")):
        before = torch.get_rng_state()
        with pytest.raises(PipelineContractError, match=match):
            check_training_step(model, list(model.stages), batch, (batch, 0), {}, n=4, size=8,
                                context=contextlib.nullcontext, check_forward=True)
        assert torch.equal(torch.get_rng_state(), before)
    good = Net(2)
    check_training_step(good, list(good.stages), batch, (batch, 0), {}, n=4, size=8,
                        context=contextlib.nullcontext, check_forward=True)


def test_mixin_on_one_device_without_the_strategy() -> None:
    model = Net(3, sched="none")
    x, y = dataset(8).tensors
    ref = x
    for s in model.stages:
        ref = s(ref)
    assert torch.equal(model(x), ref)
    assert torch.equal(model.predict_step((x, y), 0), ref)
    assert torch.equal(model.predict_step(x, 0), ref)


class Doubled(PipelineModule):
    pass


def test_pipeline_module_needs_stages() -> None:
    with pytest.raises(PipelineContractError, match="not implemented"):
        _fit_error(Doubled())


def test_docs_example_block_comes_from_the_result_file() -> None:
    """docs/lightning.md shows what ``examples/lightning_pipeline.py --render`` prints from
    the committed benchmarks/results/lightning_example.json (with its machine and date)."""
    import importlib.util
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "lightning_example", os.path.join(root, "examples", "lightning_pipeline.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with open(os.path.join(root, "benchmarks", "results", "lightning_example.json")) as f:
        result = json.load(f)
    assert result["machine"]["cpus"] and result["date"]
    with open(os.path.join(root, "docs", "lightning.md")) as f:
        docs = f.read()
    assert "```text\n" + example.render(result) + "\n```" in docs
