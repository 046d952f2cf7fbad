"""Package-independent core of :class:`~lightning_plugin.PipeOptimStrategy`.

Everything here works for both ``lightning.pytorch`` and the standalone ``pytorch_lightning``:
the strategy logic lives in :class:`PipeOptimStrategyMixin`, which finds the few Lightning
objects it needs through the class attribute ``_api`` (a namespace built by :func:`make_api`
from either package). :mod:`lightning_plugin.strategy` and :mod:`lightning_plugin._pl` bind
it to each package's ``DDPStrategy``.

Nothing in :mod:`predictopt` imports Lightning; this package only uses predictopt's public
pipeline runtime (:func:`~predictopt.pipeline.runtime.build_pipeline`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import importlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from predictopt import PredictiveOptimizer
from predictopt.pipeline import PREDICTING_METHODS, check_method, default_update_every
from predictopt.pipeline.runtime import DEFAULT_TIMEOUT_S, build_pipeline
from predictopt.pipeline.schedules import _resolve_schedule, stage_to_rank

__all__ = [
    "CHECKPOINT_KEY",
    "PipeOptimConfigError",
    "PipelineContractError",
    "PipelinePlan",
    "PipeOptimStrategyMixin",
    "check_optimizer_config",
    "clone_scheduler",
    "make_api",
    "make_plan",
    "pipeline_stages_of",
    "rebuild_optimizer",
]

#: Key of the per-stage optimizer states inside ``checkpoint["optimizer_states"][0]``.
CHECKPOINT_KEY = "predictopt_pipeline"

_START_METHODS = ("auto", "spawn", "popen", "fork", "forkserver")

# Lightning steps an LR scheduler when ``(batch_idx + 1) % frequency == 0``: a frequency it
# never reaches turns its own per-batch stepping off for the schedulers the stages step.
_NEVER = 2**62


class PipelineContractError(TypeError):
    """The LightningModule does not follow the pipeline contract (see ``docs/lightning.md``)."""


class PipeOptimConfigError(ValueError):
    """A Trainer / strategy configuration :class:`PipeOptimStrategy` cannot run."""


# ---------------------------------------------------------------------------------------------
# Lightning access (one namespace per package)
# ---------------------------------------------------------------------------------------------


def make_api(package: str) -> SimpleNamespace:
    """The Lightning objects the strategy uses, from ``lightning.pytorch`` or ``pytorch_lightning``.

    Args:
        package: ``"lightning.pytorch"`` or ``"pytorch_lightning"``.
    """

    def mod(name: str) -> Any:
        return importlib.import_module(f"{package}.{name}")

    optim = mod("core.optimizer")
    return SimpleNamespace(
        package=package,
        TrainerFn=mod("trainer.states").TrainerFn,
        LightningModule=mod("core.module").LightningModule,
        init_optimizers=optim._init_optimizers_and_lr_schedulers,
        MockOptimizer=optim._MockOptimizer,
        is_overridden=mod("utilities.model_helpers").is_overridden,
    )


# ---------------------------------------------------------------------------------------------
# The module contract
# ---------------------------------------------------------------------------------------------


def pipeline_stages_of(module: Any) -> list[nn.Module]:
    """Check the pipeline contract of a LightningModule and return its stage modules.

    The module must define ``pipeline_stages() -> Sequence[nn.Module]`` returning its model as
    consecutive stages (registered submodules, disjoint, no tied weights), and
    ``pipeline_loss(output, target) -> Tensor``.

    Raises:
        PipelineContractError: what is missing or wrong, and what to do.
    """
    name = type(module).__name__
    fn = getattr(module, "pipeline_stages", None)
    if not callable(fn):
        raise PipelineContractError(
            f"{name} must define pipeline_stages() -> Sequence[nn.Module], returning its model "
            "as consecutive stage modules (stage k's output is stage k+1's input), e.g. "
            "`return self.stages` with `self.stages = nn.ModuleList([...])`; see "
            "lightning_plugin.PipelineModule")
    try:
        stages = fn()
    except NotImplementedError as e:
        raise PipelineContractError(f"{name}.pipeline_stages() is not implemented: return the "
                                    "model's stage modules, first stage first") from e
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise PipelineContractError(
            f"{name}.pipeline_stages() returned one module ({type(stages).__name__}); return a "
            "sequence of the stage modules (a list or an nn.ModuleList)")
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(
            stages, (Sequence, nn.ModuleList, nn.Sequential)):
        raise PipelineContractError(
            f"{name}.pipeline_stages() must return a sequence of nn.Module, got "
            f"{type(stages).__name__}")
    stages = list(stages)
    if not stages:
        raise PipelineContractError(f"{name}.pipeline_stages() returned no stage")
    for k, m in enumerate(stages):
        if not isinstance(m, nn.Module):
            raise PipelineContractError(f"{name}.pipeline_stages()[{k}] is a "
                                        f"{type(m).__name__}, not an nn.Module")
    if len({id(m) for m in stages}) != len(stages):
        raise PipelineContractError(f"{name}.pipeline_stages() returned the same module twice")
    registered = {id(m) for m in module.modules()}
    missing = [k for k, m in enumerate(stages) if id(m) not in registered]
    if missing:
        raise PipelineContractError(
            f"stage(s) {missing} of {name}.pipeline_stages() are not submodules of the "
            "LightningModule: assign the stages to an attribute (e.g. self.stages = "
            "nn.ModuleList([...])) so that they are in state_dict() and in checkpoints")
    owner: dict[int, int] = {}
    for k, m in enumerate(stages):
        for sub in m.modules():
            if id(sub) in owner and owner[id(sub)] != k:
                raise PipelineContractError(
                    f"stages {owner[id(sub)]} and {k} of {name}.pipeline_stages() share the "
                    f"submodule {type(sub).__name__} (nested stages or shared layers): every "
                    "stage must be a separate module")
            owner[id(sub)] = k
    param_stage: dict[int, int] = {}
    for k, m in enumerate(stages):
        for p in m.parameters():
            if param_stage.setdefault(id(p), k) != k:
                raise PipelineContractError(
                    f"stages {param_stage[id(p)]} and {k} share a parameter (tied weights): "
                    "pipeline stages live on different devices and cannot share parameters")
    if not callable(getattr(module, "pipeline_loss", None)):
        raise PipelineContractError(
            f"{name} must define pipeline_loss(output, target) -> Tensor: the loss of one "
            "micro-batch (a mean over its samples), computed on the last stage")
    return stages


def _split_batch(batch: Any, need_target: bool = True) -> tuple[tuple[Tensor, ...], Any]:
    """``(inputs as a tuple, target)`` of a batch ``(x, y)``; ``x`` may be a tuple of tensors."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    elif not need_target and isinstance(batch, Tensor):
        x, y = batch, None
    elif not need_target and isinstance(batch, (tuple, list)) and len(batch) == 1:
        x, y = batch[0], None
    else:
        what = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            what += f" of length {len(batch)}"
        raise PipelineContractError(
            f"PipeOptimStrategy expects batches (x, y): x a Tensor (or a tuple of Tensors, "
            f"passed to stage 0 as arguments), y the target given to pipeline_loss; got {what}")
    xs = (x,) if isinstance(x, Tensor) else tuple(x) if isinstance(x, (tuple, list)) else None
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise PipelineContractError(f"the input x of a batch must be a Tensor or a tuple of "
                                    f"Tensors, got {type(x).__name__}")
    if need_target and not isinstance(y, Tensor):
        raise PipelineContractError(f"the target y of a batch must be a Tensor, got "
                                    f"{type(y).__name__}")
    return xs, y


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelinePlan:
    """Where the stages run and how often they update.

    Attributes:
        schedule: Canonical schedule name (``"1F1B"``, ``"ZBVZeroBubble"``, ...).
        num_ranks: Pipeline ranks (= Lightning's world size).
        stages_per_rank: Stages on each rank.
        num_stages: Total stages.
        placement: ``{stage: rank}``.
        n_microbatches: Micro-batches per Lightning batch (per ``schedule.step``).
        update_every: Completed backwards per optimizer update.
    """

    schedule: str
    num_ranks: int
    stages_per_rank: int
    num_stages: int
    placement: dict[int, int]
    n_microbatches: int
    update_every: int

    def local(self, rank: int) -> list[int]:
        """The stages of ``rank``, sorted."""
        return sorted(k for k, r in self.placement.items() if r == rank)

    @property
    def first_rank(self) -> int:
        """Rank of stage 0 (it gets the inputs)."""
        return self.placement[0]

    @property
    def last_rank(self) -> int:
        """Rank of the last stage (it gets the targets and computes the loss)."""
        return self.placement[self.num_stages - 1]

    @property
    def updates_per_step(self) -> int:
        """Updates of every stage per Lightning batch: ``n_microbatches // update_every``."""
        return self.n_microbatches // self.update_every


