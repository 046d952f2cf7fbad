"""The pipeline contract of a LightningModule, and the batches the pipeline is fed.

A module written for one device needs one more method, ``pipeline_stages()``: its model as
consecutive stage modules. Optionally ``pipeline_inputs(batch)`` says what stage 0 receives
(default: ``batch[0]`` of a tuple or list batch, or the batch itself when it is a Tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from .errors import PipelineContractError

__all__ = [
    "batch_fingerprint",
    "default_pipeline_inputs",
    "pipeline_inputs_of",
    "pipeline_stages_of",
    "same_tensors",
    "split_batch",
    "tensor_leaves",
]


def pipeline_stages_of(module: Any) -> list[nn.Module]:
    """Check the pipeline contract of a LightningModule and return its stage modules.

    The module must define ``pipeline_stages() -> Sequence[nn.Module]`` returning its model as
    consecutive stages made of its own submodules (registered ones, or containers of them such
    as ``nn.Sequential(self.embed, self.blocks[0])``), disjoint, without tied weights.

    Raises:
        PipelineContractError: what is missing or wrong, and what to do.
    """
    name = type(module).__name__
    fn = getattr(module, "pipeline_stages", None)
    if not callable(fn):
        raise PipelineContractError(
            f"{name} must define pipeline_stages() -> Sequence[nn.Module], returning its model "
            "as consecutive stage modules (stage k's output is stage k+1's input), e.g. "
            "`return self.stages` with `self.stages = nn.ModuleList([...])`")
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
    registered = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    missing = [k for k, m in enumerate(stages)
               if any(id(t) not in registered for t in (*m.parameters(), *m.buffers()))]
    if missing:
        raise PipelineContractError(
            f"stage(s) {missing} of {name}.pipeline_stages() hold parameters or buffers that "
            "are not the LightningModule's (so not in its state_dict or checkpoints): build "
            "the stages from its registered submodules, e.g. self.stages = "
            "nn.ModuleList([...]) or nn.Sequential(self.embed, self.blocks[0])")
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
    return stages


def default_pipeline_inputs(batch: Any) -> Any:
    """Stage 0's input by default: ``batch[0]`` of a tuple or list, or a Tensor batch itself."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise PipelineContractError(
        f"cannot tell the model's input from a batch of type {type(batch).__name__}: define "
        "pipeline_inputs(batch) on the LightningModule, returning the Tensor (or tuple of "
        "Tensors) that stage 0 receives (what the steps pass to self(...))")


def pipeline_inputs_of(module: Any, batch: Any) -> tuple[Tensor, ...]:
    """Stage 0's positional inputs for ``batch``: ``module.pipeline_inputs(batch)`` as a tuple.

    Raises:
        PipelineContractError: not a Tensor or a tuple of Tensors.
    """
    fn = getattr(module, "pipeline_inputs", None)
    x = fn(batch) if callable(fn) else default_pipeline_inputs(batch)
    xs = (x,) if isinstance(x, Tensor) else tuple(x) if isinstance(x, (tuple, list)) else None
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise PipelineContractError(
            f"the model's input (pipeline_inputs(batch)) must be a Tensor or a tuple of Tensors, "
            f"got {type(x).__name__}; define pipeline_inputs(batch) on the LightningModule")
    return xs


def tensor_leaves(obj: Any) -> list[Tensor]:
    """The tensors of a nested tuple / list / dict, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensor_leaves(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in tensor_leaves(o)]
    return []


def split_batch(batch: Any, n: int, size: int) -> list[Any]:
    """``batch`` cut into ``n`` equal micro-batches along dim 0, as torch's schedules cut it.

    Every Tensor whose first dimension is ``size`` is split (``tensor_split``, like torch's
    ``TensorChunkSpec(0)``); everything else is passed to every micro-batch unchanged.
    """
    def part(i: int) -> Any:
        def cut(t: Tensor) -> Tensor:
            return t.tensor_split(n)[i] if t.ndim and t.shape[0] == size else t
        return apply_to_collection(batch, Tensor, cut)

    return [part(i) for i in range(n)]


def batch_fingerprint(batch: Any) -> list[float]:
    """A few numbers that differ, in practice, between two different batches."""
    out: list[float] = []
    for t in tensor_leaves(batch):
        out.append(float(t.shape[0]) if t.ndim else 0.0)
        out.append(float(t.detach().double().sum()) if t.numel() else 0.0)
    return out or [0.0]


def same_tensors(got: Sequence[Any], want: Sequence[Tensor]) -> bool:
    """Whether ``got`` are the tensors ``want`` (the same objects, or equal values)."""
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a is b:
            continue
        if not isinstance(a, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not torch.equal(a.detach().to(b.device), b.detach()):
            return False
    return True
