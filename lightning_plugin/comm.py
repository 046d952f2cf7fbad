"""The collectives the strategy runs between pipeline steps (never inside one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["all_gather_objects", "broadcast_object", "broadcast_tensors", "comm_device",
           "gather_objects", "module_tensors", "to_cpu"]


def comm_device(root_device: torch.device) -> torch.device:
    """Where tensors go for a collective: the device with NCCL, the CPU with gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return root_device
    return torch.device("cpu")


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the CPU (dicts, lists and tuples followed)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(*map(to_cpu, obj)) if hasattr(obj, "_fields") else \
            tuple(to_cpu(v) for v in obj)
    return obj


def module_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers of ``module``."""
    return list(module.parameters()) + list(module.buffers())


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[Tensor], src: int, device: torch.device) -> None:
    """Broadcast ``tensors`` in place from rank ``src``: one flat buffer per dtype."""
    rank = dist.get_rank()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in ts])
        dist.broadcast(flat, src)
        if rank != src:
            offset = 0
            for t in ts:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape))
                offset += n


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (``None`` elsewhere)."""
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
