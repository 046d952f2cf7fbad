r"""BitPipe across processes: each rank runs its copies of the chunks in its own order of
`~predictopt.pipeline.bitpipe.bitpipe_actions`, with point-to-point messages between the ranks
and the eager gradient exchange of every chunk's two copies.

Why not a torch schedule: torch's pipelining assumes one chain of stages in which stage ``s``
feeds ``s + 1`` and every stage processes every micro-batch; BitPipe runs two chains over the
same chunks in opposite directions, each with half the micro-batches. So this module executes
the action lists itself, with the same :class:`~predictopt.pipeline.StageWorker` objects (and so
the same methods, staleness and random streams) as `~predictopt.pipeline.BitPipeSimulator`:

* ``F(c, i)``: the input is the batch's micro-batch ``i`` on chunk 0, else the activation
  received from the rank of chunk ``c - 1`` of the same replica (or kept, when that is this
  rank); the output is sent to the rank of chunk ``c + 1`` (the last chunk computes the loss).
* ``B(c, i)``: the gradient of the output comes from the rank of chunk ``c + 1`` (or from the
  loss), the input gradient goes to the rank of chunk ``c - 1``.
* Eager synchronisation: when a copy completes an update window, its rank sends the raw
  gradient to the partner copy's rank and receives the partner's; both step on
  $(g_A + g_B) / 2$, computed in that order on both ranks, so the copies stay equal bit for bit.

Every send is asynchronous (``isend``, waited for at the end of the step) and every receive
blocks; each message has its own tag, so messages between two ranks never match the wrong
receive. No rank deadlocks: a receive waits for an action that starts earlier in
`~predictopt.pipeline.bitpipe.bitpipe_timeline` (which includes the synchronisation waits),
so by induction on start times every receive is eventually served. The result equals
`~predictopt.pipeline.BitPipeSimulator` bit for bit (tested on two gloo ranks).

Scope: CPU tensors and a gloo process group of exactly the ``K`` ranks of the pipeline (the
default group); each chunk takes and returns one tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .bitpipe import (
    _configure,
    _copy_workers,
    _pair_mean,
    bitpipe_actions,
    bitpipe_placement,
    replica_of,
)
from .methods import DEFAULT_METHOD, Method

__all__ = ["BitPipeRuntime"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
           torch.int32)
_MAX_DIMS = 8
_KINDS = {"act": 0, "grad": 1, "sync": 2}


class BitPipeRuntime:
    """This rank's part of a BitPipe pipeline (see the module docstring).

    Construct it on every rank with the same arguments; call :meth:`step` on every rank once
    per batch (ranks ``0`` and ``K - 1`` hold the replicas' first and last chunks and need the
    batch and its targets; the others may pass ``None``).

    Args:
        stages: The ``2K`` chunk modules of the model (the same initial weights on every rank,
            e.g. built from the same seed), or ``stages(c)`` building chunk ``c``; this rank
            keeps its chunks of replica ``A`` and deep copies for replica ``B``, exactly as
            :class:`~predictopt.pipeline.BitPipeSimulator` does.
        make_optimizer: ``make_optimizer(params)``, once per copy.
        num_chunks: ``2K`` when ``stages`` is a callable (ignored otherwise).
        n_microbatches: Micro-batches per step (even; half per direction).
        method: A method that runs on torch's schedules (as for
            :class:`~predictopt.pipeline.BitPipeSimulator`).
        loss_fn: ``loss_fn(output, target)`` (a per-micro-batch mean).
        update_every: Completed backwards of one copy per update (default: the method's).
        copy_chunk: ``copy_chunk(module)``: replica ``B``'s copy of one of this rank's chunks,
            made from the chunk module before any optimizer is built (default
            ``copy.deepcopy``, as the simulator; a caller may record which copied parameter
            belongs to which original, e.g. to give every copy its own optimizer over the
            original's param groups).

    Attributes:
        rank, num_ranks: This rank and ``K``.
        copies: ``{(replica, chunk): StageWorker}`` of this rank.
        actions: This rank's actions of one step, in order.

    Raises:
        RuntimeError: ``torch.distributed`` not initialised.
        ValueError: a world size other than ``K`` (even), or what the simulator rejects.
    """

    def __init__(self, stages: Sequence[nn.Module] | Callable[[int], nn.Module],
                 make_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer], *,
                 n_microbatches: int, method: str | Method = DEFAULT_METHOD,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 update_every: int | None = None, num_chunks: int | None = None,
                 copy_chunk: Callable[[nn.Module], nn.Module] = copy.deepcopy) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("BitPipeRuntime needs torch.distributed initialised "
                               "(init_process_group with the gloo backend) on every rank")
        if callable(stages) and not isinstance(stages, nn.Module):
            if num_chunks is None:
                raise ValueError("num_chunks (2K) is required when stages is a callable")
            count = num_chunks
        elif isinstance(stages, nn.Module) or not stages:
            raise ValueError("stages must be a non-empty sequence of 2K nn.Module, or a "
                             "callable building chunk c")
        else:
            count = len(stages)
        spec, k, m, u = _configure(method, count, n_microbatches, update_every)
        world = dist.get_world_size()
        if world != k:
            raise ValueError(f"BitPipe on {count} chunks runs on K = {k} ranks; the process "
                             f"group has {world}")
        self.rank, self.num_ranks, self.n_microbatches = dist.get_rank(), k, m
        self.copy_update_every, self.update_every = u, 2 * u
        self.loss_fn, self.method = loss_fn, spec.name
        self._place = bitpipe_placement(k)
        self.actions = bitpipe_actions(k, m)[self.rank]
        mine: dict[tuple[str, int], nn.Module] = {}
        for c in sorted({c for (_, c), d in self._place.items() if d == self.rank}):
            module = stages(c) if callable(stages) and not isinstance(stages, nn.Module) \
                else stages[c]
            for rep in "AB":  # replica B: a deep copy of the initial chunk, as the simulator
                if self._place[(rep, c)] == self.rank:
                    mine[(rep, c)] = module if rep == "A" else copy_chunk(module)
        self.copies = _copy_workers(mine, make_optimizer, spec, k, m, u)
        self._real = {key: w.optimizer.step for key, w in self.copies.items()}
        self._syncs = dict.fromkeys(self.copies, 0)
        for key, w in self.copies.items():
            w.optimizer.step = (lambda _key=key: self._step(_key))  # type: ignore[method-assign]
        self._sends: list[tuple[Any, Tensor]] = []

    # ------------------------------------------------------------------ messages
    def _tag(self, kind: str, rep: str, c: int, i: int) -> int:
        s, m = 2 * self.num_ranks, self.n_microbatches
        return 1 + ((_KINDS[kind] * 2 + (rep == "B")) * s + c) * m + i

    def _send(self, t: Tensor, dst: int, tag: int, header: bool = True) -> None:
        t = t.detach().contiguous()
        if header:
            if t.dtype not in _DTYPES or t.dim() > _MAX_DIMS:
                raise ValueError(f"BitPipeRuntime sends tensors of {_DTYPES} with at most "
                                 f"{_MAX_DIMS} dimensions, got {t.dtype} {tuple(t.shape)}")
            head = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
            head[0], head[1] = t.dim(), _DTYPES.index(t.dtype)
            head[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            self._sends.append((dist.isend(head, dst, tag=tag), head))
        self._sends.append((dist.isend(t, dst, tag=tag), t))

    def _recv(self, src: int, tag: int, like: Tensor | None = None) -> Tensor:
        if like is None:
            head = torch.empty(2 + _MAX_DIMS, dtype=torch.int64)
            dist.recv(head, src, tag=tag)
            n = int(head[0])
            buf = torch.empty([int(x) for x in head[2:2 + n]], dtype=_DTYPES[int(head[1])])
        else:
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        dist.recv(buf, src, tag=tag)
        return buf

    # ------------------------------------------------------------------ eager synchronisation
    @torch.no_grad()
    def _step(self, key: tuple[str, int]) -> None:
        rep, c = key
        other = "B" if rep == "A" else "A"
        peer = self._place[(other, c)]
        w = self.copies[key]
        j = self._syncs[key]
        self._syncs[key] += 1
        tag = self._tag("sync", "A", c, j)
        mine = [None if p.grad is None else p.grad.detach() for p in w.params]
        mask = torch.tensor([g is not None for g in mine], dtype=torch.uint8)
        self._send(mask, peer, tag, header=False)
        groups: dict[torch.dtype, list[int]] = {}  # one message per dtype, not per tensor
        for i, g in enumerate(mine):
            if g is not None:
                groups.setdefault(g.dtype, []).append(i)
        for idx in groups.values():
            self._send(torch.cat([mine[i].reshape(-1) for i in idx]), peer, tag, header=False)
        if not torch.equal(self._recv(peer, tag, like=mask), mask):
            raise RuntimeError(f"chunk {c}: the two copies have gradients for different "
                               "parameters")
        theirs: list[Tensor | None] = [None] * len(mine)
        for dtype, idx in groups.items():
            sizes = [mine[i].numel() for i in idx]
            flat = self._recv(peer, tag, like=torch.empty(sum(sizes), dtype=dtype))
            for i, part in zip(idx, flat.split(sizes)):
                theirs[i] = part.view(mine[i].shape)
        # the step and the method's after-step corrections see the mean (the worker clears it)
        for p, g in zip(w.params, _pair_mean(rep, mine, theirs)):
            p.grad = g
        self._real[key]()

    # ------------------------------------------------------------------ one step
    def step(self, x: Tensor | None = None, y: Tensor | None = None) -> dict[int, float]:
        """Run this rank's actions of one step.

        Args:
            x: The batch (``n_microbatches`` equal micro-batches), on the ranks holding a
                replica's first or last chunk (``0`` and ``K - 1``).
            y: Its targets, on the same ranks.

        Returns:
            ``{micro-batch: loss}`` for the micro-batches whose last chunk is on this rank.

        Raises:
            ValueError: a batch missing on a rank that needs it, or not divisible.
        """
        m, last, half = self.n_microbatches, 2 * self.num_ranks - 1, self.n_microbatches // 2
        needs = any(c in (0, last) for _, c in self.copies)
        xs: Sequence[Tensor] = ()
        ys: Sequence[Tensor] = ()
        if needs:
            if x is None or y is None:
                raise ValueError(f"rank {self.rank} holds a first or last chunk: step() needs "
                                 "the batch x and the targets y")
            if x.shape[0] != y.shape[0] or x.shape[0] == 0 or x.shape[0] % m:
                raise ValueError(f"x and y need the same batch size, a positive multiple of "
                                 f"n_microbatches ({m})")
            size = x.shape[0] // m
            xs, ys = x.split(size), y.split(size)
        kept: dict[tuple[str, int, int], Tensor] = {}  # outputs / input grads for local peers
        losses: dict[int, Tensor] = {}
        try:
            for a in self.actions:
                c, i = a.stage, a.microbatch
                rep = replica_of(i, m)
                w, local = self.copies[(rep, c)], i - (half if rep == "B" else 0)
                if a.kind == "F":
                    if c == 0:
                        inp = xs[i]
                    elif self._place[(rep, c - 1)] == self.rank:
                        inp = kept.pop(("act", c - 1, i))
                    else:
                        inp = self._recv(self._place[(rep, c - 1)], self._tag("act", rep, c - 1, i))
                    out = w.forward(local, inp)
                    if c == last:
                        losses[i] = self.loss_fn(out, ys[i])
                    elif self._place[(rep, c + 1)] == self.rank:
                        kept[("act", c, i)] = out
                    else:
                        self._send(out, self._place[(rep, c + 1)], self._tag("act", rep, c, i))
                else:
                    if c == last:
                        g = w.backward(local, loss=losses[i])
                    else:
                        if self._place[(rep, c + 1)] == self.rank:
                            go = kept.pop(("grad", c + 1, i))
                        else:
                            go = self._recv(self._place[(rep, c + 1)],
                                            self._tag("grad", rep, c + 1, i))
                        g = w.backward(local, grad_output=go)
                    if c > 0:
                        if self._place[(rep, c - 1)] == self.rank:
                            kept[("grad", c, i)] = g[0]
                        else:
                            self._send(g[0], self._place[(rep, c - 1)],
                                       self._tag("grad", rep, c, i))
        finally:
            for work, _ in self._sends:
                work.wait()
            self._sends.clear()
        return {i: float(v.detach()) for i, v in sorted(losses.items())}
