"""This rank's part of a BitPipe fit: :class:`BitPipeRun`, and the options BitPipe rejects.

``schedule="BitPipe"`` (arXiv 2410.19367) is not a torch schedule: the ``2K`` stages
(*chunks*) that ``pipeline_stages()`` returns are held twice on ``K`` ranks, replica ``A`` in a
V from rank 0 (the LightningModule's own stage modules, placed as ``ZBVZeroBubble`` places
them) and replica ``B`` in the mirrored V (a copy of each chunk, made in the rank holding it),
each replica taking half of every batch's micro-batches; both copies of a chunk apply the mean
of their gradients at every update, so they stay equal bit for bit. Every Lightning batch is
one :meth:`~predictopt.pipeline.BitPipeRuntime.step`, with the user's ``training_step`` as the
loss function on the ranks holding each replica's last chunk (``0`` and ``K - 1``).

Everything else is :class:`~lightning_plugin.training.PipelineRun`'s: every copy of every chunk
gets its own optimizer (the class ``configure_optimizers`` returned, rebuilt over the copy's
parameters) and clones of the schedulers, stepped by
:class:`~lightning_plugin.updates.StageUpdates` at each of its updates (hooks, per-copy
clipping, ``interval="step"`` schedulers); checkpoints hold replica ``A``'s optimizers in the
single-device format and load into both copies; evaluation runs along replica ``A``'s chunks
(:func:`~lightning_plugin.evaluation.forward_only` on the plan's placement).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .checkpoint import (
    load_method_state,
    load_stage_groups,
    method_state,
    stage_groups,
    stage_part,
    stage_state,
)
from .comm import all_gather_objects, to_cpu
from .contract import pipeline_inputs_of, split_batch
from .errors import PipelineContractError, PipeOptimConfigError
from .optim import rebuild_optimizer
from .plan import PipelinePlan
from .training import PipelineRun, _Batch
from .user_steps import (
    LogEntry,
    call_hooks,
    capture_logs,
    check_training_step,
    extract_loss,
    merge_step_logs,
    redirect_forward,
    replay_logs,
)

__all__ = ["BitPipeRun", "check_bitpipe_options", "check_bitpipe_trainer"]

Key = tuple[str, int]


def check_bitpipe_options(*, rule: Any, stages_per_rank: int | None, clip_scope: str,
                          process_group_backend: str | None,
                          schedule_kwargs: Mapping[str, Any]) -> None:
    """Reject, when the strategy is built, the options ``schedule="BitPipe"`` cannot run.

    Args:
        rule: The strategy's ``rule`` (must be ``None``: every copy uses the method's rule).
        stages_per_rank: Must be ``None`` or 2 (two chunks of each replica per device).
        clip_scope: Must not be ``"global"`` (the copies update inside the step).
        process_group_backend: ``None`` or ``"gloo"`` (``BitPipeRuntime`` runs on gloo).
        schedule_kwargs: Must be empty (there is no torch schedule class to pass them to).

    Raises:
        PipeOptimConfigError: the first option BitPipe cannot run, and what to use.
    """
    if rule is not None:
        raise PipeOptimConfigError(
            f"rule={rule!r} is not supported with schedule='BitPipe': every copy of every "
            "chunk predicts with its method's own rule; use rule=None (or a method whose rule "
            "you want)")
    if stages_per_rank not in (None, 2):
        raise PipeOptimConfigError(
            f"stages_per_rank={stages_per_rank!r} is not supported with schedule='BitPipe', "
            "which puts exactly 2 chunks of each replica on each device (2K chunks on K "
            "devices); use stages_per_rank=None")
    if clip_scope == "global":
        raise PipeOptimConfigError(
            "clip_scope='global' is not supported with schedule='BitPipe': each copy of a "
            "chunk updates inside the step, when its gradients and its partner's are complete, "
            "while the other chunks are still computing theirs. Use clip_scope='stage' or "
            "'auto' (each chunk clips by the norm of its mean gradient)")
    if process_group_backend not in (None, "gloo"):
        raise PipeOptimConfigError(
            f"process_group_backend={process_group_backend!r} is not supported with "
            "schedule='BitPipe', which runs on CPU tensors and the gloo backend; use "
            "process_group_backend=None or 'gloo'")
    if schedule_kwargs:
        raise PipeOptimConfigError(
            f"schedule='BitPipe' takes no torch schedule arguments (it is run by "
            f"predictopt's BitPipeRuntime, not a torch schedule): remove "
            f"{', '.join(sorted(schedule_kwargs))}")


def check_bitpipe_trainer(precision_plugin: Any, devices: Iterable[Any]) -> None:
    """Reject the Trainer settings ``schedule="BitPipe"`` cannot run (before any worker).

    Args:
        precision_plugin: The Trainer's precision plugin (must be ``"32-true"``).
        devices: The strategy's ``parallel_devices`` (must be CPUs).

    Raises:
        PipeOptimConfigError: a mixed precision, or a device that is not a CPU.
    """
    precision = str(getattr(precision_plugin, "precision", None))
    if precision != "32-true":
        raise PipeOptimConfigError(
            f"precision={precision!r} is not supported with schedule='BitPipe' (no autocast or "
            "loss scaling inside BitPipeRuntime): use precision='32-true'")
    kinds = sorted({torch.device(d).type for d in devices or ()} - {"cpu"})
    if kinds:
        raise PipeOptimConfigError(
            f"schedule='BitPipe' runs on CPU processes only (BitPipeRuntime sends CPU tensors "
            f"over gloo), got {', '.join(kinds)} devices: use accelerator='cpu'")


def _replica_index(index: Mapping[int, int], copies: Mapping[int, nn.Parameter]
                   ) -> dict[int, int]:
    """``index`` with every parameter that has a copy in ``copies`` replaced by that copy."""
    return {id(copies[i]) if i in copies else i: j for i, j in index.items()}


class BitPipeRun(PipelineRun):
    """This rank's copies of the chunks of a BitPipe fit and everything that trains them.

    Built where :class:`~lightning_plugin.training.PipelineRun` is, for a plan of schedule
    ``"BitPipe"`` (see the module docstring). The optimizers, schedulers and updates are keyed
    by copy, ``("A", chunk)`` or ``("B", chunk)``; Lightning sees the first of replica ``A``'s.

    Args:
        api: The Lightning namespace (:func:`~lightning_plugin._compat.make_api`).
        trainer: The Trainer.
        module: The LightningModule.
        plan: The placement (``plan.placement``: replica ``A``'s).
        stage_modules: All chunk modules (this rank trains replica ``A``'s
            ``plan.local(rank)`` and its copies of replica ``B``'s chunks).
        rank: This process's global rank.
        device: Its device (a CPU).
        options: The strategy (``schedule_aware``, ``check_batches``, ``check_steps``).
        train_context: The precision's training context, a callable.

    Attributes:
        runtime: The :class:`~predictopt.pipeline.BitPipeRuntime` (also ``schedule``).
        stages: Empty (there are no ``PredictiveStage`` objects; see ``runtime.copies``).

    Raises:
        PipeOptimConfigError: a method that replaces the optimizer, or what the runtime
            rejects.
    """

    def __init__(self, *, api: Any, trainer: Any, module: Any, plan: PipelinePlan,
                 stage_modules: list[nn.Module], rank: int, device: torch.device, options: Any,
                 train_context: Callable[[], AbstractContextManager[Any]]) -> None:
        from predictopt.pipeline import BitPipeRuntime

        self._begin(api=api, trainer=trainer, module=module, plan=plan,
                    stage_modules=stage_modules, rank=rank, device=device, options=options,
                    scaler=None, train_context=train_context)
        copies: dict[int, nn.Parameter] = {}  # id(parameter of replica A) -> replica B's
        originals: dict[int, nn.Parameter] = {}  # the inverse
        made: list[Optimizer] = []

        def copy_chunk(chunk: nn.Module) -> nn.Module:
            twin = copy.deepcopy(chunk)
            for p, q in zip(chunk.parameters(), twin.parameters(), strict=True):
                copies[id(p)], originals[id(q)] = q, p
            return twin

        def make_optimizer(params: Iterable[nn.Parameter]) -> Optimizer:
            ps = list(params)
            if ps and id(ps[0]) in originals:  # replica B's copy of a chunk
                mine = [originals[id(q)] for q in ps]
                opt = rebuild_optimizer(self.source, mine, copies={id(p): copies[id(p)]
                                                                   for p in mine})
            else:
                opt = rebuild_optimizer(self.source, ps)
            made.append(opt)
            return opt

        try:
            self.runtime = BitPipeRuntime(
                stage_modules, make_optimizer, n_microbatches=plan.n_microbatches,
                method=plan.method, loss_fn=self.loss_fn, update_every=plan.update_every // 2,
                copy_chunk=copy_chunk)
        except ValueError as e:
            raise PipeOptimConfigError(f"schedule 'BitPipe': {e}") from e
        #: ``{id(param): i}`` of replica B's copies (replica A's: ``index``).
        self.index_b = _replica_index(self.index, copies)
        workers = self.runtime.copies
        self.keys = [("A", c) for c in self.local] + sorted(k for k in workers if k[0] == "B")
        built = {id(o) for o in made}
        self.optimizers = {}
        for key in self.keys:
            inner = workers[key].optimizer.optimizer  # the one the method steps
            if id(inner) not in built:
                self._check_kept_optimizer(made[0], inner)  # raises
            self.optimizers[key] = inner
        self._make_updates(api, defer=False)
        aware = self._aware_scheduler()
        for key in self.keys:
            workers[key].after_update.append(self.updates.after_update(key))
            if aware is not None:
                workers[key].optimizer.attach_scheduler(self.schedulers[key][aware])
        self.stages: list[Any] = []
        self.schedule = self.runtime
        self._finish()
        self._chain_checked = False
        self._mb: dict[int, dict[str, Any]] = {}

    def _index_of(self, key: Key) -> dict[int, int]:
        """``{id(param): single-device index}`` for the parameters of copy ``key``."""
        return self.index if key[0] == "A" else self.index_b

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def _check_chain(self, mb: Any) -> None:
        """Every chunk but the last must return one Tensor (``BitPipeRuntime`` sends one):
        checked on every rank on the first micro-batch, before any communication."""
        lm = self.module
        xs = pipeline_inputs_of(lm, mb)
        if len(xs) != 1:
            raise PipelineContractError(
                f"schedule='BitPipe' feeds stage 0 one Tensor, but pipeline_inputs(batch) "
                f"returned {len(xs)}: pass one input Tensor (or use a torch schedule)")
        modes = [(m, m.training) for m in lm.modules()]
        lm.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                out: Any = xs[0]
                for k, m in enumerate(self.stage_modules[:-1]):
                    out = m(out)
                    if not isinstance(out, Tensor):
                        raise PipelineContractError(
                            f"stage {k} returned a {type(out).__name__}: under "
                            "schedule='BitPipe' every stage but the last must return one "
                            "Tensor (BitPipeRuntime sends one tensor between chunks)")
        finally:
            for m, mode in modes:
                m.training = mode

    # ------------------------------------------------------------------ one batch
    def loss_fn(self, output: Any, target: Tensor) -> Tensor:  # type: ignore[override]
        """The runtime's loss function: the user's ``training_step`` on one micro-batch.

        ``target`` holds the micro-batch's sample indices in the batch (the runtime's ``y`` is
        ``arange(batch size)``), which say which micro-batch this is. What the step logs is
        kept per micro-batch, so that every rank logs the mean over all micro-batches.
        """
        cur = self._batch
        assert cur is not None
        i = int(target.reshape(-1)[0]) // cur.mb_size
        lm = self.module
        mb = cur.micro[i]
        with capture_logs(lm) as captured, self._train_context():
            with redirect_forward(lm, output, pipeline_inputs_of(lm, mb), "training_step") as r:
                result = lm.training_step(mb, *cur.args[1:], **cur.kwargs)
        if r.calls == 0:
            raise PipelineContractError("training_step never called self(...)")
        loss, extras = extract_loss(result, "training_step")
        self._mb[i] = {"loss": loss.detach().float().cpu(), "logs": captured.entries,
                       "extras": to_cpu(extras)}
        call_hooks(self.trainer, lm, "on_before_backward", loss)
        return loss

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any], check_forward: bool) -> Any:
        """One Lightning training batch: ``runtime.step()`` and what the steps logged."""
        plan, lm = self.plan, self.module
        n = plan.n_microbatches
        batch = args[0]
        xs = pipeline_inputs_of(lm, batch)
        size = self._check_batch(xs)
        micro = split_batch(batch, n, size)
        if not self._chain_checked:
            self._check_chain(micro[0])
            self._chain_checked = True
        if not self._checked:
            check_training_step(lm, self.stage_modules, batch, args, kwargs, n=n, size=size,
                                context=self._train_context, check_forward=check_forward)
            self._checked = True
        if self.options.check_batches and plan.num_ranks > 1:
            self._check_same_batch(batch)
        self.sync_siblings()
        self._batch = _Batch(args, kwargs, micro, size // n)
        self._mb = {}
        self.updates.begin_batch()
        try:
            with capture_logs(lm) as captured:
                self.runtime.step(xs[0], torch.arange(size, device=xs[0].device))
        finally:
            self._batch = None
        payload: dict[str, Any] = {"logs": captured.entries, "mb": self._mb}
        parts = all_gather_objects(payload) if plan.num_ranks > 1 else [payload]
        per_mb = {i: v for p in parts for i, v in p["mb"].items()}
        if sorted(per_mb) != list(range(n)):  # a bug, not a user's mistake
            raise RuntimeError(f"BitPipe computed the losses of micro-batches {sorted(per_mb)}")
        steps: list[LogEntry] = [e for i in range(n) for e in per_mb[i]["logs"]]
        # training_step's names: the mean over all micro-batches (in micro-batch order); the
        # hooks' names: the lowest rank's (rank 0 holds replica A's last chunk)
        replay_logs(lm, merge_step_logs([steps] + [p["logs"] for p in parts], 0))
        loss = torch.stack([per_mb[i]["loss"] for i in range(n)]).mean().to(self.device)
        extras = per_mb[n - 1]["extras"]
        if not extras:
            return loss
        return {"loss": loss, **{k: v.to(self.device) if isinstance(v, Tensor) else v
                                 for k, v in extras.items()}}

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict[str, Any]:
        """Replica ``A``'s chunks of this rank: its optimizers are the checkpoint's; the
        method's transform state of both copies, keyed ``(replica, parameter number)`` (a
        copy's delay, and so its transforms' state, depends on its replica)."""
        part: dict[int, Any] = {}
        previous: dict[int, Any] = {}
        for c in self.local:
            key = ("A", c)
            part[c] = stage_part(self.optimizers[key], self.index)
            worker = self.runtime.copies[key]
            prev = worker.previous_version
            if prev is not None:
                previous.update({self.index[id(p)]: t.detach().cpu()
                                 for p, t in zip(worker.params, prev)})
        transforms = {(key[0], i): st for key in self.keys
                      for i, st in method_state(self.runtime.copies[key],
                                                self._index_of(key)).items()}
        return {"part": part, "previous": previous, "transforms": transforms,
                "updates": {c: self.updates.updates[("A", c)] for c in self.local},
                "groups": {key: stage_groups(self.optimizers[key]) for key in self.keys}}

    def load(self, checkpoint: Any) -> None:
        """Load both copies of this rank's chunks from one single-device state.

        Accepts the checkpoints :meth:`PipelineRun.load
        <lightning_plugin.training.PipelineRun.load>` accepts; every copy of chunk ``c`` gets
        chunk ``c``'s optimizer state, the schedulers' states and the updates chunk ``c``
        made (the copies are equal, so replica ``A``'s state is both's).

        Raises:
            PipeOptimConfigError: not one optimizer state, another optimizer's, or a
                checkpoint of an earlier version of the strategy.
        """
        state, extras, fallback, done = self._checkpoint_parts(checkpoint)
        same = extras.get("method") == self.plan.method_name
        groups = (extras.get("stage_groups") or {}) if same else {}
        for key in self.keys:
            opt = self.optimizers[key]
            opt.load_state_dict(stage_state(state, opt, self._index_of(key)))
            load_stage_groups(opt, groups.get(key))  # a copy's own (its delay is its replica's)
            for s, sd in zip(self.schedulers[key], checkpoint.get("lr_schedulers") or []):
                s.load_state_dict(sd)
            self.updates.updates[key] = int(done.get(key[1], fallback))
        saved = extras.get("previous") if same else None
        if saved:
            for key, worker in self.runtime.copies.items():
                index = self._index_of(key)
                worker.previous_version = [saved[index[id(p)]].to(p.device)
                                           for p in worker.params]
        if same:
            transforms = extras.get("transforms") or {}
            for key in self.keys:
                mine = {i: st for (rep, i), st in transforms.items() if rep == key[0]}
                load_method_state(self.runtime.copies[key], mine, self._index_of(key))
        self._epoch_marks = self._marks()
