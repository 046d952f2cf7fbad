"""This rank's part of a fit: :class:`PipelineRun` (stages, schedule, optimizers, one batch).

Every Lightning training batch is one ``schedule.step()`` over ``n_microbatches``
micro-batches. On the rank holding the last stage, the schedule's loss function is the user's
``training_step``, called once per micro-batch with ``self(...)`` returning that micro-batch's
pipeline output; the loss it returns is the one the pipeline backpropagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_KEY,
    assemble,
    load_method_state,
    load_stage_groups,
    method_state,
    param_index,
    stage_groups,
    stage_part,
    stage_state,
)
from .comm import all_gather_objects, comm_device, gather_objects, to_cpu
from .contract import batch_fingerprint, pipeline_inputs_of, split_batch
from .errors import PipelineContractError, PipeOptimConfigError
from .evaluation import AutocastStage
from .optim import check_optimizer_config, clone_scheduler, rebuild_optimizer
from .plan import PipelinePlan
from .updates import StageUpdates
from .user_steps import (
    call_hooks,
    capture_logs,
    check_training_step,
    extract_loss,
    merge_step_logs,
    redirect_forward,
    replay_logs,
)

__all__ = ["NEVER", "PipelineRun"]

# Lightning steps an LR scheduler when ``(batch_idx + 1) % frequency == 0``: a frequency it
# never reaches turns its own per-batch stepping off for the schedulers the stages step.
NEVER = 2**62


@dataclasses.dataclass
class _Batch:
    """The training batch being run (read by the loss function on the last stage's rank)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    micro: list[Any]
    mb_size: int


class PipelineRun:
    """This rank's stages of a fit and everything that trains them.

    Args:
        api: The Lightning namespace (:func:`~lightning_plugin._compat.make_api`).
        trainer: The Trainer.
        module: The LightningModule.
        plan: The placement.
        stage_modules: All stage modules (this rank trains ``plan.local(rank)``).
        rank: This process's global rank.
        device: Its device.
        options: The strategy (``rule``, ``schedule_kwargs``, ``schedule_aware``,
            ``check_batches``, ``check_steps``).
        defer: Run the updates after ``schedule.step()`` (global clipping).
        scaler: The loss-scale holder of ``16-mixed``, else ``None``.
        train_context: The precision's training context (autocast), a callable.
        autocast: Whether the stages' forwards need ``train_context``.
    """

    def __init__(self, *, api: Any, trainer: Any, module: Any, plan: PipelinePlan,
                 stage_modules: list[nn.Module], rank: int, device: torch.device, options: Any,
                 defer: bool, scaler: Any,
                 train_context: Callable[[], AbstractContextManager[Any]], autocast: bool
                 ) -> None:
        from predictopt.pipeline.runtime import build_pipeline

        self._begin(api=api, trainer=trainer, module=module, plan=plan,
                    stage_modules=stage_modules, rank=rank, device=device, options=options,
                    scaler=scaler, train_context=train_context)
        self.optimizers = {k: rebuild_optimizer(self.source, list(stage_modules[k].parameters()))
                           for k in self.local}
        self._make_updates(api, defer=defer)
        modules = [AutocastStage(m, train_context) if autocast else m for m in stage_modules]
        it = iter(self.optimizers[k] for k in self.local)
        self.stages, self.schedule = build_pipeline(
            modules, plan.schedule, rank=rank, world_size=plan.num_ranks,
            n_microbatches=plan.n_microbatches, make_optimizer=lambda _params: next(it),
            method=plan.method, loss_fn=self.loss_fn, device=device,
            update_every=plan.update_every, stages_per_rank=plan.stages_per_rank,
            rule=options.rule, **options.schedule_kwargs)
        for stage in self.stages:
            k = stage.stage_index
            self._check_kept_optimizer(self.optimizers[k], stage.optimizer)
            stage.after_update_hooks.append(self.updates.after_update(k))
        aware = self._aware_scheduler()
        for stage in self.stages:
            if aware is not None and stage.worker is not None:
                stage.worker.optimizer.attach_scheduler(self.schedulers[stage.stage_index][aware])
        self._finish()

    # ------------------------------------------------------------------ construction
    def _begin(self, *, api: Any, trainer: Any, module: Any, plan: PipelinePlan,
               stage_modules: list[nn.Module], rank: int, device: torch.device, options: Any,
               scaler: Any, train_context: Callable[[], AbstractContextManager[Any]]) -> None:
        """Read ``configure_optimizers`` (its one optimizer and the scheduler configs)."""
        self.trainer, self.module, self.plan, self.rank = trainer, module, plan, rank
        self.stage_modules, self.device, self.options = stage_modules, device, options
        self.scaler, self._train_context = scaler, train_context
        optimizers, configs = api.init_optimizers(module)
        optimizers = [o for o in optimizers if not isinstance(o, api.MockOptimizer)]
        self.source = check_optimizer_config(optimizers, configs, stage_modules, module)
        self.index = param_index(self.source)
        self.configs = list(configs)
        self.local = plan.local(rank)
        #: The keys of ``optimizers`` / ``schedulers`` (this rank's stages); Lightning sees
        #: the first one's optimizer and schedulers.
        self.keys: list[Any] = list(self.local)

    def _make_updates(self, api: Any, *, defer: bool) -> None:
        """Clone the schedulers for every optimizer of ``self.optimizers``; wrap their steps."""
        trainer, module, configs = self.trainer, self.module, self.configs
        keep = [module, trainer]
        self.schedulers = {k: [clone_scheduler(c.scheduler, self.source, self.optimizers[k], keep)
                               for c in configs] for k in self.keys}
        clip_algorithm = trainer.gradient_clip_algorithm or "norm"
        self.updates = StageUpdates(
            trainer=trainer, module=module, optimizers=self.optimizers,
            schedulers=self.schedulers, intervals=[(c.interval, c.frequency) for c in configs],
            global_index=self.index, clip_val=trainer.gradient_clip_val,
            clip_algorithm=str(getattr(clip_algorithm, "value", clip_algorithm)),
            custom_clipping=api.is_overridden("configure_gradient_clipping", module),
            defer=defer, scaler=self.scaler, comm_device=comm_device(self.device),
            update_every=self.plan.update_every)

    def _check_kept_optimizer(self, built: Any, used: Any) -> None:
        """The method must step the optimizer built for a stage (``built``), not a
        replacement (``used``)."""
        if used is not built:
            raise PipeOptimConfigError(
                f"method {self.plan.method_name!r} replaces the stage optimizer "
                f"({type(built).__name__} -> {type(used).__name__}); "
                f"under Lightning, return {type(used).__name__} from "
                "configure_optimizers instead")

    def _aware_scheduler(self) -> int | None:
        """The scheduler a predicting method predicts with (``schedule_aware``), else ``None``."""
        from predictopt.pipeline import get_method

        step_idx = [i for i, c in enumerate(self.configs) if c.interval == "step"]
        aware = (self.options.schedule_aware and get_method(self.plan.method).predicts
                 and len(step_idx) == 1 and self.configs[step_idx[0]].frequency == 1)
        return step_idx[0] if aware else None

    def _finish(self) -> None:
        """What Lightning sees, and the per-batch state."""
        first = self.keys[0]
        #: What Lightning sees: the first local stage's optimizer and schedulers.
        self.lightning_optimizers = [self.optimizers[first]]
        self.lightning_scheduler_configs = [
            dataclasses.replace(c, scheduler=self.schedulers[first][i],
                                frequency=NEVER if c.interval == "step" else c.frequency)
            for i, c in enumerate(self.configs)]
        self._epoch_marks = self._marks()
        self._batch: _Batch | None = None
        self._batch_size: int | None = None
        self._losses: list[Tensor] = []
        self._extras: dict[str, Any] = {}
        self._checked = not self.options.check_steps

    # ------------------------------------------------------------------ epoch schedulers
    def _marks(self) -> list[Any]:
        return [getattr(s, "last_epoch", None) for s in self.schedulers[self.keys[0]]]

    def sync_siblings(self) -> None:
        """Other stages of this rank follow the first one's epoch-interval schedulers."""
        if len(self.keys) < 2 or not self.configs:
            return
        first = self.keys[0]
        marks = self._marks()
        changed = [i for i, c in enumerate(self.configs)
                   if c.interval != "step" and marks[i] != self._epoch_marks[i]]
        self._epoch_marks = marks
        for k in self.keys[1:]:
            for i in changed:
                self.schedulers[k][i].load_state_dict(self.schedulers[first][i].state_dict())
            if changed:
                for gp, gs in zip(self.optimizers[first].param_groups,
                                  self.optimizers[k].param_groups):
                    gs.update({key: v for key, v in gp.items()  # not predictopt's own stats
                               if key != "params" and not key.startswith("predictopt_")})

    # ------------------------------------------------------------------ checks
    def _check_batch(self, xs: tuple[Tensor, ...]) -> int:
        n = self.plan.n_microbatches
        sizes = {t.shape[0] if t.ndim else 0 for t in xs}
        b = sizes.pop() if len(sizes) == 1 else -1
        if b < 0:
            raise PipeOptimConfigError("the model's inputs of a batch have different batch "
                                       "sizes")
        if b == 0 or b % n:
            raise PipeOptimConfigError(
                f"the training batch size ({b}) must be a positive multiple of n_microbatches "
                f"({n}): the pipeline splits every batch into {n} equal micro-batches")
        if self._batch_size is None:
            self._batch_size = b
        elif b != self._batch_size:
            raise PipeOptimConfigError(
                f"the training batch size changed from {self._batch_size} to {b}: torch "
                "sizes the pipeline's buffers from the first batch, so every batch must have "
                "the same size; use drop_last=True in the training DataLoader")
        return b

    def _check_same_batch(self, batch: Any) -> None:
        """All ranks must hold the same batch: the first stage's x pairs with the last's y."""
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.tensor(batch_fingerprint(batch), dtype=torch.float64, device=dev)
        got = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(got, mine)
        bad = [r for r, g in enumerate(got) if not torch.equal(g, got[0])]
        if bad:
            raise PipeOptimConfigError(
                f"ranks {bad} received a different batch than rank 0: every rank must read "
                "the same batches in the same order (keep use_distributed_sampler=True, or "
                "give every rank the same seeded sampler)")

    # ------------------------------------------------------------------ one batch
    def loss_fn(self, output: Any, index: Tensor) -> Tensor:
        """The schedule's loss function: the user's ``training_step`` on one micro-batch.

        torch also calls it once before the first step, on the outputs of its shape
        inference, to infer the gradients' metadata (the micro-batch is not in flight then):
        that call's logs and hooks are dropped.
        """
        cur = self._batch
        assert cur is not None
        i = int(index.reshape(-1)[0]) // cur.mb_size
        lm = self.module
        mb = cur.micro[i]
        last = next(s for s in self.stages if s.is_last)
        real = last.worker is not None and i in last.worker.in_flight
        with capture_logs(lm) if not real else contextlib.nullcontext(), self._train_context():
            with redirect_forward(lm, output, pipeline_inputs_of(lm, mb), "training_step") as r:
                result = lm.training_step(mb, *cur.args[1:], **cur.kwargs)
        if r.calls == 0:
            raise PipelineContractError("training_step never called self(...)")
        loss, extras = extract_loss(result, "training_step")
        if not real:
            return loss
        self._extras = extras
        self._losses.append(loss.detach().float())
        if self.scaler is not None:  # as one device scales a loss it accumulates: (l / u) * S
            u = self.plan.update_every
            loss = self.scaler.scale(loss / u if u > 1 else loss)
        call_hooks(self.trainer, lm, "on_before_backward", loss)
        return loss

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any], check_forward: bool) -> Any:
        """One Lightning training batch: ``schedule.step()`` and what the steps logged."""
        plan, lm = self.plan, self.module
        batch = args[0]
        xs = pipeline_inputs_of(lm, batch)
        size = self._check_batch(xs)
        if not self._checked:
            check_training_step(lm, self.stage_modules, batch, args, kwargs,
                                n=plan.n_microbatches, size=size, context=self._train_context,
                                check_forward=check_forward)
            self._checked = True
        if self.options.check_batches and plan.num_ranks > 1:
            self._check_same_batch(batch)
        self.sync_siblings()
        last = self.rank == plan.last_rank
        if last:
            self._batch = _Batch(args, kwargs, split_batch(batch, plan.n_microbatches, size),
                                 size // plan.n_microbatches)
        self._losses, self._extras = [], {}
        self.updates.begin_batch()
        with capture_logs(lm) as captured:
            step_args = xs if self.rank == plan.first_rank else ()
            step_kw: dict[str, Any] = {}
            if last:
                step_kw = {"target": torch.arange(size, device=self.device), "losses": []}
            self.schedule.step(*step_args, **step_kw)
            self.updates.finish_batch()
        self._batch = None
        payload: dict[str, Any] = {"logs": captured.entries, "inf": self.updates.found_inf}
        if last:
            payload["loss"] = torch.stack(self._losses).mean().cpu()
            payload["extras"] = to_cpu(self._extras)
        parts = all_gather_objects(payload) if plan.num_ranks > 1 else [payload]
        self.updates.end_batch(any(p["inf"] for p in parts))
        replay_logs(lm, merge_step_logs([p["logs"] for p in parts], plan.last_rank))
        result = parts[plan.last_rank]
        loss = result["loss"].to(self.device)
        if not result["extras"]:
            return loss
        extras = {k: v.to(self.device) if isinstance(v, Tensor) else v
                  for k, v in result["extras"].items()}
        return {"loss": loss, **extras}

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict[str, Any]:
        """This rank's share of a checkpoint: ``{"part", "previous", "transforms", "updates",
        "groups"}``."""
        part: dict[int, Any] = {}
        previous: dict[int, Any] = {}
        transforms: dict[int, Any] = {}
        for stage in self.stages:
            k = stage.stage_index
            part[k] = stage_part(self.optimizers[k], self.index)
            prev = stage.worker.previous_version if stage.worker is not None else None
            if prev is not None:
                previous.update({self.index[id(p)]: t.detach().cpu()
                                 for p, t in zip(stage.worker.params, prev)})
            if stage.worker is not None:
                transforms.update(method_state(stage.worker, self.index))
        return {"part": part, "previous": previous, "transforms": transforms,
                "updates": dict(self.updates.updates),
                "groups": {k: stage_groups(self.optimizers[k]) for k in self.local}}

    def optimizer_state(self, global_step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(single-device optimizer state, pipeline state)`` on global rank 0 (every rank
        must call it; elsewhere both are empty)."""
        mine = self._local_state()
        parts = gather_objects(mine) if self.plan.num_ranks > 1 else [mine]
        if parts is None:
            return {}, {}
        stages = {k: p for r in parts for k, p in r["part"].items()}
        full = assemble([stages[k] for k in sorted(stages)], self.source, self.index)
        extras = {"version": 2, "schedule": self.plan.schedule,
                  "method": self.plan.method_name,
                  "n_microbatches": self.plan.n_microbatches,
                  "update_every": self.plan.update_every, "global_step": global_step,
                  "updates": {k: v for r in parts for k, v in r["updates"].items()},
                  "previous": {i: t for r in parts for i, t in r["previous"].items()} or None,
                  "transforms": {i: t for r in parts
                                 for i, t in r["transforms"].items()} or None,
                  "stage_groups": {k: g for r in parts for k, g in r["groups"].items()}}
        return full, extras

    def _checkpoint_parts(self, checkpoint: Any
                          ) -> tuple[dict[str, Any], dict[str, Any], int, dict[Any, Any]]:
        """``(single-device optimizer state, pipeline extras, updates made by default,
        {stage: updates made})`` of a checkpoint, checked (see :meth:`load`)."""
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1:
            raise PipeOptimConfigError(f"the checkpoint holds {len(states)} optimizer states; "
                                       "PipeOptimStrategy resumes from one optimizer")
        if CHECKPOINT_KEY in states[0]:
            raise PipeOptimConfigError(
                "this checkpoint was written by an earlier PipeOptimStrategy (per-stage "
                "optimizer states): load its 'state_dict' into the module and start a new fit")
        extras = checkpoint.get(CHECKPOINT_KEY) or {}
        fallback = int(checkpoint.get("global_step", 0)) * self.plan.updates_per_step
        return states[0], extras, fallback, extras.get("updates") or {}

    def load(self, checkpoint: Any) -> None:
        """Load this rank's stages' optimizer, scheduler and method state.

        Accepts single-device checkpoints and this strategy's, from any schedule or method;
        ``pipedream-2bw``'s previous weights and the method's transform state are restored
        when the checkpoint's method is the same (otherwise the method starts as after a fresh
        start).

        Raises:
            PipeOptimConfigError: not one optimizer state, another optimizer's, or a
                checkpoint of an earlier version of the strategy.
        """
        state, extras, fallback, done = self._checkpoint_parts(checkpoint)
        same = extras.get("method") == self.plan.method_name
        groups = (extras.get("stage_groups") or {}) if same else {}
        for k in self.local:
            self.optimizers[k].load_state_dict(
                stage_state(state, self.optimizers[k], self.index))
            load_stage_groups(self.optimizers[k], groups.get(k))
            for s, sd in zip(self.schedulers[k], checkpoint.get("lr_schedulers") or []):
                s.load_state_dict(sd)
            self.updates.updates[k] = int(done.get(k, fallback))
        saved = extras.get("previous") if same else None
        for stage in self.stages:
            worker = stage.worker
            if saved and worker is not None:
                worker.previous_version = [saved[self.index[id(p)]].to(p.device)
                                           for p in worker.params]
            if same and worker is not None:
                load_method_state(worker, extras.get("transforms") or {}, self.index)
        self._epoch_marks = self._marks()
