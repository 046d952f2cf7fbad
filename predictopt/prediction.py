r"""The prediction engine: applies a rule's directions to the weights with ``_foreach`` kernels.

For every parameter group, split by device and dtype, the rule (see `predictopt.rules`)
returns directions $D$ per unit learning rate; the engine forms

$$
\hat w = a\,w - C\,D
$$

with $a$ and $C$ from the future learning rates $\eta_1..\eta_s$ and the
decoupled decay $\lambda$ (`coefficients`). `predict` returns new tensors and
changes nothing; `predict_` writes the prediction into the parameters and returns the saved
real values, which `restore_` copies back bit for bit (never "adding the step back":
``w - x + x != w`` in floating point).

Memory: each (group, device, dtype) bucket is processed in chunks of at most
``min(64 MiB, total / 16)`` parameter bytes (``total``: all predicted parameters; a tensor larger
than that is a chunk of its own), so a rule's temporaries (Adam's denominators, RAdam's
rectified directions) exist for one chunk at a time: the peak above the parameters is the saved
copy plus one chunk's temporaries, instead of the saved copy plus the temporaries of every tensor.
Within a chunk the foreach kernels still process many small tensors per call. Chunking changes no
value: every kernel works tensor by tensor.

Passes: on CPU, a large contiguous tensor is predicted one tensor at a time, straight into the
tensor the caller gets (or in place, for `predict_`): $a w$ by ``torch.mul(..., out=)`` (skipped
when $a = 1$) and the direction by one ``addcdiv``/``add`` (``out=`` when $a = 1$); Adam's
denominator $\sqrt{v}/r + \epsilon$ is formed in one scratch buffer reused for every tensor
(`SqrtQuotient`). Every kernel is the one the former engine ran (on CPU ``_foreach`` kernels run
tensor by tensor), in the same order on the same operands, so the bits are those of the plain
formulation, `reference_predict`, which the tests compare it with. Small tensors and other
devices keep the ``_foreach`` kernels (many tensors per call; on CUDA one launch for all).

Complex parameters are predicted through their real views (``torch.view_as_real``), with the
state's complex tensors viewed the same way, as torch's optimizers compute their updates: the
prediction of a complex parameter equals that of its real twin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .rules import (
    PredictionRule,
    Quotient,
    Scaled,
    SqrtQuotient,
    _adam_denominators,
    _check_steps,
    _value,
    get_rule,
)
from .workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import PredictiveOptimizer

__all__ = ["coefficients", "predict", "predict_", "reference_predict", "restore_"]

#: Upper bound on the parameter bytes of one chunk (see the module docstring).
CHUNK_BYTES = 64 * 2**20
#: A chunk holds at most this fraction of all the predicted parameters' bytes.
CHUNK_FRACTION = 16
#: Contiguous CPU tensors of at least this many elements are predicted one by one with ``out=``
#: kernels straight into their output (no copy pass, Adam's denominator in a reused scratch
#: buffer); smaller ones, and tensors on other devices, with ``_foreach`` kernels over the chunk.
PER_TENSOR_NUMEL = 1 << 15

def coefficients(lrs: Sequence[float], decay: float = 0.0) -> tuple[float, float]:
    r"""The coefficients $(a, C)$ of $\hat w = a w - C D$ for the given future lrs.

    Each future update is $w \leftarrow (1-\eta_j\lambda) w - \eta_j D$, so
    $a = \prod_j (1-\eta_j\lambda)$ and $C_j = (1-\eta_j\lambda) C_{j-1} + \eta_j$.
    With equal learning rates and $\lambda = 0$, $a = 1$ and $C = s\eta$
    exactly (computed as one product, not a sum of ``s`` terms).

    Args:
        lrs: The learning rates of the ``s`` future updates.
        decay: The decoupled weight decay $\lambda$.
    """
    lrs = [float(x) for x in lrs]
    if not lrs:
        return 1.0, 0.0
    if decay == 0.0 and all(x == lrs[0] for x in lrs):
        return 1.0, len(lrs) * lrs[0]
    a, c = 1.0, 0.0
    for lr in lrs:
        f = 1.0 - lr * decay
        a, c = a * f, c * f + lr
    return a, c


def _unwrap(optimizer: Any, rule: Any) -> tuple[Optimizer, PredictionRule]:
    inner = getattr(optimizer, "_predictopt_inner", None)
    if inner is not None:
        return inner, (optimizer.rule if rule is None else get_rule(rule, inner))
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or a PredictiveOptimizer, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer, get_rule(rule, optimizer)


def _scaled(a: Any, c: Any, alpha: float) -> tuple[Any, Any]:
    r"""$(a, C)$ of the calibrated prediction $w + \alpha(\hat w - w)$:
    $(1 + \alpha(a-1),\ \alpha C)$ (elementwise for per-tensor lists)."""
    if alpha == 1.0:
        return a, c
    if isinstance(a, list):
        return [1.0 + alpha * (x - 1.0) for x in a], [alpha * x for x in c]
    return 1.0 + alpha * (a - 1.0), alpha * c


def _real(t: Any) -> Any:
    return torch.view_as_real(t) if isinstance(t, Tensor) and t.is_complex() else t


def _real_state(st: dict) -> dict:
    if not any(isinstance(v, Tensor) and v.is_complex() for v in st.values()):
        return st
    return {k: _real(v) for k, v in st.items()}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks(ps: list[Tensor], budget: int) -> Iterator[slice]:
    start, size = 0, 0
    for i, p in enumerate(ps):
        b = _nbytes(p)
        if i > start and size + b > budget:
            yield slice(start, i)
            start, size = i, 0
        size += b
    if start < len(ps):
        yield slice(start, len(ps))


def _work(optimizer: Optimizer, rule: PredictionRule, steps: int,
          lrs: Sequence[Sequence[float]] | None = None, scales: Sequence[float] | None = None,
          groups: set[int] | None = None
          ) -> Iterator[tuple[int, list[Tensor], list[Tensor], Any, Any, Any]]:
    """The work of one prediction, one chunk at a time (directions computed lazily, so that only
    one chunk's temporaries are alive): ``(group index, params, targets, directions, a, C)``.

    ``targets`` are the tensors the prediction is computed on: the parameters, or the real views
    of complex ones. ``a`` and ``C`` are floats, or per-tensor lists for rules that override
    `PredictionRule.tensor_coefficients`; ``scales`` (per group, calibration) scale the whole
    displacement, $w + \\alpha(\\hat w - w)$.
    """
    if steps == 0:
        return
    todo = []
    for gi, group in enumerate(optimizer.param_groups):
        if groups is not None and gi not in groups:
            continue
        group_lrs = list(lrs[gi]) if lrs is not None else [_value(group["lr"])] * steps
        a, c = coefficients(group_lrs, rule.decoupled_decay(group))
        if c == 0.0 and a == 1.0:
            continue
        todo.append((gi, group, group_lrs, a, c))
    total = sum(_nbytes(p) for _, g, *_ in todo for p in g["params"])
    budget = max(1, min(CHUNK_BYTES, total // CHUNK_FRACTION))
    for gi, group, group_lrs, a, c in todo:
        alpha = 1.0 if scales is None else float(scales[gi])
        grouped = _group_tensors_by_device_and_dtype([group["params"]])
        for (_device, _dtype), ((ps,), _idx) in grouped.items():
            targets = [_real(p) for p in ps]
            pieces = _chunks(targets, budget) if rule.per_tensor else [slice(0, len(ps))]
            for piece in pieces:
                chunk_ps, chunk_targets = ps[piece], targets[piece]
                states = [_real_state(optimizer.state.get(p, {})) for p in chunk_ps]
                ts, ds = rule.directions(group, chunk_targets, states)
                if not ts:
                    continue
                index = {id(t): i for i, t in enumerate(chunk_targets)}
                picked = [index[id(t)] for t in ts]
                originals = [chunk_ps[i] for i in picked]
                coef = rule.tensor_coefficients(group, ts, _tensors(ds),
                                                [states[i] for i in picked], group_lrs)
                ta, tc = _scaled(*((a, c) if coef is None else coef), alpha)
                if _is_identity(ta, tc):
                    continue
                yield gi, originals, list(ts), ds, ta, tc
                del ts, ds  # free this chunk's temporaries before computing the next chunk's


def _is_identity(a: Any, c: Any) -> bool:
    if isinstance(a, list):
        return all(x == 1.0 for x in a) and all(x == 0.0 for x in c)
    return a == 1.0 and c == 0.0


def _tensors(ds: Any) -> Any:
    return ds.tensors if isinstance(ds, Scaled) else ds


# ---------------------------------------------------------------------------------------------
# The kernels: w_hat = a w - C D, into an output (or in place)
# ---------------------------------------------------------------------------------------------


def _pick(x: Any, idx: list[int]) -> Any:
    """The entries ``idx`` of a per-tensor list, or of a direction (scalars stay as they are)."""
    if isinstance(x, list):
        return [x[i] for i in idx]
    if isinstance(x, Quotient):
        return Quotient(*(_pick(f, idx) for f in x))
    if isinstance(x, SqrtQuotient):
        return SqrtQuotient(_pick(x.numerators, idx), _pick(x.second_moments, idx),
                            _pick(x.roots, idx), x.eps, _pick(x.divisors, idx))
    if isinstance(x, Scaled):
        return Scaled(_pick(x.tensors, idx), _pick(x.scales, idx))
    return x


def _materialised(ds: Any) -> Any:
    """``ds`` with an `SqrtQuotient` turned into the `Quotient` of its denominators."""
    if isinstance(ds, SqrtQuotient):
        return Quotient(ds.numerators, _adam_denominators(ds.second_moments, ds.roots, ds.eps),
                        ds.divisors)
    return ds


def _operands(ds: Any) -> list[list[Tensor]]:
    """The tensors a direction reads, one list per tensor of the chunk."""
    if isinstance(ds, Quotient):
        return [list(x) for x in zip(ds.numerators, ds.denominators)]
    if isinstance(ds, SqrtQuotient):
        return [list(x) for x in zip(ds.numerators, ds.second_moments)]
    return [[t] for t in _tensors(ds)]


def _reference_apply_(targets: list[Tensor], ds: Any, a: Any, c: Any) -> None:
    """The plain formulation, in place on ``targets``: ``_foreach`` kernels over the chunk, the
    denominators of an `SqrtQuotient` materialised. It is what the engine ran before the
    per-tensor kernels, and what they are tested against bit for bit (`reference_predict`)."""
    ds = _materialised(ds)
    if isinstance(a, list):
        if any(x != 1.0 for x in a):
            torch._foreach_mul_(targets, a)
    elif a != 1.0:
        torch._foreach_mul_(targets, a)
    cs = c if isinstance(c, list) else None
    if isinstance(ds, Quotient):
        values = ([-x / q for x, q in zip(cs, ds.divisors)] if cs is not None
                  else [-c / q for q in ds.divisors])
        torch._foreach_addcdiv_(targets, ds.numerators, ds.denominators, values)
    elif isinstance(ds, Scaled) or cs is not None:
        tensors = _tensors(ds)
        ks = ds.scales if isinstance(ds, Scaled) else [1.0] * len(tensors)
        for t, d, k, ci in zip(targets, tensors, ks, cs if cs is not None else [c] * len(ks)):
            t.add_(d, alpha=-(ci * k))
    else:
        torch._foreach_add_(targets, ds, alpha=-c)


def _one(out: Tensor, w: Tensor, ds: Any, i: int, ai: float, ci: float,
         scratch: Workspace) -> None:
    r"""``out = a_i w - C_i D_i`` for tensor ``i`` of the chunk, with the kernels (and so the
    bits) of `_reference_apply_`: $a_i w$ by ``mul`` unless $a_i = 1$, then one ``addcdiv`` or
    ``add``, out of place into ``out`` when $a_i = 1$ (``out`` may be ``w``)."""
    if ai != 1.0:
        torch.mul(w, ai, out=out)
        w = out
    if isinstance(ds, (Quotient, SqrtQuotient)):
        if isinstance(ds, SqrtQuotient):
            v = ds.second_moments[i]
            den = scratch.scratch(v.numel(), v.dtype, v.device).view(v.shape)
            torch.sqrt(v, out=den)
            den.div_(ds.roots[i])
            den.add_(ds.eps)
        else:
            den = ds.denominators[i]
        torch.addcdiv(w, ds.numerators[i], den, value=-ci / ds.divisors[i], out=out)
    else:
        k = ds.scales[i] if isinstance(ds, Scaled) else 1.0
        torch.add(w, _tensors(ds)[i], alpha=-(ci * k), out=out)


def _apply(outs: list[Tensor], targets: list[Tensor], ds: Any, a: Any, c: Any,
           scratch: Workspace) -> None:
    """``outs[i] = a_i targets[i] - C_i D_i`` for one chunk; ``outs`` may be ``targets`` (in
    place). Large contiguous CPU tensors one by one (`_one`), the others with the ``_foreach``
    kernels of `_reference_apply_`; the same bits either way."""
    n = len(targets)
    inplace = outs is targets
    ops = _operands(ds)
    big = [i for i, t in enumerate(targets)
           if t.device.type == "cpu" and t.numel() >= PER_TENSOR_NUMEL and t.is_contiguous()
           and outs[i].is_contiguous() and all(x.is_contiguous() for x in ops[i])]
    chosen = set(big)
    rest = [i for i in range(n) if i not in chosen] if big else list(range(n))
    al = a if isinstance(a, list) else [a] * n
    cl = c if isinstance(c, list) else [c] * n
    for i in big:
        _one(outs[i], targets[i], ds, i, float(al[i]), float(cl[i]), scratch)
    if rest:
        sub = targets if len(rest) == n else [targets[i] for i in rest]
        out = sub if inplace else (outs if len(rest) == n else [outs[i] for i in rest])
        if not inplace:
            torch._foreach_copy_(out, sub)
        if len(rest) == n:
            _reference_apply_(out, ds, a, c)
        else:
            _reference_apply_(out, _pick(ds, rest), _pick(a, rest), _pick(c, rest))


def _empty(ts: list[Tensor]) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.preserve_format) for t in ts]


def _check_workspace(workspace: Any) -> Workspace | None:
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be None or a predictopt.workspace.Workspace, got "
                        f"{type(workspace).__name__}")
    return workspace


def _prepare(optimizer: Any, steps: int, rule: Any, lrs: Any) -> tuple[Any, ...]:
    """What `predict` and `reference_predict` start from: the bare optimizer, the rule, the
    future lrs (checked, or the wrapper's schedule), the calibration scales and the result
    dict with every parameter mapped to itself (detached)."""
    inner, rule_obj = _unwrap(optimizer, rule)
    if lrs is not None:
        _check_group_lrs(lrs, inner, steps)
    elif inner is not optimizer:
        lrs = optimizer._future_lrs(steps)
    result: dict[Tensor, Tensor] = {
        p: p.detach() for g in inner.param_groups for p in g["params"]
    }
    scales = optimizer._calibration_scales(steps) if inner is not optimizer else None
    return inner, rule_obj, lrs, scales, result


@torch.no_grad()
def predict(optimizer: Optimizer | PredictiveOptimizer, steps: int, *,
            rule: str | PredictionRule | None = None,
            lrs: Sequence[Sequence[float]] | None = None,
            workspace: Workspace | None = None) -> dict[Tensor, Tensor]:
    r"""The predicted value of every parameter, $\hat w(s)$, changing nothing.

    Each predicted tensor is computed in one kernel sequence straight into the tensor returned
    (see the module docstring); the bits are those of `reference_predict`.

    Args:
        optimizer: A bare ``torch.optim.Optimizer`` or a `PredictiveOptimizer` (whose
            rule, scheduler and calibration are then used unless ``rule`` is given).
        steps: The horizon ``s >= 0``.
        rule: A rule name or object; default: the wrapper's rule, else the optimizer's default.
        lrs: Per parameter group, the ``s`` future learning rates (schedule-aware prediction).
        workspace: A `predictopt.workspace.Workspace` to take the output tensors (key
            ``("predict", p)``) and the scratch space from, so that repeated predictions reuse
            their memory; default: fresh tensors.

    Returns:
        A dict from each parameter to a tensor without autograd history: a new tensor holding
        $\hat w$ where the rule has a direction, else ``p.detach()`` (the current value,
        sharing storage). Feed it to `torch.func.functional_call`.

    Raises:
        TypeError: ``workspace`` is not a ``Workspace``.
    """
    steps = _check_steps(steps)
    ws = _check_workspace(workspace)
    inner, rule_obj, lrs, scales, result = _prepare(optimizer, steps, rule, lrs)
    scratch = ws if ws is not None else Workspace()
    for _gi, ps, targets, ds, a, c in _work(inner, rule_obj, steps, lrs, scales):
        if ws is None:
            bufs = _empty(ps)
        else:
            bufs = [ws.buffer(("predict", p), p) for p in ps]
        outs = [_real(b) for b in bufs]
        _apply(outs, targets, ds, a, c, scratch)
        result.update(zip(ps, bufs))
        del ds
    return result


@torch.no_grad()
def reference_predict(optimizer: Optimizer | PredictiveOptimizer, steps: int, *,
                      rule: str | PredictionRule | None = None,
                      lrs: Sequence[Sequence[float]] | None = None) -> dict[Tensor, Tensor]:
    """`predict` in the plain formulation: an exact copy of the parameters, then the
    ``_foreach`` kernels of the whole chunk in place on it, the denominators materialised
    (the engine before the per-tensor kernels). Slower; kept as the reference the engine is
    tested against bit for bit. Arguments as `predict`."""
    steps = _check_steps(steps)
    inner, rule_obj, lrs, scales, result = _prepare(optimizer, steps, rule, lrs)
    for _gi, ps, targets, ds, a, c in _work(inner, rule_obj, steps, lrs, scales):
        out = _copy(targets)
        _reference_apply_(out, ds, a, c)
        result.update((p, torch.view_as_complex(o) if p.is_complex() else o)
                      for p, o in zip(ps, out))
        del ds
    return result


def _copy(ps: list[Tensor]) -> list[Tensor]:
    return torch._foreach_mul(ps, 1.0)  # exact copy (x * 1.0 == x bit for bit), one kernel


@torch.no_grad()
def predict_(optimizer: Optimizer, rule: PredictionRule, steps: int,
             lrs: Sequence[Sequence[float]] | None = None,
             scales: Sequence[float] | None = None) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Write the prediction into the parameters in place; return ``(targets, saved)`` pairs.

    Holds one copy of the predicted parameters (the saved real values) until `restore_`;
    while computing, one chunk's temporaries (see the module docstring), freed chunk by chunk.
    The in-place writes bump the parameters' version counters, so an autograd graph built on
    the predicted weights cannot silently be back-propagated after the restore.
    """
    saved = []
    scratch = Workspace()
    for _gi, _ps, targets, ds, a, c in _work(optimizer, rule, steps, lrs, scales):
        real = _copy(targets)
        _apply(targets, targets, ds, a, c, scratch)
        saved.append((targets, real))
        del ds
    return saved


@torch.no_grad()
def displacements(optimizer: Optimizer, rule: PredictionRule, steps: int,
                  lrs: Sequence[Sequence[float]] | None = None, groups: set[int] | None = None
                  ) -> dict[int, tuple[list[Tensor], list[Tensor], list[Tensor]]]:
    r"""The uncalibrated displacement $P = \hat w(s) - w$ of every predicted parameter, per
    group index (only those in ``groups`` if given): ``{group: (params, targets, P)}``
    (``targets``: the parameters or, for complex ones, their real views, on which $P$ is
    expressed). Changes nothing; the temporaries are those of one chunk at a time, the result
    one copy of the predicted parameters."""
    out: dict[int, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    scratch = Workspace()
    for gi, ps, targets, ds, a, c in _work(optimizer, rule, steps, lrs, groups=groups):
        disp = _empty(targets)
        _apply(disp, targets, ds, a, c, scratch)
        torch._foreach_sub_(disp, targets)
        del ds
        pp, ts, dd = out.setdefault(gi, ([], [], []))
        pp.extend(ps)
        ts.extend(targets)
        dd.extend(disp)
    return out


@torch.no_grad()
def restore_(saved: list[tuple[list[Tensor], list[Tensor]]]) -> None:
    """Copy the saved real values back into the parameters, bit for bit."""
    for ps, real in saved:
        torch._foreach_copy_(ps, real)


def _check_group_lrs(lrs: Sequence[Sequence[float]], optimizer: Optimizer, steps: int) -> None:
    if len(lrs) != len(optimizer.param_groups) or any(len(x) != steps for x in lrs):
        raise ValueError(
            f"lrs must hold, for each of the {len(optimizer.param_groups)} parameter groups, "
            f"a sequence of {steps} learning rates (one per predicted step)"
        )