def make_plan(schedule: str, num_stages: int, world_size: int, *,
              stages_per_rank: int | None = None, n_microbatches: int | None = None,
              method: str = "pipeoptim", update_every: int | None = None) -> PipelinePlan:
    """Check that ``num_stages`` stages fit ``world_size`` devices under ``schedule``.

    Raises:
        PipeOptimConfigError: a stage count the schedule cannot place on that many devices
            (the message says how many devices, or stages, are needed).
    """
    info, _ = _resolve_schedule(schedule)
    name = info.name
    k = world_size
    have = f"the Trainer runs {k} process(es) (devices x num_nodes)"
    if not info.multi_stage:
        spr = 1
        if num_stages != k:
            raise PipeOptimConfigError(
                f"schedule {name!r} runs one stage per device: pipeline_stages() returned "
                f"{num_stages} stage(s), so it needs devices={num_stages} (devices x num_nodes "
                f"= {num_stages}), but {have}. Use a multi-stage schedule (e.g. "
                "'Interleaved1F1B') to put several stages on each device")
    elif info.exact_stages_per_rank:
        spr = info.exact_stages_per_rank
        if num_stages != spr * k:
            need = f"devices={num_stages // spr}" if num_stages % spr == 0 else \
                f"an even number of stages ({num_stages} is odd)"
            raise PipeOptimConfigError(
                f"schedule {name!r} puts exactly {spr} stages on each device (V placement): "
                f"pipeline_stages() returned {num_stages} stage(s), which needs {need}, but "
                f"{have}")
    else:
        if stages_per_rank is not None:
            spr = stages_per_rank
        elif num_stages % k == 0 and num_stages >= 2 * k:
            spr = num_stages // k
        else:
            spr = 0
        if spr < 2 or num_stages != spr * k:
            raise PipeOptimConfigError(
                f"schedule {name!r} puts >= 2 stages on each device (loop placement): "
                f"pipeline_stages() returned {num_stages} stage(s) but {have}; the number of "
                f"stages must be a multiple of the number of devices and at least twice it "
                f"(e.g. {2 * k} stages on {k} devices, or devices={num_stages // 2} for "
                f"{num_stages} stages when that is a whole number)")
    placement = stage_to_rank(name, k, spr)
    n = n_microbatches if n_microbatches is not None else 2 * num_stages
    u = update_every if update_every is not None else default_update_every(method, num_stages, n)
    return PipelinePlan(name, k, spr, num_stages, placement, n, u)


