"""``PipeOptimStrategy`` for ``lightning.pytorch`` (``import lightning as L``).

Importing this module registers the strategy names of
:data:`PipeOptimStrategy.REGISTERED <lightning_plugin.mixin.PipeOptimStrategyMixin.REGISTERED>`
(``"pipeoptim"``, ``"pipeoptim_spawn"``, ``"pipeoptim_zbv"``, ...) in
``lightning.pytorch.strategies.StrategyRegistry``. The standalone ``pytorch_lightning`` package
gets its own class, :class:`lightning_plugin._pl.PipeOptimStrategy`, registered under the same
names in its own registry.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from ._compat import make_api
from .launch import PrecheckLauncherMixin
from .mixin import PipeOptimStrategyMixin

__all__ = ["PipeOptimStrategy"]

_API = make_api("lightning.pytorch")


class _SpawnLauncher(PrecheckLauncherMixin, _API.SpawnLauncher):
    """Lightning's spawn/fork launcher; checks the configuration before starting processes."""

    def __init__(self, strategy: Any, start_method: str = "spawn") -> None:
        super().__init__(strategy, start_method=start_method)
        self._pipeoptim_strategy = strategy


class _ScriptLauncher(PrecheckLauncherMixin, _API.ScriptLauncher):
    """Lightning's subprocess-script launcher; checks the configuration before starting."""

    def __init__(self, strategy: Any, cluster_environment: Any, num_processes: int,
                 num_nodes: int) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._pipeoptim_strategy = strategy


class PipeOptimStrategy(PipeOptimStrategyMixin, DDPStrategy):
    r"""Asynchronous pipeline-parallel training with weight prediction, as a Lightning strategy.

    Each process (one per device) holds consecutive stages of the model that the
    LightningModule returns from ``pipeline_stages()``, placed as the torch schedule expects,
    and trains them with :class:`~predictopt.pipeline.runtime.PredictiveStage`: every Lightning
    batch is one ``schedule.step()`` over ``n_microbatches`` micro-batches, during which each
    stage runs its forwards on predicted weights (PipeOptim, or another ``method``) and steps
    its own optimizer after every ``update_every``-th completed backward. The module's own
    steps run on the rank holding the last stage, with ``self(...)`` returning the pipeline's
    output (``training_step`` once per micro-batch; its loss is the one backpropagated), and
    what they log reaches every rank. See ``docs/lightning.md``.

    Example::

        import lightning as L
        import lightning_plugin

        trainer = L.Trainer(strategy="pipeoptim", accelerator="cpu", devices=4, max_epochs=3)
        trainer = L.Trainer(strategy=lightning_plugin.PipeOptimStrategy(
            schedule="ZBVZeroBubble", n_microbatches=16), accelerator="cpu", devices=2)

    Args:
        schedule: A torch schedule of :data:`~predictopt.pipeline.SUPPORTED_SCHEDULES`
            (case-insensitive): ``"1F1B"`` (default), ``"GPipe"``, ``"Interleaved1F1B"``,
            ``"LoopedBFS"``, ``"InterleavedZeroBubble"``, ``"ZBVZeroBubble"``, ``"DualPipeV"``;
            or ``"BitPipe"`` (two copies of ``2K`` chunks on an even number ``K`` of CPU
            devices, run by :class:`~predictopt.pipeline.BitPipeRuntime`; see
            ``docs/lightning.md`` for what it supports). Single-stage schedules need one stage
            per device; V schedules and BitPipe exactly two; the other multi-stage ones a
            multiple of the number of devices (at least twice it).
        n_microbatches: Micro-batches per Lightning batch (the batch size must be a multiple
            of it). Default: twice the number of stages.
        method: Any pipeline method of the installed ``predictopt.pipeline``
            (``predictopt.pipeline.PIPELINE_METHODS`` and any registered one; default
            ``predictopt.pipeline.DEFAULT_METHOD``), by name or as a
            ``predictopt.pipeline.Method`` value (picklable: the workers get a copy).
        update_every: Completed backwards per optimizer update (default: the method's). The
            Trainer's ``accumulate_grad_batches`` sets it too. Under BitPipe it counts the
            micro-batches of both copies of a chunk (even: twice one copy's).
        rule: Prediction rule overriding the method's (predicting methods).
        stages_per_rank: Stages per device for loop multi-stage schedules (default: number of
            stages / devices).
        clip_scope: The norm ``gradient_clip_val`` clips by: ``"global"`` (over all stages, as
            on one device; needs one update per batch and a method that does not predict,
            e.g. ``gpipe``, and a torch schedule), ``"stage"`` (each stage's own gradient), or
            ``"auto"`` (global where possible, else per stage).
        timeout: Seconds (or a ``timedelta``) after which a blocked collective or transfer
            raises instead of waiting for a peer that hangs (default 120).
        start_method: ``"auto"`` (spawn under pytest, fork in notebooks / REPLs, otherwise
            Lightning's subprocess-script launcher), ``"spawn"``, ``"popen"``, ``"fork"`` or
            ``"forkserver"``.
        check_batches: Check at every batch that all ranks read the same batch (one small
            all-gather): stage 0's inputs must pair with the last stage's targets.
        check_steps: Before the first pipeline step, run ``training_step`` once on every rank
            on the first micro-batch (the whole model in each process), so that a mistake
            (e.g. a loss that is not a scalar) raises on every rank before any communication.
        schedule_aware: With a predicting method and one per-update LR scheduler, predict
            with the learning rates the scheduler will set
            (:meth:`~predictopt.PredictiveOptimizer.attach_scheduler`).
        accelerator: Passed to Lightning (usually set by the Trainer).
        parallel_devices: Passed to Lightning (usually set by the Trainer).
        cluster_environment: Passed to Lightning (usually set by the Trainer).
        checkpoint_io: Passed to Lightning.
        precision_plugin: Passed to Lightning: ``"32-true"``, ``"bf16-mixed"`` or
            ``"16-mixed"``.
        process_group_backend: Default ``"gloo"`` on CPU, ``"nccl"`` on CUDA.
        **schedule_kwargs: More arguments of the torch schedule class.

    Raises:
        PipeOptimConfigError: an unknown schedule, method or option value, or an option
            ``schedule="BitPipe"`` cannot run (``rule``, ``stages_per_rank`` other than 2,
            ``clip_scope="global"``, a backend other than gloo, ``**schedule_kwargs``).
    """

    _api = _API
    _spawn_launcher_cls = _SpawnLauncher
    _script_launcher_cls = _ScriptLauncher


PipeOptimStrategy.register_strategies(StrategyRegistry)
