"""Package-independent strategy logic: :class:`PipeOptimStrategyMixin`.

:mod:`lightning_plugin.strategy` and :mod:`lightning_plugin._pl` combine it with each Lightning
package's ``DDPStrategy``; the Lightning objects it needs come from the class attribute
``_api`` (:func:`~lightning_plugin._compat.make_api`). The work is done by
:class:`~lightning_plugin.training.PipelineRun` (training, checkpoints; for
``schedule="BitPipe"`` its variant :class:`~lightning_plugin.bitpipe_run.BitPipeRun`),
:func:`~lightning_plugin.evaluation.forward_only` (validation, test, predict) and
:mod:`~lightning_plugin.user_steps` (the module's own steps and logs).
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ._compat import (
    count_updates,
    install_launcher,
    process_group_timeout,
    schedule_facts,
    trainer_of,
    uncount_updates,
    uses_sync_batchnorm,
)
from .bitpipe_run import BitPipeRun, check_bitpipe_options, check_bitpipe_trainer
from .checkpoint import CHECKPOINT_KEY
from .checks import check_train_loader, check_trainer
from .comm import broadcast_tensors, comm_device, module_tensors
from .contract import pipeline_stages_of
from .errors import PipelineContractError, PipeOptimConfigError
from .launch import START_METHODS, resolve_start_method
from .module import PipelineMixin
from .optim import check_scheduler_horizons
from .plan import PipelinePlan, check_pipeline_method, make_plan
from .training import PipelineRun
from .user_steps import evaluation_step

__all__ = ["CLIP_SCOPES", "PipeOptimStrategyMixin"]

#: Accepted values of ``PipeOptimStrategy(clip_scope=...)``.
CLIP_SCOPES = ("auto", "global", "stage")
_CONTEXTS = {"validation_step": "val_step_context", "test_step": "test_step_context",
             "predict_step": "predict_step_context"}


class PipeOptimStrategyMixin:
    """Strategy logic; combined with a Lightning ``DDPStrategy`` by the package bindings."""

    _api: Any
    _spawn_launcher_cls: type
    _script_launcher_cls: type

    def __init__(
        self,
        schedule: str = "1F1B",
        *,
        n_microbatches: int | None = None,
        method: Any = None,
        update_every: int | None = None,
        rule: Any = None,
        stages_per_rank: int | None = None,
        clip_scope: str = "auto",
        timeout: float | datetime.timedelta | None = None,
        start_method: str = "auto",
        check_batches: bool = True,
        check_steps: bool = True,
        schedule_aware: bool = True,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        **schedule_kwargs: Any,
    ) -> None:
        from predictopt.pipeline.runtime import DEFAULT_TIMEOUT_S

        facts = schedule_facts(schedule)
        method = check_pipeline_method(method)
        for value, what in ((n_microbatches, "n_microbatches"), (update_every, "update_every"),
                            (stages_per_rank, "stages_per_rank")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise PipeOptimConfigError(f"{what} must be None or an int >= 1, got {value!r}")
        if start_method not in START_METHODS:
            raise PipeOptimConfigError(f"start_method must be one of {', '.join(START_METHODS)}, "
                                       f"got {start_method!r}")
        if clip_scope not in CLIP_SCOPES:
            raise PipeOptimConfigError(f"clip_scope must be one of {', '.join(CLIP_SCOPES)}, "
                                       f"got {clip_scope!r}")
        timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        td = timeout if isinstance(timeout, datetime.timedelta) else \
            datetime.timedelta(seconds=float(timeout))
        if td.total_seconds() <= 0:
            raise PipeOptimConfigError(f"timeout must be positive, got {timeout!r}")
        if "loss_fn" in schedule_kwargs:
            raise PipeOptimConfigError("the loss comes from the module's training_step; do not "
                                       "pass loss_fn to the strategy")
        if facts.bitpipe:
            check_bitpipe_options(rule=rule, stages_per_rank=stages_per_rank,
                                  clip_scope=clip_scope,
                                  process_group_backend=process_group_backend,
                                  schedule_kwargs=schedule_kwargs)
        super().__init__(  # type: ignore[call-arg]
            accelerator=accelerator, parallel_devices=parallel_devices,
            cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=td, start_method="popen")
        self.schedule = facts.name
        self.method = method
        self.n_microbatches = n_microbatches
        self.update_every = update_every
        self.rule = rule
        self.stages_per_rank = stages_per_rank
        self.clip_scope = clip_scope
        self.check_batches = bool(check_batches)
        self.check_steps = bool(check_steps)
        self.schedule_aware = bool(schedule_aware)
        self.schedule_kwargs = dict(schedule_kwargs)
        self._pipeoptim_start_method = start_method
        self._plan: PipelinePlan | None = None
        self._bitpipe = facts.bitpipe
        self._stage_modules: list[nn.Module] = []
        self._run: PipelineRun | None = None
        self._pending_extras: dict[str, Any] = {}
        self._accumulate: int | None = None
        self._check_forward = False

    # ------------------------------------------------------------------ public properties
    @property
    def plan(self) -> PipelinePlan | None:
        """The placement (after setup, or after the checks of the launching process)."""
        return self._plan

    @property
    def timeout(self) -> datetime.timedelta:
        """Timeout of the process group (blocked collectives and transfers raise after it)."""
        return process_group_timeout(self)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates of every stage per Lightning batch (``n / update_every``)."""
        if self._plan is None:
            raise RuntimeError("updates_per_step is known once the strategy is set up (in "
                               "configure_optimizers and later)")
        return self._plan.updates_per_step

    @property
    def pipeline_stages(self) -> list[Any]:
        """This rank's :class:`~predictopt.pipeline.runtime.PredictiveStage` objects (fit;
        empty under BitPipe, whose copies are ``pipeline_schedule.copies``)."""
        return list(self._run.stages) if self._run is not None else []

    @property
    def pipeline_schedule(self) -> Any:
        """The torch schedule object driving this rank's stages (fit; under BitPipe the
        :class:`~predictopt.pipeline.BitPipeRuntime`), else ``None``."""
        return self._run.schedule if self._run is not None else None

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank reads the same batches: the first stage needs x, the last one y.
        return {"num_replicas": 1, "rank": 0}

    # ------------------------------------------------------------------ launch
    def _configure_launcher(self) -> None:
        method = resolve_start_method(self._pipeoptim_start_method)
        if method == "popen":
            launcher = self._script_launcher_cls(
                self, self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            launcher = self._spawn_launcher_cls(self, start_method=method)
        install_launcher(self, launcher, method)

    # ------------------------------------------------------------------ checks
    def _check_trainer(self, trainer: Any, model: Any) -> None:
        check_trainer(self._api, trainer, model, self.precision_plugin,
                      sync_batchnorm=uses_sync_batchnorm(self))
        if self._bitpipe:
            check_bitpipe_trainer(self.precision_plugin,
                                  self.parallel_devices)  # type: ignore[attr-defined]

    def _accumulation(self, trainer: Any) -> int:
        if trainer.state.fn != self._api.TrainerFn.FITTING:
            return 1
        acc = self._accumulate if self._accumulate is not None else \
            int(trainer.accumulate_grad_batches)
        if acc > 1 and self.update_every is not None and self.update_every != acc:
            raise PipeOptimConfigError(
                f"accumulate_grad_batches={acc} and update_every={self.update_every} disagree: "
                "accumulate_grad_batches is the strategy's update_every (micro-batches per "
                "optimizer update); set one of them")
        return acc

    def _make_plan(self, num_stages: int, trainer: Any) -> PipelinePlan:
        acc = self._accumulation(trainer)
        u, source = (acc, "accumulate_grad_batches") if acc > 1 else (
            self.update_every, "update_every")
        plan = make_plan(self.schedule, num_stages, self.num_nodes * self.num_processes,
                         stages_per_rank=self.stages_per_rank, n_microbatches=self.n_microbatches,
                         method=self.method, update_every=u, update_every_source=source)
        if self.clip_scope == "global" and not self._can_defer(plan):
            raise PipeOptimConfigError(
                f"clip_scope='global' needs every stage to update once per batch with a method "
                f"that does not predict (e.g. method='gpipe'); {plan.method_name!r} makes "
                f"{plan.updates_per_step} update(s) per batch, each while the other stages are "
                "still computing the same micro-batch's gradients. Use clip_scope='stage' or "
                "'auto'")
        return plan

    def _can_defer(self, plan: PipelinePlan) -> bool:
        from predictopt.pipeline import get_method

        return (plan.updates_per_step == 1 and not get_method(plan.method).predicts
                and self.clip_scope != "stage" and not self._bitpipe)

    def _precheck(self, trainer: Any, model: Any) -> None:
        """Every check that needs no process group, in the launching process."""
        if not isinstance(model, self._api.LightningModule):
            return  # Lightning reports it
        self._check_trainer(trainer, model)
        if self._api.is_overridden("configure_model", model):
            try:
                stages = pipeline_stages_of(model)
            except (AttributeError, PipelineContractError):
                return  # the stages are built in configure_model: checked in every worker
        else:
            stages = pipeline_stages_of(model)
        self._plan = self._make_plan(len(stages), trainer)

    # ------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        super().setup_environment()  # type: ignore[misc]
        count_updates(self.lightning_module.trainer)  # type: ignore[attr-defined]

    def _move_to_device(self, lm: nn.Module) -> None:
        """Local stages and everything outside the stages go to the root device."""
        dev = self.root_device  # type: ignore[attr-defined]
        assert self._plan is not None
        in_stage: set[int] = set()
        for m in self._stage_modules:
            in_stage.update(id(s) for s in m.modules())
        for k in self._plan.local(self.global_rank):  # type: ignore[attr-defined]
            self._stage_modules[k].to(dev)

        def move(m: nn.Module) -> None:
            if id(m) in in_stage:
                return
            if not any(id(s) in in_stage for s in m.modules()):
                m.to(dev)
                return
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dev)
            for name, b in m.named_buffers(recurse=False):
                setattr(m, name, b.to(dev))
            for child in m.children():
                move(child)

        move(lm)

    def model_to_device(self) -> None:
        if self._plan is None or not self._stage_modules:
            super().model_to_device()  # type: ignore[misc]
            return
        self._move_to_device(self.lightning_module)  # type: ignore[attr-defined]

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None  # type: ignore[attr-defined]
        self.accelerator.setup(trainer)  # type: ignore[attr-defined]
        self._run = None
        lm = self.lightning_module  # type: ignore[attr-defined]
        self._stage_modules = pipeline_stages_of(lm)
        self._check_trainer(trainer, lm)
        fitting = trainer.state.fn == self._api.TrainerFn.FITTING
        if fitting:
            self._accumulate = int(trainer.accumulate_grad_batches)
        self._plan = self._make_plan(len(self._stage_modules), trainer)
        # identical starting weights everywhere (as DDP does), whatever each process built
        broadcast_tensors(module_tensors(lm), 0, self._comm)
        self._move_to_device(lm)
        if fitting:
            trainer.accumulate_grad_batches = 1  # it is the stages' update_every
            plugin = self.precision_plugin
            mixed = isinstance(plugin, self._api.MixedPrecision)
            common: dict[str, Any] = dict(
                api=self._api, trainer=trainer, module=lm, plan=self._plan,
                stage_modules=self._stage_modules, rank=self.global_rank,  # type: ignore
                device=self.root_device, options=self,  # type: ignore[attr-defined]
                train_context=plugin.train_step_context)
            if self._bitpipe:
                self._run = BitPipeRun(**common)
            else:
                self._run = PipelineRun(
                    **common, defer=self._can_defer(self._plan),
                    scaler=getattr(plugin, "scaler", None), autocast=mixed)
            self.optimizers = self._run.lightning_optimizers
            self.lr_scheduler_configs = self._run.lightning_scheduler_configs
            # the dry run compares the module's own forward with the stages in sequence
            devices = {p.device for m in self._stage_modules for p in m.parameters()}
            self._check_forward = type(lm).forward is not PipelineMixin.forward and \
                len(devices) <= 1
        # logged values come from the last stage's rank and are the same on every rank
        warnings.filterwarnings("ignore", message=r".*It is recommended to use `self\.log\(.*"
                                "sync_dist")
        if self.global_rank != self._plan.last_rank:  # type: ignore[attr-defined]
            # its torchmetrics are never updated here: their state comes from the last rank
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric")
        self.setup_precision_plugin()  # type: ignore[attr-defined]

    @property
    def _comm(self) -> torch.device:
        return comm_device(self.root_device)  # type: ignore[attr-defined]

    def _sync_full_model(self) -> None:
        """Every rank's LightningModule gets every stage's current weights (from its owner)."""
        if self._plan is None or not torch.distributed.is_initialized():
            return
        for k, m in enumerate(self._stage_modules):
            broadcast_tensors(module_tensors(m), self._plan.placement[k], self._comm)

    def teardown(self) -> None:
        trainer = trainer_of(self.lightning_module)  # type: ignore[attr-defined]
        if trainer is not None:
            uncount_updates(trainer)
            if self._accumulate is not None:
                trainer.accumulate_grad_batches = self._accumulate
        self._accumulate = None
        self._run = None
        super().teardown()  # type: ignore[misc]

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        if self._plan is not None:
            check_train_loader(trainer, self._plan.n_microbatches)
        run = self._run
        if run is None:
            return
        first = run.keys[0]
        total = trainer.estimated_stepping_batches
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
        notes = check_scheduler_horizons(
            [(s, c.interval, c.frequency) for s, c in zip(run.schedulers[first], run.configs)],
            remaining_updates=total - run.updates.updates[first],
            remaining_epochs=epochs - trainer.current_epoch, total_updates=total)
        for note in notes:
            rank_zero_warn(note)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._run is not None
        return self._run.step(args, kwargs, check_forward=self._check_forward)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """No-op: every stage ran its backward inside the pipeline."""
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """Run the closure (the pipeline step); the stages already stepped their optimizers."""
        return closure()

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """The value itself: every rank logs the same values (there are no replicas)."""
        return tensor

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002
        """Whether every rank (``all``) or some rank decided ``decision`` (one all-reduce)."""
        world = self.world_size  # type: ignore[attr-defined]
        if world == 1 or not torch.distributed.is_initialized():
            return bool(decision)
        flag = torch.tensor(int(bool(decision)), device=self._comm)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() == world) if all else bool(flag.item() > 0)

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        self._sync_full_model()

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self._plan is not None
        context = getattr(self.precision_plugin, _CONTEXTS[hook])
        with context():
            return evaluation_step(
                self.lightning_module, hook, args, kwargs,  # type: ignore[attr-defined]
                stages=self._stage_modules, plan=self._plan,
                rank=self.global_rank, root=self.root_device,  # type: ignore[attr-defined]
                comm=self._comm)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", args, kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", args, kwargs)

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model (every stage gathered from its rank), with the usual keys."""
        self._sync_full_model()
        return self.lightning_module.state_dict()  # type: ignore[attr-defined]

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state a single-device run would save, assembled on global rank 0."""
        if self._run is None:
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        self._run.sync_siblings()
        step = self.lightning_module.trainer.global_step  # type: ignore[attr-defined]
        full, self._pending_extras = self._run.optimizer_state(step)
        return full

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        if self._pending_extras and "optimizer_states" in checkpoint:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: self._pending_extras}
        self._pending_extras = {}
        super().save_checkpoint(checkpoint, filepath,  # type: ignore[misc]
                                storage_options=storage_options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each rank loads its own stages' optimizer, scheduler and method state."""
        if self._run is not None:
            self._run.load(checkpoint)

    # ------------------------------------------------------------------ registry
    #: ``(name, init kwargs, description)`` of the names registered with Lightning.
    REGISTERED: tuple[tuple[str, dict[str, Any], str], ...] = (
        ("pipeoptim", {}, "PipeOptim pipeline (1F1B; spawn in pytest, fork in notebooks, "
                          "subprocess script otherwise)"),
        ("pipeoptim_spawn", {"start_method": "spawn"}, "PipeOptim pipeline, spawned processes"),
        ("pipeoptim_popen", {"start_method": "popen"}, "PipeOptim pipeline, subprocess script"),
        ("pipeoptim_notebook", {"start_method": "fork"}, "PipeOptim pipeline, forked processes"),
        ("pipeoptim_gpipe", {"schedule": "GPipe"}, "PipeOptim on torch's GPipe schedule"),
        ("pipeoptim_1f1b", {"schedule": "1F1B"}, "PipeOptim on torch's 1F1B schedule"),
        ("pipeoptim_interleaved1f1b", {"schedule": "Interleaved1F1B"},
         "PipeOptim on torch's Interleaved1F1B schedule"),
        ("pipeoptim_loopedbfs", {"schedule": "LoopedBFS"}, "PipeOptim on LoopedBFS"),
        ("pipeoptim_interleavedzb", {"schedule": "InterleavedZeroBubble"},
         "PipeOptim on torch's InterleavedZeroBubble schedule"),
        ("pipeoptim_zbv", {"schedule": "ZBVZeroBubble"}, "PipeOptim on ZBVZeroBubble (V)"),
        ("pipeoptim_dualpipev", {"schedule": "DualPipeV"}, "PipeOptim on DualPipeV (V)"),
        ("pipeoptim_bitpipe", {"schedule": "BitPipe"},
         "PipeOptim on BitPipe (two mirrored V replicas, eager gradient sync)"),
    )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, kwargs, description in cls.REGISTERED:
            strategy_registry.register(name, cls, description=description, override=True,
                                       **kwargs)
