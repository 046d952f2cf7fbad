"""Forward-only passes through the stages: evaluation across ranks, and a chain in one process.

Validation, test and predict batches go through :func:`forward_only`: each stage's owner runs
it on the real weights and sends the activations to the next stage's owner with plain
``send``/``recv``, their shapes and dtypes first. torch's own schedules do not serve here:
they split every batch into a fixed number of equal micro-batches and size their receive
buffers from the first batch (so an evaluation set's short last batch, or inputs whose length
varies between batches, would need a new stage and schedule object, and a shape inference,
per shape), and a plain ``PipelineStage`` asserts under the V schedules in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import PipelineContractError

__all__ = ["AutocastStage", "as_tensors", "forward_only", "run_chain"]


def as_tensors(out: Any, stage: int) -> tuple[Tensor, ...]:
    """A stage's output as a tuple of Tensors (what is sent to the next stage).

    Raises:
        PipelineContractError: anything but a Tensor or a tuple / list of Tensors.
    """
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out):
        return tuple(out)
    raise PipelineContractError(f"stage {stage} must return a Tensor or a tuple of Tensors, "
                                f"got {type(out).__name__}")


def _unpack(acts: tuple[Tensor, ...]) -> Any:
    return acts[0] if len(acts) == 1 else acts


class AutocastStage(nn.Module):
    """A stage module whose forward runs under ``context()`` (the precision's autocast).

    Only forwards are autocast: the backward runs outside, as in a single-device step.
    """

    def __init__(self, module: nn.Module, context: Callable[[], AbstractContextManager[Any]]
                 ) -> None:
        super().__init__()
        self.module = module
        self._context = context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._context():
            return self.module(*args, **kwargs)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default


def run_chain(modules: Sequence[nn.Module], xs: tuple[Tensor, ...]) -> Any:
    """The stages in sequence, in this process (each on the device of its weights)."""
    acts = xs
    for k, m in enumerate(modules):
        dev = _device_of(m, acts[0].device)
        acts = as_tensors(m(*(t.to(dev) for t in acts)), k)
    return _unpack(acts)


def _send(tensors: Sequence[Tensor], dst: int, device: torch.device) -> None:
    dist.send_object_list([[(tuple(t.shape), t.dtype) for t in tensors]], dst=dst)
    for t in tensors:
        dist.send(t.detach().contiguous().to(device), dst)


def _recv(src: int, device: torch.device, root: torch.device) -> tuple[Tensor, ...]:
    meta: list[Any] = [None]
    dist.recv_object_list(meta, src=src)
    out = []
    for shape, dtype in meta[0]:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src)
        out.append(buf.to(root))
    return tuple(out)


@torch.no_grad()
def forward_only(modules: Sequence[nn.Module], placement: dict[int, int], rank: int,
                 xs: tuple[Tensor, ...] | None, *, root: torch.device,
                 comm: torch.device) -> Any:
    """The model's output on the real weights: on the last stage's rank, else ``None``.

    Args:
        modules: All stage modules (only this rank's run).
        placement: ``{stage: rank}``.
        rank: This process's rank.
        xs: Stage 0's inputs (needed on the rank of stage 0 only).
        root: This rank's device.
        comm: The device tensors are sent from (:func:`~lightning_plugin.comm.comm_device`).
    """
    last = len(modules) - 1
    acts: tuple[Tensor, ...] = xs if xs is not None else ()
    for k, m in enumerate(modules):
        owner = placement[k]
        if k > 0 and placement[k - 1] != owner:
            if rank == placement[k - 1]:
                _send(acts, owner, comm)
            elif rank == owner:
                acts = _recv(placement[k - 1], comm, root)
        if rank == owner:
            acts = as_tensors(m(*acts), k)
    return _unpack(acts) if rank == placement[last] else None
