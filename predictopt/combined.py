r"""Several optimizers over disjoint parameters, used as one: :class:`CombinedOptimizer`.

Muon updates matrices only, so a model trained with Muon also needs an optimizer for its
embeddings, biases and norms (usually AdamW). A pipeline stage, a
:class:`~predictopt.PredictiveOptimizer` and an LR scheduler each take *one* optimizer:
``CombinedOptimizer([muon, adamw])`` is that optimizer. Its ``param_groups`` are the groups of
its parts, in order (the same dict objects, so a scheduler reaches them), its ``state`` the
union of their states, ``step`` steps every part, and its ``state_dict`` holds theirs. Weight
prediction uses, for every group, the rule of the optimizer that owns it
(:class:`CombinedRule`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .rules import PredictionRule, get_rule, register_rule

__all__ = ["CombinedOptimizer", "CombinedRule"]

# id(group dict) -> (weakref to the part owning it, the group): how a rule finds a group's owner
_OWNERS: dict[int, tuple[weakref.ref, dict]] = {}


class _State(Mapping):
    """The union of the parts' ``state`` mappings (read-only view)."""

    def __init__(self, parts: Sequence[Optimizer]) -> None:
        self._parts = parts

    def __getitem__(self, p: Tensor) -> dict:
        for o in self._parts:
            if p in o.state:
                return o.state[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[Tensor]:
        for o in self._parts:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._parts)

    def __contains__(self, p: object) -> bool:
        return any(p in o.state for o in self._parts)


class CombinedOptimizer(Optimizer):
    """Several ``torch.optim`` optimizers over disjoint parameters acting as one.

    Args:
        optimizers: The parts, each over its own parameters (not a ``PredictiveOptimizer``).

    Raises:
        TypeError: a part is not an optimizer, or is a ``PredictiveOptimizer``.
        ValueError: no part, or a parameter in two parts.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        parts = list(optimizers)
        if not parts:
            raise ValueError("optimizers must hold at least one optimizer")
        seen: set[int] = set()
        for i, o in enumerate(parts):
            if not isinstance(o, Optimizer) or hasattr(o, "_predictopt_inner"):
                raise TypeError(f"optimizers[{i}] must be a bare torch.optim.Optimizer, got "
                                f"{type(o).__name__}")
            for g in o.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError(f"a parameter of shape {tuple(p.shape)} is in two "
                                         "of the optimizers")
                    seen.add(id(p))
        self.optimizers: tuple[Optimizer, ...] = tuple(parts)
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#CombinedOptimizer.zero_grad"
        self._patch_step_function()
        self._register_owners()

    def _register_owners(self) -> None:
        for o in self.optimizers:
            for g in o.param_groups:
                _OWNERS[id(g)] = (weakref.ref(o), g)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The parts' groups, in order (the same dicts)."""
        return [g for o in self.optimizers for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> Mapping[Tensor, dict]:
        """The union of the parts' states."""
        return _State(self.optimizers)

    def __repr__(self) -> str:
        return "CombinedOptimizer(\n" + ",\n".join(f"  {o!r}" for o in self.optimizers) + ")"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step every part (a closure is evaluated once, before)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add the group to one of the combined optimizers "
                        "(CombinedOptimizer.optimizers[i].add_param_group)")

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizers": [part.state_dict(), ...]}``."""
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output.

        Raises:
            ValueError: a state of another number of parts.
        """
        parts = state_dict.get("optimizers")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(f"state_dict must hold 'optimizers': a list of "
                             f"{len(self.optimizers)} optimizer states")
        for o, sd in zip(self.optimizers, parts):
            o.load_state_dict(sd)
        self._register_owners()


def _owner(group: dict[str, Any]) -> Optimizer:
    entry = _OWNERS.get(id(group))
    owner = entry[0]() if entry is not None and entry[1] is group else None
    if owner is None:
        raise RuntimeError("a parameter group of a CombinedOptimizer whose part is unknown; "
                           "was the group replaced outside load_state_dict?")
    return owner


class CombinedRule(PredictionRule):
    """The rule of a :class:`CombinedOptimizer`: every group predicted with the rule of the
    optimizer that owns it (``get_rule(None, part)``). Its ``per_tensor`` is ``True``: the
    parts' rules must be per-tensor too (all built-in rules are)."""

    name = "combined"

    def _rule(self, group: dict[str, Any]) -> PredictionRule:
        return get_rule(None, _owner(group))

    def directions(self, group, params, states):
        return self._rule(group).directions(group, params, states)

    def decoupled_decay(self, group):
        return self._rule(group).decoupled_decay(group)

    def observes(self, group):
        return self._rule(group).observes(group)

    def record(self, group, params, states, before):
        return self._rule(group).record(group, params, states, before)  # type: ignore[attr-defined]

    def records_gradients(self, group):
        return self._rule(group).records_gradients(group)

    def record_gradients(self, group, params, states):
        return self._rule(group).record_gradients(group, params, states)  # type: ignore

    def tensor_coefficients(self, group, params, directions, states, lrs):
        return self._rule(group).tensor_coefficients(group, params, directions, states, lrs)

    def needs_snapshot(self, group):
        return self._rule(group).needs_snapshot(group)


register_rule("combined", CombinedRule(), optimizers=[CombinedOptimizer])