# ---------------------------------------------------------------------------------------------
# Optimizers and schedulers restricted to one stage
# ---------------------------------------------------------------------------------------------


def rebuild_optimizer(optimizer: Optimizer, params: Sequence[nn.Parameter]) -> Optimizer:
    """The same optimizer class with the same param groups, restricted to ``params``.

    Every param group is kept (empty if none of its parameters is in ``params``) with a copy
    of all its hyper-parameters, so group indices, LR-scheduler ``base_lrs`` and per-group
    settings stay aligned with the original optimizer.

    Raises:
        PipeOptimConfigError: the class cannot be rebuilt from its ``defaults``, or the
            optimizer already holds state.
    """
    if optimizer.state:
        raise PipeOptimConfigError("configure_optimizers returned an optimizer that already holds "
                                   "state; return a fresh optimizer")
    keep = {id(p) for p in params}
    groups = []
    for g in optimizer.param_groups:
        ng = {key: copy.deepcopy(v) for key, v in g.items() if key != "params"}
        ng["params"] = [p for p in g["params"] if id(p) in keep]
        groups.append(ng)
    cls = type(optimizer)
    try:
        sig = inspect.signature(cls.__init__)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        kwargs = {key: copy.deepcopy(v) for key, v in optimizer.defaults.items()
                  if var_kw or key in sig.parameters}
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise PipeOptimConfigError(
            f"cannot rebuild {cls.__name__} over one stage's parameters as "
            f"{cls.__name__}(param_groups, **defaults): {e}. PipeOptimStrategy gives every "
            "stage its own optimizer of the class configure_optimizers returns") from e


