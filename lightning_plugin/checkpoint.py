"""Checkpoints in the format of a single-device run, assembled from the stages' optimizers.

``checkpoint["optimizer_states"][0]`` is what ``optimizer.state_dict()`` of the optimizer
``configure_optimizers`` returned would be on one device: the stages' states renumbered by the
position of their parameters in that optimizer, its param groups with the current
hyper-parameters. So a checkpoint moves between this strategy and a single device in both
directions, and between schedules and methods. What only a pipeline has (updates made per
stage, ``pipedream-2bw``'s previous weights, the state of a method's transforms such as
DC-ASGD's mean squares or error feedback's estimate, and the param-group entries that belong to
one stage: :data:`STAGE_GROUP_KEYS`) goes under the top-level key :data:`CHECKPOINT_KEY`, which a
single-device run ignores.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from predictopt.optimizer import CALIBRATION_KEY

from .comm import to_cpu
from .errors import PipeOptimConfigError

__all__ = ["CHECKPOINT_KEY", "STAGE_GROUP_KEYS", "assemble", "load_method_state",
           "load_stage_groups", "method_state", "param_index", "stage_groups", "stage_part",
           "stage_state"]

#: Top-level checkpoint key of the pipeline's own state.
CHECKPOINT_KEY = "predictopt_pipeline"
#: Param-group entries that are a stage's own, not the single-device optimizer's: the
#: calibration record of a calibrating method's prediction (each stage fits the horizons of
#: its own delay). They are saved per stage under :data:`CHECKPOINT_KEY`.
STAGE_GROUP_KEYS: tuple[str, ...] = (CALIBRATION_KEY,)


def param_index(optimizer: Optimizer) -> dict[int, int]:
    """``{id(param): i}``: ``i`` numbers the parameters as ``optimizer.state_dict()`` does."""
    out: dict[int, int] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            out.setdefault(id(p), len(out))
    return out


def _local_params(optimizer: Optimizer) -> list[Any]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def stage_part(optimizer: Optimizer, index: Mapping[int, int]) -> dict[str, Any]:
    """One stage optimizer's state, keyed by the single-device parameter numbers (on the CPU)."""
    sd = optimizer.state_dict()
    local = [index[id(p)] for p in _local_params(optimizer)]
    return {
        "state": {local[i]: to_cpu(st) for i, st in sd["state"].items()},
        "groups": [{k: v for k, v in g.items() if k != "params" and k not in STAGE_GROUP_KEYS}
                   for g in sd["param_groups"]],
    }


def stage_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """A stage optimizer's own param-group entries (:data:`STAGE_GROUP_KEYS`), per group."""
    return [{k: copy.deepcopy(g[k]) for k in STAGE_GROUP_KEYS if k in g}
            for g in optimizer.param_groups]


def load_stage_groups(optimizer: Optimizer, saved: list[dict[str, Any]] | None) -> None:
    """Set a stage optimizer's own param-group entries to ``saved`` (:func:`stage_groups`),
    or drop them (``None``: the method starts them afresh)."""
    for i, g in enumerate(optimizer.param_groups):
        for k in STAGE_GROUP_KEYS:
            g.pop(k, None)
        if saved is not None and i < len(saved):
            g.update(copy.deepcopy(saved[i]))


def assemble(parts: list[dict[str, Any]], source: Optimizer, index: Mapping[int, int]
             ) -> dict[str, Any]:
    """The single-device ``state_dict()`` of ``source`` from every stage's :func:`stage_part`.

    Args:
        parts: The parts of all stages (the hyper-parameters are taken from the first).
        source: The optimizer ``configure_optimizers`` returned (its param groups).
        index: :func:`param_index` of ``source``.
    """
    state: dict[int, Any] = {}
    for part in parts:
        state.update(part["state"])
    groups = []
    for g_src, g_hyper in zip(source.param_groups, parts[0]["groups"], strict=True):
        groups.append({**g_hyper, "params": [index[id(p)] for p in g_src["params"]]})
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def stage_state(full: Mapping[str, Any], optimizer: Optimizer, index: Mapping[int, int]
                ) -> dict[str, Any]:
    """A stage optimizer's ``state_dict()`` cut from a single-device one.

    Raises:
        PipeOptimConfigError: the checkpoint's optimizer has other param groups.
    """
    groups = full.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        have = len(groups) if isinstance(groups, list) else "no"
        raise PipeOptimConfigError(
            f"the checkpoint's optimizer state has {have} param group(s), the optimizer of "
            f"configure_optimizers {len(optimizer.param_groups)}: resume with the same "
            "configure_optimizers")
    total = sum(len(g["params"]) for g in groups)
    if total != len(index):
        raise PipeOptimConfigError(
            f"the checkpoint's optimizer covers {total} parameters, the optimizer of "
            f"configure_optimizers {len(index)}: resume with the same model and optimizer")
    state = {}
    out_groups = []
    counter = 0
    for g_full, g_local in zip(groups, optimizer.param_groups):
        out_groups.append({**{k: v for k, v in g_full.items() if k != "params"},
                           "params": list(range(counter, counter + len(g_local["params"])))})
        for p in g_local["params"]:
            st = full["state"].get(index[id(p)])
            if st is not None:
                state[counter] = st
            counter += 1
    return {"state": state, "param_groups": out_groups}


def method_state(worker: Any, index: Mapping[int, int]) -> dict[int, dict[str, Any]]:
    """A stage worker's per-parameter method state (its transforms' ``transform_state``),
    keyed by the single-device parameter numbers, on the CPU."""
    return {index[id(p)]: to_cpu(st) for p, st in worker.transform_state.items() if st}


def load_method_state(worker: Any, saved: Mapping[int, Mapping[str, Any]],
                      index: Mapping[int, int]) -> None:
    """Replace a stage worker's method state with the saved one (:func:`method_state`), copied
    onto each parameter's device."""
    worker.transform_state.clear()
    for p in worker.params:
        st = saved.get(index[id(p)])
        if st:
            worker.transform_state[p] = {
                k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in st.items()}
