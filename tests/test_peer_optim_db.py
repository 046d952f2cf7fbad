"""Peer suite: PyTorch's own optimizer configurations (``optim_db``) through the wrapper.

With ``steps=0`` the wrapper must follow the bare optimizer bit for bit (weights and
``state_dict``); with ``steps > 0`` and the same gradients, a prediction round trip before every
step must not change the trajectory either (restore is exact).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from predictopt import PredictiveOptimizer

try:
    from torch.testing._internal.common_optimizers import optim_db
except Exception as exc:  # pragma: no cover - depends on the installed torch
    pytest.skip(f"torch's optim_db is not importable here ({exc})", allow_module_level=True)

CASES = []
for info in optim_db:
    for i, inp in enumerate(info.optim_inputs_func(device="cpu", dtype=torch.float32)):
        CASES.append(pytest.param(info, inp, id=f"{info.optim_cls.__name__}-{i}-{inp.desc}"))


def _params(cls, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3, 5)] if cls.__name__ == "Muon" else [(4, 3), (5,), (2, 2, 2)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _grads(params, gen, sparse):
    gs = [torch.randn(p.shape, generator=gen) for p in params]
    return [g.to_sparse() for g in gs] if sparse else gs


def _run(info, inp, steps, wrap):
    cls = info.optim_cls
    sparse = cls.__name__ == "SparseAdam"
    params = _params(cls, 0)
    kwargs = dict(inp.kwargs)
    if isinstance(kwargs.get("lr"), torch.Tensor):
        kwargs["lr"] = kwargs["lr"].clone()
    opt = cls(params, **kwargs)
    if wrap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = PredictiveOptimizer(opt, steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = _grads(params, gen, sparse)

        def closure(grads=grads):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            return torch.tensor(1.0)

        closure()
        if wrap and steps > 0:
            with opt.predicted():
                pass
        if info.step_requires_closure:
            opt.step(closure)
        else:
            opt.step()
    return params, opt.state_dict()


def _equal(x, y):
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_equal, x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    return x == y


def _assert_state_dicts_equal(a, b, ignore_predictopt=False):
    """Equal state dicts; with ``ignore_predictopt`` the wrapper's own entries (the observed
    average and calibration in ``state``, the calibration record in ``param_groups``) are left
    out, everything else must be equal."""
    def groups(sd):
        return [{k: v for k, v in g.items()
                 if not (ignore_predictopt and k.startswith("predictopt_"))}
                for g in sd["param_groups"]]

    assert _equal(groups(a), groups(b))

    def kept(sd):
        out = {k: {n: v for n, v in st.items()
                   if not (ignore_predictopt and n.startswith("predictopt_"))}
               for k, st in sd.items()}
        return {k: st for k, st in out.items() if st}

    sa, sb = kept(a["state"]), kept(b["state"])
    assert sa.keys() == sb.keys()
    for k in sa:
        assert _equal(sa[k], sb[k]), k


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_steps_zero_is_bitwise_the_bare_optimizer(info, inp):
    bare_params, bare_sd = _run(info, inp, 0, wrap=False)
    params, sd = _run(info, inp, 0, wrap=True)
    for p, q in zip(params, bare_params):
        assert torch.equal(p, q)
    _assert_state_dicts_equal(sd, bare_sd)


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_prediction_round_trips_do_not_change_the_trajectory(info, inp):
    bare_params, bare_sd = _run(info, inp, 0, wrap=False)
    params, sd = _run(info, inp, 3, wrap=True)
    for p, q in zip(params, bare_params):
        assert torch.equal(p, q)
    _assert_state_dicts_equal(sd, bare_sd, ignore_predictopt=True)
