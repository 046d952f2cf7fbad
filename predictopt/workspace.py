r"""Reusable buffers for repeated predictions and weight copies: `Workspace`.

A pipeline stage predicts (or stashes) its weights at every forward and computes a gradient at
every backward. Fresh weight-sized tensors are expensive on CPU: the allocator hands large
blocks back to the operating system when they are freed, so every new one page-faults on first
touch (on the 2-core VM of the benchmarks, about 1.6 ms per 4 MiB, as much as computing the
prediction). A `Workspace` keeps those buffers and hands them out again once nothing else
references them, so a stage touches the same memory at every micro-batch.

Reuse is safe by construction: the workspace keeps each buffer privately and hands out a new
alias of it (``detach()``: a new tensor object sharing the storage), and it hands a buffer out
again only when its storage is referenced by the private tensor alone
(``torch._C._storage_Use_Count``: every alias, view or tensor autograd saved for a backward
holds a reference), so a buffer autograd still keeps for a backward, or that a caller kept (an
output aliasing a weight, a gradient a hook stored), is never overwritten. Where that count is
not available (another torch build) every request allocates.

Memory: a workspace holds, per key, as many buffers as were in use at once (at most
``max_per_key``), plus one scratch buffer per (device, dtype) as large as the largest request;
the peak is what the same work needs without a workspace, but the memory is kept between uses
until `Workspace.release`.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

__all__ = ["Workspace"]

# ---------------------------------------------------------------------------------------------
# Torch access: the module's one private torch API, pinned by tests/test_one_pass.py
# (test_torch_storage_use_count_is_present_and_counts; without it every request allocates,
# test_fallback_allocates_without_the_use_count)
# ---------------------------------------------------------------------------------------------

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _refs(t: Tensor) -> int:
    """References to ``t``'s storage (the probe's own temporary one included)."""
    return _use_count(t.untyped_storage()._cdata)  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _describe(key: Hashable) -> str:
    """``key`` for an error message, its tensors by shape and dtype (not by value)."""
    if isinstance(key, Tensor):
        return f"<tensor {tuple(key.shape)} {key.dtype}>"
    if isinstance(key, tuple):
        return "(" + ", ".join(_describe(k) for k in key) + ("," if len(key) == 1 else "") + ")"
    return repr(key)


class Workspace:
    """Buffers handed out again once nothing else references them, and a scratch buffer.

    Args:
        max_per_key: At most this many buffers are kept per key; requests beyond are served
            with tensors the workspace does not keep.

    Raises:
        ValueError: ``max_per_key`` is not an int >= 1.
    """

    def __init__(self, max_per_key: int = 16) -> None:
        if isinstance(max_per_key, bool) or not isinstance(max_per_key, int) or max_per_key < 1:
            raise ValueError(f"max_per_key must be an int >= 1, got {max_per_key!r}")
        self.max_per_key = max_per_key
        #: Whether buffers are reused (the storage reference count is available).
        self.reuses = _use_count is not None
        self._buffers: dict[Hashable, list[tuple[Tensor, int]]] = {}
        self._layouts: dict[Hashable, tuple] = {}  # per key: the layout of the first ``like``
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def buffer(self, key: Hashable, like: Tensor) -> Tensor:
        """A tensor shaped, strided and typed like ``like``, on its device, with undefined
        contents: one of the buffers kept under ``key`` that nothing else references, else a
        new one (kept, up to ``max_per_key`` per key).

        Args:
            key: What the buffer is for (e.g. ``("grad", parameter)``); buffers of one key must
                all be requested with tensors of one shape, stride, dtype and device (a
                non-dense ``like`` gets a contiguous buffer).
            like: The tensor to imitate (``torch.empty_like``, preserving its layout).

        Raises:
            ValueError: ``like`` differs in shape, stride, dtype or device from the tensor the
                first buffer under ``key`` was requested with.
        """
        kept = self._buffers.get(key)
        if kept:
            want = self._layouts[key]
            got = _layout(like)
            if got != want:
                raise ValueError(
                    f"like must match the buffers kept under key {_describe(key)} (shape "
                    f"{want[0]}, stride {want[1]}, {want[2]}, {want[3]}); got shape {got[0]}, "
                    f"stride {got[1]}, {got[2]}, {got[3]}")
            for t, base in kept:
                if _refs(t) == base:
                    return t.detach()
        t = torch.empty_like(like, memory_format=torch.preserve_format)
        if self.reuses:
            kept = self._buffers.setdefault(key, [])
            self._layouts.setdefault(key, _layout(like))
            if len(kept) < self.max_per_key:
                kept.append((t, _refs(t)))
                return t.detach()
        return t

    def scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous 1-D tensor of ``numel`` elements with undefined contents, a view of the
        workspace's scratch buffer for ``(device, dtype)`` (grown to the largest request).
        Valid until the next call with the same device and dtype."""
        key = (torch.device(device), dtype)
        t = self._scratch.get(key)
        if t is None or t.numel() < numel:
            self._scratch.pop(key, None)
            t = self._scratch[key] = torch.empty(numel, dtype=dtype, device=device)
        return t[:numel]

    @property
    def nbytes(self) -> int:
        """Bytes the workspace keeps (buffers and scratch)."""
        ts = [t for kept in self._buffers.values() for t, _ in kept] + list(
            self._scratch.values())
        return sum(t.untyped_storage().nbytes() for t in ts)

    def release(self) -> None:
        """Forget every buffer (those still referenced elsewhere live on there)."""
        self._buffers.clear()
        self._layouts.clear()
        self._scratch.clear()

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._buffers.values())
        return f"Workspace(buffers={n}, scratch={len(self._scratch)}, nbytes={self.nbytes})"
