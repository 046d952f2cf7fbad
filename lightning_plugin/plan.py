"""Where the stages run and how often they update: :class:`PipelinePlan`, :func:`make_plan`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import bitpipe_copy_update_every, pipeline_methods, schedule_facts
from .errors import PipeOptimConfigError

__all__ = ["PipelinePlan", "check_pipeline_method", "make_plan"]


def check_pipeline_method(method: Any) -> Any:
    """``method`` if the installed ``predictopt.pipeline`` runs it in a pipeline: a registered
    name (``None``: its ``DEFAULT_METHOD``) or a ``predictopt.pipeline.Method`` value that is
    not the staleness-free reference (a variant made with ``Method.with_``; the spawned
    workers get it by pickling, so its callables must be module-level functions).

    Raises:
        PipeOptimConfigError: anything else (the message lists the accepted names).
    """
    if method is None:
        from predictopt.pipeline import DEFAULT_METHOD

        return DEFAULT_METHOD
    from predictopt.pipeline import Method

    if isinstance(method, Method):
        if method.staleness_free:
            raise PipeOptimConfigError(f"method {method.name!r} is staleness-free (no pipeline); "
                                       "pass a pipeline method")
        return method
    accepted = pipeline_methods()
    if not isinstance(method, str) or method not in accepted:
        raise PipeOptimConfigError(f"method must be one of {', '.join(accepted)} or a "
                                   f"predictopt.pipeline.Method; got {method!r}")
    return method


@dataclass(frozen=True)
class PipelinePlan:
    """Where the stages run and how often they update.

    Under ``"BitPipe"`` the stages are the chunks, ``placement`` and ``stages_per_rank`` are
    those of replica ``A`` (the V placement; replica ``B`` holds a second copy of every chunk
    on the mirrored rank), and ``update_every`` counts the micro-batches of both copies of a
    chunk per update (twice one copy's completed backwards).

    Attributes:
        schedule: Canonical schedule name (``"1F1B"``, ``"ZBVZeroBubble"``, ``"BitPipe"``, ...).
        num_ranks: Pipeline ranks (= Lightning's world size).
        stages_per_rank: Stages on each rank.
        num_stages: Total stages.
        placement: ``{stage: rank}``.
        n_microbatches: Micro-batches per Lightning batch (per ``schedule.step``).
        update_every: Completed backwards per optimizer update.
        method: The pipeline method (a registered name or a ``Method``).
    """

    schedule: str
    num_ranks: int
    stages_per_rank: int
    num_stages: int
    placement: dict[int, int]
    n_microbatches: int
    update_every: int
    method: Any = "pipeoptim"

    @property
    def method_name(self) -> str:
        """The method's registry name (also of a ``Method`` value)."""
        from predictopt.pipeline import get_method

        return get_method(self.method).name

    def local(self, rank: int) -> list[int]:
        """The stages of ``rank``, sorted."""
        return sorted(k for k, r in self.placement.items() if r == rank)

    @property
    def first_rank(self) -> int:
        """Rank of stage 0 (it gets the inputs)."""
        return self.placement[0]

    @property
    def last_rank(self) -> int:
        """Rank of the last stage (it runs the LightningModule's steps)."""
        return self.placement[self.num_stages - 1]

    @property
    def updates_per_step(self) -> int:
        """Updates of every stage per Lightning batch: ``n_microbatches // update_every``."""
        return self.n_microbatches // self.update_every


def _stages_per_rank(facts: Any, num_stages: int, k: int, stages_per_rank: int | None) -> int:
    name = facts.name
    have = f"the Trainer runs {k} process(es) (devices x num_nodes)"
    if not facts.multi_stage:
        if num_stages != k:
            raise PipeOptimConfigError(
                f"schedule {name!r} runs one stage per device: pipeline_stages() returned "
                f"{num_stages} stage(s), so it needs devices={num_stages} (devices x num_nodes "
                f"= {num_stages}), but {have}. Use a multi-stage schedule (e.g. "
                "'Interleaved1F1B') to put several stages on each device")
        return 1
    if facts.v_placement:
        if num_stages != 2 * k:
            need = f"devices={num_stages // 2}" if num_stages % 2 == 0 else \
                f"an even number of stages ({num_stages} is odd)"
            raise PipeOptimConfigError(
                f"schedule {name!r} puts exactly 2 stages on each device (V placement): "
                f"pipeline_stages() returned {num_stages} stage(s), which needs {need}, but "
                f"{have}")
        return 2
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
    return spr


def make_plan(schedule: str, num_stages: int, world_size: int, *,
              stages_per_rank: int | None = None, n_microbatches: int | None = None,
              method: Any = "pipeoptim", update_every: int | None = None,
              update_every_source: str = "update_every") -> PipelinePlan:
    """Check that ``num_stages`` stages fit ``world_size`` devices under ``schedule`` and that
    the method can run that configuration; no process group needed.

    The method is checked by building, for every stage, the
    :class:`~predictopt.pipeline.StageWorker` the runtime will build (on a stand-in module), with
    that stage's staleness table: every error the method would raise at the first step
    (``update_every`` it does not accept, ``pipedream-2bw`` with staleness >= 2, a micro-batch
    count torch's schedule rejects) is raised here.

    Args:
        update_every_source: How to name ``update_every`` in messages (e.g.
            ``"accumulate_grad_batches"`` when it comes from the Trainer).

    Raises:
        PipeOptimConfigError: a stage count the schedule cannot place on that many devices
            (the message says how many devices, or stages, are needed), or a configuration the
            method or the schedule rejects.
    """
    from predictopt.pipeline import (
        StageWorker,
        default_update_every,
        get_method,
        stage_to_rank,
        staleness,
    )

    facts = schedule_facts(schedule)
    method = check_pipeline_method(method)
    if facts.bitpipe:
        return _bitpipe_plan(facts.name, num_stages, world_size, n_microbatches, method,
                             update_every, update_every_source)
    spr = _stages_per_rank(facts, num_stages, world_size, stages_per_rank)
    placement = stage_to_rank(facts.name, world_size, spr)
    n = n_microbatches if n_microbatches is not None else 2 * num_stages
    u = update_every if update_every is not None else default_update_every(method, num_stages, n)
    what = f"{update_every_source}={u}" if update_every is not None else f"update_every={u}"
    if n % u:
        raise PipeOptimConfigError(f"{what} must divide n_microbatches ({n}): every batch of "
                                   f"{n} micro-batches must end with an update")
    try:
        table = staleness(facts.name, world_size, n, stages_per_rank=spr, update_every=u)
        for k in range(num_stages):
            probe = nn.Linear(1, 1)
            StageWorker(probe, torch.optim.SGD(probe.parameters(), lr=0.0), method=method,
                        staleness=table[k], update_every=u)
    except ValueError as e:
        raise PipeOptimConfigError(
            f"method {get_method(method).name!r} cannot run schedule {facts.name!r} with "
            f"n_microbatches={n} and "
            f"{what} on {world_size} device(s): {e}") from e
    return PipelinePlan(facts.name, world_size, spr, num_stages, placement, n, u, method)


def _bitpipe_plan(name: str, num_stages: int, k: int, n_microbatches: int | None, method: Any,
                  update_every: int | None, update_every_source: str) -> PipelinePlan:
    """:func:`make_plan` for BitPipe: ``2K`` chunks on an even number ``K`` of devices, an even
    number of micro-batches, ``update_every`` counting both copies' micro-batches."""
    from predictopt.pipeline import get_method
    from predictopt.pipeline.bitpipe import bitpipe_placement

    have = f"the Trainer runs {k} process(es) (devices x num_nodes)"
    if num_stages != 2 * k or k % 2:
        need = (f"devices={num_stages // 2}" if num_stages % 4 == 0 else
                f"a multiple of 4 stages ({num_stages} is not)")
        raise PipeOptimConfigError(
            f"schedule {name!r} runs two copies of 2K chunks on an even number K of devices "
            f"(each device holds 2 chunks of each replica): pipeline_stages() returned "
            f"{num_stages} stage(s), which needs {need}, but {have}")
    n = n_microbatches if n_microbatches is not None else 2 * num_stages
    if n % 2:
        raise PipeOptimConfigError(
            f"schedule {name!r} needs an even n_microbatches (half of them flow through each "
            f"replica), got n_microbatches={n}")
    what = f"{update_every_source}={update_every}"
    if update_every is not None and (update_every % 2 or (n // 2) % (update_every // 2)):
        raise PipeOptimConfigError(
            f"{what} must be even and half of it must divide n_microbatches / 2 = {n // 2} "
            f"under schedule {name!r}: an update of a chunk averages the gradients of "
            f"update_every micro-batches, half from each of its two copies")
    try:
        u = bitpipe_copy_update_every(method, num_stages, n,
                                      None if update_every is None else update_every // 2)
    except ValueError as e:
        shown = what if update_every is not None else "the method's update_every"
        raise PipeOptimConfigError(
            f"method {get_method(method).name!r} cannot run schedule {name!r} with "
            f"n_microbatches={n} and "
            f"{shown} on {k} device(s): {e} (one copy's update_every is half the strategy's)"
        ) from e
    placement = {c: r for (rep, c), r in bitpipe_placement(k).items() if rep == "A"}
    return PipelinePlan(name, k, 2, num_stages, placement, n, 2 * u, method)