def _patch_step_tracking(optimizer: Optimizer) -> None:
    """What ``LRScheduler.__init__`` does to the optimizer: mark ``step`` as tracked."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    opt_ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def clone_scheduler(scheduler: Any, source: Optimizer, target: Optimizer,
                    keep: Sequence[Any] = ()) -> Any:
    """A copy of ``scheduler`` (with its state) that drives ``target`` instead of ``source``.

    ``target`` must have ``source``'s param groups and hyper-parameters (as
    :func:`rebuild_optimizer` makes it), so the copy is in exactly the state the scheduler
    would have had if it had been constructed on ``target``. Works for any scheduler that
    reaches its optimizer through attributes (``SequentialLR`` and ``ChainedScheduler`` too).

    Args:
        scheduler: The LR scheduler built in ``configure_optimizers``.
        source: Its optimizer.
        target: The optimizer the copy drives.
        keep: Objects to share rather than copy (e.g. the LightningModule, when a schedule
            function is one of its bound methods).
    """
    memo: dict[int, Any] = {id(source): target}
    for obj in keep:
        memo[id(obj)] = obj
    clone = copy.deepcopy(scheduler, memo)
    _patch_step_tracking(target)
    return clone


def check_optimizer_config(optimizers: Sequence[Any], configs: Sequence[Any],
                           stages: Sequence[nn.Module], module: nn.Module) -> Optimizer:
    """Check what ``configure_optimizers`` returned; return its one optimizer.

    Args:
        optimizers: The optimizers (Lightning's parsed output of ``configure_optimizers``).
        configs: The ``LRSchedulerConfig`` objects.
        stages: The stage modules.
        module: The LightningModule (for parameter names).

    Raises:
        PipeOptimConfigError: not exactly one optimizer, a ``PredictiveOptimizer``, or a
            ``ReduceLROnPlateau`` stepped per batch.
        PipelineContractError: parameters outside the stages.
    """
    if len(optimizers) != 1:
        raise PipeOptimConfigError(
            f"configure_optimizers must return exactly one optimizer (over the stages' "
            f"parameters), got {len(optimizers)}: every stage runs its own copy of it. Use "
            "param groups for different hyper-parameters")
    source = optimizers[0]
    if isinstance(source, PredictiveOptimizer):
        raise PipeOptimConfigError(
            "return the bare optimizer from configure_optimizers, not a PredictiveOptimizer: "
            "each stage wraps its own copy with the method's rule (pass rule=... to "
            "PipeOptimStrategy to choose another)")
    if not isinstance(source, Optimizer):
        raise PipeOptimConfigError(f"configure_optimizers must return a torch.optim.Optimizer, "
                                   f"got {type(source).__name__}")
    stage_params = {id(p) for m in stages for p in m.parameters()}
    names = {id(p): n for n, p in module.named_parameters()}
    outside = [names.get(id(p), "?") for g in source.param_groups for p in g["params"]
               if id(p) not in stage_params]
    if outside:
        raise PipelineContractError(
            f"configure_optimizers optimizes parameters outside pipeline_stages(): "
            f"{', '.join(outside[:8])}; every trained parameter must be in a stage")
    for cfg in configs:
        if cfg.reduce_on_plateau and cfg.interval == "step":
            raise PipeOptimConfigError(
                "ReduceLROnPlateau with interval='step' is not supported: the strategy steps "
                "'step' schedulers once per optimizer update inside the pipeline, where no "
                "monitored metric exists; use interval='epoch'")
    return source


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _module_tensors(module: nn.Module) -> list[Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _is_interactive() -> bool:
    main = sys.modules.get("__main__")
    return bool(hasattr(sys, "ps1") or sys.flags.interactive or main is None
                or not getattr(main, "__file__", None) or "ipykernel" in sys.modules)


def _under_pytest() -> bool:
    if "pytest" not in sys.modules:
        return False
    argv0 = sys.argv[0] if sys.argv else ""
    main_file = getattr(sys.modules.get("__main__"), "__file__", "") or ""
    return any("pytest" in s or "py.test" in s for s in (argv0, main_file))


# ---------------------------------------------------------------------------------------------
# Launchers: configuration checks in the launching process, before any process starts
# ---------------------------------------------------------------------------------------------


class PrecheckLauncherMixin:
    """Runs the strategy's checks in the launching process before starting any worker."""

    _pipeoptim_strategy: Any

    def launch(self, function: Callable[..., Any], *args: Any, trainer: Any = None,
               **kwargs: Any) -> Any:
        if trainer is not None:
            model = args[0] if args else None
            if model is not None:
                self._pipeoptim_strategy._precheck(trainer, model)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The strategy
# ---------------------------------------------------------------------------------------------


class PipeOptimStrategyMixin:
    """Strategy logic; combined with a Lightning ``DDPStrategy`` by the package bindings."""

    _api: SimpleNamespace
    _spawn_launcher_cls: type
    _script_launcher_cls: type

    def __init__(
        self,
        schedule: str = "1F1B",
        *,
        n_microbatches: int | None = None,
        method: str = "pipeoptim",
        update_every: int | None = None,
        rule: Any = None,
        stages_per_rank: int | None = None,
        timeout: float | datetime.timedelta = DEFAULT_TIMEOUT_S,
        start_method: str = "auto",
        check_batches: bool = True,
        schedule_aware: bool = True,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        **schedule_kwargs: Any,
    ) -> None:
        try:
            info, _ = _resolve_schedule(schedule)
        except ValueError as e:
            raise PipeOptimConfigError(str(e)) from e
        method = check_method(method)
        if method == "sequential":
            raise PipeOptimConfigError("method 'sequential' is the single-process reference; use "
                                       "a pipeline method (pipeoptim, pipedream, gpipe, ...)")
        for value, what in ((n_microbatches, "n_microbatches"), (update_every, "update_every"),
                            (stages_per_rank, "stages_per_rank")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise PipeOptimConfigError(f"{what} must be None or an int >= 1, got {value!r}")
        if start_method not in _START_METHODS:
            raise PipeOptimConfigError(f"start_method must be one of {', '.join(_START_METHODS)}, "
                                       f"got {start_method!r}")
        td = timeout if isinstance(timeout, datetime.timedelta) else \
            datetime.timedelta(seconds=float(timeout))
        if td.total_seconds() <= 0:
            raise PipeOptimConfigError(f"timeout must be positive, got {timeout!r}")
        if "loss_fn" in schedule_kwargs:
            raise PipeOptimConfigError("loss_fn comes from the module's pipeline_loss; do not "
                                       "pass it to the strategy")
        super().__init__(  # type: ignore[call-arg]
            accelerator=accelerator, parallel_devices=parallel_devices,
            cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=td, start_method="popen")
        self.schedule = info.name
        self.method = method
        self.n_microbatches = n_microbatches
        self.update_every = update_every
        self.rule = rule
        self.stages_per_rank = stages_per_rank
        self.check_batches = bool(check_batches)
        self.schedule_aware = bool(schedule_aware)
        self.schedule_kwargs = dict(schedule_kwargs)
        self._pipeoptim_start_method = start_method
        self._reset_pipeline()

    def _reset_pipeline(self) -> None:
        self._plan: PipelinePlan | None = None
        self._stage_modules: list[nn.Module] = []
        self._stages: list[Any] = []  # this rank's PredictiveStage objects
        self._pipe_schedule: Any = None
        self._local_opts: dict[int, Optimizer] = {}
        self._local_scheds: dict[int, list[Any]] = {}
        self._sched_configs: list[Any] = []
        self._updates: dict[int, int] = {}
        self._epoch_marks: list[Any] = []
        self._train_batch_size: int | None = None

    # ------------------------------------------------------------------ public properties
    @property
    def plan(self) -> PipelinePlan | None:
        """The placement (after setup, or after the checks of the launching process)."""
        return self._plan

    @property
    def timeout(self) -> datetime.timedelta:
        """Timeout of the process group (blocked collectives and transfers raise after it)."""
        return self._timeout  # type: ignore[attr-defined]

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates of every stage per Lightning batch (``n / update_every``).

        Available in ``configure_optimizers`` (``self.trainer.strategy.updates_per_step``),
        e.g. ``OneCycleLR(total_steps=trainer.estimated_stepping_batches * updates_per_step)``.
        """
        if self._plan is None:
            raise RuntimeError("updates_per_step is known once the strategy is set up")
        return self._plan.updates_per_step

    @property
    def pipeline_stages(self) -> list[Any]:
        """This rank's :class:`~predictopt.pipeline.runtime.PredictiveStage` objects (fit)."""
        return list(self._stages)

    @property
    def pipeline_schedule(self) -> Any:
        """The torch schedule object driving this rank's stages (fit), else ``None``."""
        return self._pipe_schedule

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank reads the same batches: the first stage needs x, the last one y.
        return {"num_replicas": 1, "rank": 0}

    # ------------------------------------------------------------------ launch
    def _resolve_start_method(self) -> str:
        method = self._pipeoptim_start_method
        if method != "auto":
            return method
        if _under_pytest():
            return "spawn"
        if _is_interactive():
            return "fork" if sys.platform != "win32" else "spawn"
        return "popen"

    def _configure_launcher(self) -> None:
        method = self._resolve_start_method()
        self._start_method = method
        if method == "popen":
            self._launcher = self._script_launcher_cls(
                self, self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = self._spawn_launcher_cls(self, start_method=method)

    # ------------------------------------------------------------------ checks
    def _check_trainer(self, trainer: Any, model: Any) -> None:
        fn = trainer.state.fn
        if fn == self._api.TrainerFn.FITTING:
            if not model.automatic_optimization:
                raise PipeOptimConfigError(
                    "manual optimization (automatic_optimization = False) is not supported: "
                    "the pipeline stages step their optimizers themselves inside every batch; "
                    "keep automatic optimization (the default)")
            if not self._api.is_overridden("training_step", model):
                raise PipelineContractError(
                    f"{type(model).__name__} must define training_step for Lightning to accept "
                    "it (under PipeOptimStrategy the pipeline runs the stages instead of it); "
                    "subclass lightning_plugin.PipelineModule / PipelineMixin to get one that "
                    "also trains the model without the strategy")
            acc = trainer.accumulate_grad_batches
            if acc != 1:
                raise PipeOptimConfigError(
                    f"accumulate_grad_batches={acc} is not supported: the stages update inside "
                    "each batch. Use more micro-batches per batch (n_microbatches and a larger "
                    "batch), or update_every with method 'pipedream-2bw' / 'xpipe'")
            if trainer.gradient_clip_val:
                raise PipeOptimConfigError(
                    f"gradient clipping (gradient_clip_val={trainer.gradient_clip_val}) is not "
                    "supported: every stage steps its optimizer inside the pipeline, before "
                    "Lightning could clip. Remove gradient_clip_val")
        if getattr(self, "_layer_sync", None) is not None:
            raise PipeOptimConfigError(
                "sync_batchnorm=True is not supported: a pipeline has no data-parallel replicas "
                "to synchronise batch statistics with (each stage's BatchNorm sees every "
                "sample of its micro-batches); remove sync_batchnorm")
        precision = getattr(self.precision_plugin, "precision", None)
        if precision not in ("32-true", "32", 32):
            raise PipeOptimConfigError(
                f"precision={precision!r} is not supported by PipeOptimStrategy: use "
                "precision='32-true' (the default). Mixed precision and precision plugins would "
                "need their scaling inside the stages' own backward and optimizer step")

    def _make_plan(self, num_stages: int) -> PipelinePlan:
        world = self.num_nodes * self.num_processes
        return make_plan(self.schedule, num_stages, world, stages_per_rank=self.stages_per_rank,
                         n_microbatches=self.n_microbatches, method=self.method,
                         update_every=self.update_every)

    def _precheck(self, trainer: Any, model: Any) -> None:
        """Every check that needs no process group, in the launching process."""
        if not isinstance(model, self._api.LightningModule):
            return  # Lightning reports it
        stages = pipeline_stages_of(model)
        self._check_trainer(trainer, model)
        self._plan = self._make_plan(len(stages))

    # ------------------------------------------------------------------ setup
    @property
    def _comm_device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return self.root_device
        return torch.device("cpu")

    @torch.no_grad()
    def _broadcast_tensors(self, tensors: Sequence[Tensor], src: int) -> None:
        """Broadcast ``tensors`` (in place) from rank ``src``: one flat buffer per dtype."""
        dev = self._comm_device
        rank = dist.get_rank()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(dev) for t in ts])
            dist.broadcast(flat, src)
            if rank != src:
                offset = 0
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view(t.shape))
                    offset += n

    def _sync_full_model(self) -> None:
        """Every rank's LightningModule gets every stage's current weights (from its owner)."""
        if self._plan is None or not dist.is_initialized():
            return
        for k, m in enumerate(self._stage_modules):
            self._broadcast_tensors(_module_tensors(m), self._plan.placement[k])

    def _move_to_device(self, lm: nn.Module) -> None:
        """Local stages and everything outside the stages go to the root device."""
        dev = self.root_device
        assert self._plan is not None
        in_stage: set[int] = set()
        for m in self._stage_modules:
            in_stage.update(id(s) for s in m.modules())
        for k in self._plan.local(self.global_rank):
            self._stage_modules[k].to(dev)
        for m in lm.modules():
            if id(m) not in in_stage:
                m._apply(lambda t: t.to(dev), recurse=False)

    def model_to_device(self) -> None:
        if self._plan is None or not self._stage_modules:
            super().model_to_device()  # type: ignore[misc]
            return
        self._move_to_device(self.lightning_module)  # type: ignore[attr-defined]

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None  # type: ignore[attr-defined]
        self.accelerator.setup(trainer)  # type: ignore[attr-defined]
        self._reset_pipeline()
        # val/test metrics come from the last stage and are broadcast: equal on every rank
        warnings.filterwarnings(
            "ignore", message=r"It is recommended to use `self\.log\('(val|test)_")
        lm = self.lightning_module  # type: ignore[attr-defined]
        self._stage_modules = pipeline_stages_of(lm)
        self._check_trainer(trainer, lm)
        self._plan = self._make_plan(len(self._stage_modules))
        # identical starting weights everywhere (as DDP does), whatever each process built
        self._broadcast_tensors(_module_tensors(lm), 0)
        self._move_to_device(lm)
        if trainer.state.fn == self._api.TrainerFn.FITTING:
            self._setup_pipeline(trainer, lm)
        self.setup_precision_plugin()  # type: ignore[attr-defined]

    def _setup_pipeline(self, trainer: Any, lm: Any) -> None:
        plan = self._plan
        assert plan is not None
        rank = self.global_rank  # type: ignore[attr-defined]
        optimizers, configs = self._api.init_optimizers(lm)
        optimizers = [o for o in optimizers if not isinstance(o, self._api.MockOptimizer)]
        source = check_optimizer_config(optimizers, configs, self._stage_modules, lm)
        local = plan.local(rank)
        keep = [lm, trainer]
        for k in local:
            opt = rebuild_optimizer(source, list(self._stage_modules[k].parameters()))
            self._local_opts[k] = opt
            self._local_scheds[k] = [clone_scheduler(cfg.scheduler, source, opt, keep)
                                     for cfg in configs]
            self._updates[k] = 0
        self._sched_configs = list(configs)
        it = iter(self._local_opts[k] for k in local)
        stages, schedule = build_pipeline(
            self._stage_modules, plan.schedule, rank=rank, world_size=plan.num_ranks,
            n_microbatches=plan.n_microbatches, make_optimizer=lambda _params: next(it),
            method=self.method, loss_fn=lm.pipeline_loss, device=self.root_device,
            update_every=self.update_every, stages_per_rank=plan.stages_per_rank,
            rule=self.rule, **self.schedule_kwargs)
        self._stages, self._pipe_schedule = stages, schedule
        step_idx = [i for i, c in enumerate(configs) if c.interval == "step"]
        for stage in stages:
            k = stage.stage_index
            self._local_opts[k].register_step_post_hook(self._make_update_hook(k, step_idx))
            if (self.schedule_aware and self.method in PREDICTING_METHODS
                    and len(step_idx) == 1 and configs[step_idx[0]].frequency == 1
                    and stage.worker is not None):
                stage.worker.optimizer.attach_scheduler(self._local_scheds[k][step_idx[0]])
        first = local[0]
        self.optimizers = [self._local_opts[first]]
        self.lr_scheduler_configs = [
            dataclasses.replace(cfg, scheduler=self._local_scheds[first][i],
                                frequency=_NEVER if cfg.interval == "step" else cfg.frequency)
            for i, cfg in enumerate(configs)]
        self._epoch_marks = [self._sched_mark(s) for s in self._local_scheds[first]]

    def _make_update_hook(self, k: int, step_idx: list[int]) -> Callable[..., None]:
        ref = weakref.ref(self)

        def hook(_opt: Optimizer, _args: Any, _kwargs: Any) -> None:
            strategy = ref()
            if strategy is None:
                return
            strategy._updates[k] += 1
            count = strategy._updates[k]
            for i in step_idx:
                if count % strategy._sched_configs[i].frequency == 0:
                    strategy._local_scheds[k][i].step()

        return hook

    @staticmethod
    def _sched_mark(s: Any) -> Any:
        return (getattr(s, "last_epoch", None), getattr(s, "_step_count", None))

    def _sync_siblings(self) -> None:
        """Stages after the first on this rank follow its epoch-interval schedulers."""
        if len(self._stages) < 2 or not self._sched_configs:
            return
        first = self._stages[0].stage_index
        prim_opt, prim = self._local_opts[first], self._local_scheds[first]
        changed = False
        for i, cfg in enumerate(self._sched_configs):
            mark = self._sched_mark(prim[i])
            if cfg.interval != "step" and mark != self._epoch_marks[i]:
                changed = True
                self._epoch_marks[i] = mark
                for stage in self._stages[1:]:
                    self._local_scheds[stage.stage_index][i].load_state_dict(
                        prim[i].state_dict())
        if changed:
            for stage in self._stages[1:]:
                opt = self._local_opts[stage.stage_index]
                for gp, gs in zip(prim_opt.param_groups, opt.param_groups):
                    for key, v in gp.items():
                        if key != "params":
                            gs[key] = copy.deepcopy(v)

    # ------------------------------------------------------------------ training
    def _check_train_batch(self, xs: tuple[Tensor, ...], y: Tensor) -> int:
        assert self._plan is not None
        n = self._plan.n_microbatches
        b = y.shape[0] if y.ndim else 0
        for t in xs:
            if (t.shape[0] if t.ndim else 0) != b:
                raise PipeOptimConfigError(f"x and y of a batch have different batch sizes "
                                           f"({t.shape[0] if t.ndim else 0} and {b})")
        if b == 0 or b % n:
            raise PipeOptimConfigError(
                f"the training batch size ({b}) must be a positive multiple of n_microbatches "
                f"({n}): the pipeline splits every batch into {n} equal micro-batches")
        if self._train_batch_size is None:
            self._train_batch_size = b
        elif b != self._train_batch_size:
            raise PipeOptimConfigError(
                f"the training batch size changed from {self._train_batch_size} to {b}: torch "
                "sizes the pipeline's buffers from the first batch, so every batch must have "
                "the same size; use drop_last=True in the training DataLoader")
        return b

    def _check_same_batch(self, xs: tuple[Tensor, ...], y: Tensor) -> None:
        """All ranks must hold the same batch: the first stage's x pairs with the last's y."""
        dev = self._comm_device
        vals = [float(y.shape[0])] + [float(t.double().sum()) for t in xs] + \
            [float(y.double().sum())]
        mine = torch.tensor(vals, dtype=torch.float64, device=dev)
        got = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(got, mine)
        bad = [r for r, g in enumerate(got)
               if not torch.allclose(g, got[0], rtol=0.0, atol=0.0, equal_nan=True)]
        if bad:
            raise PipeOptimConfigError(
                f"ranks {bad} received a different batch than rank 0: every rank must read "
                "the same batches in the same order (keep use_distributed_sampler=True, or "
                "give every rank the same seeded sampler)")

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        dl = trainer.train_dataloader
        bs = getattr(dl, "batch_size", None)
        if self._plan is None or not isinstance(bs, int):
            return
        n = self._plan.n_microbatches
        if bs % n:
            raise PipeOptimConfigError(
                f"the training DataLoader's batch_size ({bs}) must be a multiple of "
                f"n_microbatches ({n})")
        try:
            samples = len(dl.sampler)
            batches = len(dl)
        except TypeError:
            return
        if not dl.drop_last and samples % bs and trainer.num_training_batches >= batches:
            raise PipeOptimConfigError(
                f"the training DataLoader's last batch is incomplete ({samples % bs} of {bs} "
                "samples) but the pipeline needs equal batches: set drop_last=True")

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        plan = self._plan
        assert plan is not None and self._pipe_schedule is not None
        batch = args[0] if args else kwargs["batch"]
        xs, y = _split_batch(batch)
        b = self._check_train_batch(xs, y)
        if self.check_batches and plan.num_ranks > 1:
            self._check_same_batch(xs, y)
        self._sync_siblings()
        rank = self.global_rank  # type: ignore[attr-defined]
        losses: list[Tensor] = []
        step_args = xs if rank == plan.first_rank else ()
        step_kw: dict[str, Any] = {"target": y, "losses": losses} if rank == plan.last_rank \
            else {}
        self._pipe_schedule.step(*step_args, **step_kw)
        if rank == plan.last_rank:
            loss = torch.stack([t.detach().float() for t in losses]).mean()
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.root_device)
        if plan.num_ranks > 1:
            comm = loss.to(self._comm_device)
            dist.broadcast(comm, plan.last_rank)
            loss = comm.to(self.root_device)
        self.lightning_module.log("train_loss", loss, prog_bar=True,  # type: ignore[attr-defined]
                                  batch_size=b, sync_dist=False)
        return loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """No-op: every stage ran its backward inside the pipeline."""
        return closure_loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        """Run the closure (the pipeline step); the stages already stepped their optimizers."""
        return closure()

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        self._sync_full_model()

    # ------------------------------------------------------------------ evaluation
    def _send(self, tensors: Sequence[Tensor], dst: int) -> None:
        dev = self._comm_device
        dist.send_object_list([[(tuple(t.shape), t.dtype) for t in tensors]], dst=dst)
        for t in tensors:
            dist.send(t.detach().contiguous().to(dev), dst)

    def _recv(self, src: int) -> tuple[Tensor, ...]:
        dev = self._comm_device
        meta: list[Any] = [None]
        dist.recv_object_list(meta, src=src)
        out = []
        for shape, dtype in meta[0]:
            buf = torch.empty(shape, dtype=dtype, device=dev)
            dist.recv(buf, src)
            out.append(buf.to(self.root_device))
        return tuple(out)

    @torch.no_grad()
    def _forward_only(self, xs: tuple[Tensor, ...]) -> Any:
        """The model's output on the real weights (on the last stage's rank, else ``None``)."""
        plan = self._plan
        assert plan is not None
        rank = self.global_rank  # type: ignore[attr-defined]
        acts: tuple[Tensor, ...] = xs
        for k in range(plan.num_stages):
            owner = plan.placement[k]
            if k > 0 and plan.placement[k - 1] != owner:
                if rank == plan.placement[k - 1]:
                    self._send(acts, owner)
                elif rank == owner:
                    acts = self._recv(plan.placement[k - 1])
            if rank == owner:
                out = self._stage_modules[k](*acts)
                if isinstance(out, Tensor):
                    acts = (out,)
                elif isinstance(out, (tuple, list)) and all(isinstance(t, Tensor) for t in out):
                    acts = tuple(out)
                else:
                    raise PipelineContractError(f"stage {k} must return a Tensor or a tuple of "
                                                f"Tensors, got {type(out).__name__}")
        if rank != plan.last_rank:
            return None
        return acts[0] if len(acts) == 1 else acts

    def _eval_step(self, prefix: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self._plan
        assert plan is not None
        lm = self.lightning_module  # type: ignore[attr-defined]
        batch = args[0] if args else kwargs["batch"]
        xs, y = _split_batch(batch)
        out = self._forward_only(xs)
        values: dict[str, float] | None = None
        if self.global_rank == plan.last_rank:  # type: ignore[attr-defined]
            values = {"loss": float(lm.pipeline_loss(out, y))}
            metrics = getattr(lm, "pipeline_metrics", None)
            if callable(metrics):
                for name, v in dict(metrics(out, y)).items():
                    values[str(name)] = float(v)
        if plan.num_ranks > 1:
            values = self.broadcast(values, src=plan.last_rank)  # type: ignore[attr-defined]
        assert values is not None
        b = int(y.shape[0]) if y.ndim else 1
        for name, v in values.items():
            lm.log(f"{prefix}_{name}", v, prog_bar=name == "loss", batch_size=b, sync_dist=False)
        return torch.tensor(values["loss"])

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("val", args, kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test", args, kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan
        assert plan is not None
        batch = args[0] if args else kwargs["batch"]
        xs, _ = _split_batch(batch, need_target=False)
        out = self._forward_only(xs)
        if plan.num_ranks > 1:
            out = self.broadcast(_to_cpu(out), src=plan.last_rank)  # type: ignore[attr-defined]
        return out

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model (every stage gathered from its rank), with the usual keys."""
        self._sync_full_model()
        return self.lightning_module.state_dict()  # type: ignore[attr-defined]

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Every stage's optimizer, scheduler and method state, gathered on global rank 0."""
        if not self._stages:
            return super().optimizer_state(optimizer)  # type: ignore[misc]
        plan = self._plan
        assert plan is not None
        self._sync_siblings()
        mine: dict[int, Any] = {}
        for stage in self._stages:
            k = stage.stage_index
            sd = stage.state_dict()
            del sd["module"]  # in checkpoint["state_dict"]
            sd["schedulers"] = [s.state_dict() for s in self._local_scheds[k]]
            sd["updates"] = self._updates[k]
            mine[k] = _to_cpu(sd)
        parts: list[Any] = [mine]
        if plan.num_ranks > 1:  # assembled on rank 0, which writes the checkpoint
            is_zero = self.global_rank == 0  # type: ignore[attr-defined]
            gathered: list[Any] | None = [None] * plan.num_ranks if is_zero else None
            dist.gather_object(mine, gathered, dst=0)
            if gathered is not None:
                parts = gathered
        stages: dict[int, Any] = {}
        for part in parts:
            stages.update(part)
        return {CHECKPOINT_KEY: {
            "version": 1, "schedule": plan.schedule, "num_stages": plan.num_stages,
            "num_ranks": plan.num_ranks, "method": self.method,
            "n_microbatches": plan.n_microbatches, "update_every": plan.update_every,
            "stages": stages}}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each rank loads its own stages' optimizer, scheduler and method state."""
        if not self._stages:
            return
        states = checkpoint.get("optimizer_states") or []
        blob = states[0].get(CHECKPOINT_KEY) if len(states) == 1 and isinstance(
            states[0], Mapping) else None
        if blob is None:
            raise PipeOptimConfigError(
                "this checkpoint was not written by PipeOptimStrategy (it has no per-stage "
                "optimizer states); to start from its weights, load checkpoint['state_dict'] "
                "into the module and call fit without ckpt_path")
        plan = self._plan
        assert plan is not None
        if blob["num_stages"] != plan.num_stages:
            raise PipeOptimConfigError(f"the checkpoint has {blob['num_stages']} stages, the "
                                       f"module {plan.num_stages}")
        for stage in self._stages:
            k = stage.stage_index
            entry = blob["stages"][k]
            previous = entry.get("previous")
            if previous is not None:
                previous = [t.to(self.root_device) for t in previous]
            stage.load_state_dict({"module": stage.submod.state_dict(),
                                   "optimizer": entry["optimizer"], "method": entry["method"],
                                   "previous": previous})
            for s, sd in zip(self._local_scheds[k], entry["schedulers"]):
                s.load_state_dict(sd)
            self._updates[k] = int(entry.get("updates", 0))
        first = self._stages[0].stage_index
        self._epoch_marks = [self._sched_mark(s) for s in self._local_scheds[first]]

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
    )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, kwargs, description in cls.REGISTERED:
            strategy_registry.register(name, cls, description=description, override=True,
                                       **kwargs)

