"""The one-pass prediction engine and the `Workspace` (issue 11).

* The engine (per-tensor ``out=`` kernels for large contiguous CPU tensors, ``_foreach`` kernels
  for the rest, Adam's denominator in a reused scratch buffer) gives the bits of the plain
  formulation, `reference_predict`, for every optimizer, shape, layout and dtype drawn; in place
  (``predict_``) too, and ``restore_`` brings back the exact weights.
* A `Workspace` never hands out a buffer something still references (an alias the caller kept, a
  view, a tensor autograd saved for a backward), names the argument on a mismatch, forgets its
  buffers on ``release()``, and allocates every time where torch lacks the storage reference
  count it relies on (``torch._C._storage_Use_Count``, private: pinned below).
* A pipeline run with the workspace reusing buffers is bit-identical to one allocating afresh.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import predictopt.workspace as workspace_mod
from predictopt import PredictiveOptimizer, prediction
from predictopt.prediction import predict, reference_predict
from predictopt.rules import SqrtQuotient, get_rule
from predictopt.workspace import Workspace
from tests._hyp import props

torch.set_num_threads(1)

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "nadam-decoupled": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1,
                                                    decoupled_weight_decay=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}

LAYOUTS = ("contiguous", "transposed", "strided")


def _param(shape: tuple[int, ...], layout: str, dtype: torch.dtype,
           gen: torch.Generator) -> torch.nn.Parameter:
    if layout == "transposed" and len(shape) == 2:  # dense, non-contiguous
        t = torch.randn(shape[::-1], generator=gen).to(dtype).t()
    elif layout == "strided":  # not dense: every other column
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    else:
        t = torch.randn(shape, generator=gen).to(dtype)
    return torch.nn.Parameter(t)


def _trained(opt_name: str, specs: list[tuple[tuple[int, ...], str]], dtype: torch.dtype,
             steps: int = 3, seed: int = 0) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(seed)
    params = [_param(shape, layout, dtype, gen) for shape, layout in specs]
    opt = OPTIMIZERS[opt_name](params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return opt


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].shape == p.shape and a[p].dtype == p.dtype
        assert torch.equal(a[p], b[p]), (tuple(p.shape), p.dtype)


shapes = st.lists(
    st.tuples(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
              st.sampled_from(LAYOUTS)),
    min_size=1, max_size=6)


@pytest.fixture
def small_threshold(monkeypatch):
    """The per-tensor path for tensors of >= 16 elements: both paths on tiny tensors."""
    monkeypatch.setattr(prediction, "PER_TENSOR_NUMEL", 16)


@props(60)
@given(opt_name=st.sampled_from(sorted(OPTIMIZERS)), specs=shapes,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       horizon=st.integers(1, 4), seed=st.integers(0, 3))
def test_engine_equals_reference_bit_for_bit(opt_name, specs, dtype, horizon, seed) -> None:
    if opt_name in ("adamw-fused",) and dtype == torch.bfloat16:
        dtype = torch.float32
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prediction, "PER_TENSOR_NUMEL", 16)
        opt = _trained(opt_name, specs, dtype, seed=seed)
        ref = reference_predict(opt, horizon)
        _assert_equal(predict(opt, horizon), ref)
        ws = Workspace()
        _assert_equal(predict(opt, horizon, workspace=ws), ref)
        _assert_equal(predict(opt, horizon, workspace=ws), ref)  # reused buffers
        # in place, then restored exactly
        popt = PredictiveOptimizer(opt, steps=horizon, calibrate=False)
        real = {p: p.detach().clone() for g in opt.param_groups for p in g["params"]}
        popt.predict_(horizon)
        _assert_equal({p: p.detach() for p in real}, ref)
        popt.restore_()
        _assert_equal({p: p.detach() for p in real}, real)


@pytest.mark.parametrize("opt_name", ["adamw", "nadam", "radam", "sgd-momentum", "adafactor"])
def test_real_threshold_above_and_below(opt_name) -> None:
    """Tensors above and below the actual PER_TENSOR_NUMEL, contiguous and not, one group."""
    big = prediction.PER_TENSOR_NUMEL
    specs = [((big + 7,), "contiguous"), ((3, big // 2), "contiguous"),
             ((big // 64, 65), "transposed"), ((40, 30), "contiguous"), ((5,), "contiguous"),
             ((200, 100), "strided")]
    opt = _trained(opt_name, specs, torch.float32, steps=2)
    for horizon in (1, 3):
        ref = reference_predict(opt, horizon)
        _assert_equal(predict(opt, horizon), ref)
        popt = PredictiveOptimizer(opt, steps=horizon, calibrate=False)
        real = {p: p.detach().clone() for g in opt.param_groups for p in g["params"]}
        popt.predict_(horizon)
        _assert_equal({p: p.detach() for p in real}, ref)
        popt.restore_()
        _assert_equal({p: p.detach() for p in real}, real)


def test_schedule_calibration_complex_and_groups(small_threshold) -> None:
    """Per-group future lrs, the calibrated wrapper (scaled coefficients), several groups and
    complex parameters: still the reference's bits."""
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(8, 8, generator=gen))
    b = torch.nn.Parameter(torch.randn(40, generator=gen, dtype=torch.complex64))
    c = torch.nn.Parameter(torch.randn(3, generator=gen))
    opt = torch.optim.AdamW([{"params": [a, b]}, {"params": [c], "lr": 3e-3}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    popt = PredictiveOptimizer(opt, steps=2)  # calibrated by default
    popt.attach_scheduler(sched)
    for _ in range(4):
        for p in (a, b, c):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        popt.step()
        sched.step()
    _assert_equal(predict(popt, 2), reference_predict(popt, 2))
    lrs = [[1e-2, 5e-3], [1e-3, 1e-3]]
    _assert_equal(predict(opt, 2, lrs=lrs), reference_predict(opt, 2, lrs=lrs))


def test_adam_direction_is_unmaterialised() -> None:
    """Adam-style rules hand the engine the second moments, not weight-sized denominators."""
    opt = _trained("adamw", [((4, 4), "contiguous")], torch.float32)
    g = opt.param_groups[0]
    ps = g["params"]
    _, ds = get_rule(None, opt).directions(g, ps, [opt.state[p] for p in ps])
    assert isinstance(ds, SqrtQuotient)
    assert ds.second_moments[0] is opt.state[ps[0]]["exp_avg_sq"]


def test_predict_returns_workspace_buffers_and_rejects_other_types() -> None:
    opt = _trained("adamw", [((64, 64), "contiguous")], torch.float32)
    ws = Workspace()
    first = predict(opt, 1, workspace=ws)
    p = opt.param_groups[0]["params"][0]
    held = first[p]
    second = predict(opt, 1, workspace=ws)
    # the first result is still referenced: the second must not overwrite it
    assert held.data_ptr() != second[p].data_ptr()
    assert torch.equal(held, second[p])
    del first, held, second
    third = predict(opt, 1, workspace=ws)[p]  # reused once dropped: no third buffer
    assert third.data_ptr() in _kept_ptrs(ws, ("predict", p))
    assert len(ws._buffers[("predict", p)]) == 2
    with pytest.raises(TypeError, match="workspace must be None or a predictopt"):
        predict(opt, 1, workspace={})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------------------------


def test_torch_storage_use_count_is_present_and_counts() -> None:
    """The workspace's one private torch API (``torch._C._storage_Use_Count``), pinned: a torch
    release that drops or changes it fails here (the workspace then allocates every time)."""
    assert callable(getattr(torch._C, "_storage_Use_Count", None))
    assert workspace_mod._use_count is torch._C._storage_Use_Count
    t = torch.empty(10)
    base = workspace_mod._refs(t)
    alias = t.detach()
    view = t[2:5]
    assert workspace_mod._refs(t) == base + 2
    del alias
    assert workspace_mod._refs(t) == base + 1
    del view
    assert workspace_mod._refs(t) == base
    assert Workspace().reuses


def test_buffer_kept_alias_is_never_reused() -> None:
    ws = Workspace()
    like = torch.zeros(5, 6)
    a = ws.buffer("k", like)
    a.fill_(1.0)
    b = ws.buffer("k", like)  # a is still held: a different buffer
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    b.fill_(2.0)
    assert torch.equal(a, torch.ones(5, 6))
    view = a[1]
    ptr = a.data_ptr()
    del a
    c = ws.buffer("k", like)  # a's storage is still referenced by the view
    assert c.data_ptr() != ptr
    c.fill_(3.0)
    assert torch.equal(view, torch.ones(6))
    del view, b, c
    assert ws.buffer("k", like).data_ptr() in _kept_ptrs(ws, "k")


def test_buffer_saved_by_autograd_is_never_reused() -> None:
    ws = Workspace()
    like = torch.zeros(4, 4)
    leaf = torch.ones(4, 4, requires_grad=True)
    b = ws.buffer("w", like).fill_(2.0)
    ptr = b.data_ptr()
    y = (leaf * b).sum()  # mul saves b for the gradient of leaf; nothing else holds it
    del b
    other = ws.buffer("w", like)
    assert other.data_ptr() != ptr
    other.fill_(-7.0)  # must not change what the backward reads
    y.backward()
    assert torch.equal(leaf.grad, torch.full((4, 4), 2.0))
    del y, other
    assert ws.buffer("w", like).data_ptr() in _kept_ptrs(ws, "w")


def _kept_ptrs(ws: Workspace, key) -> set[int]:
    return {t.data_ptr() for t, _ in ws._buffers[key]}


def test_buffer_layout_and_mismatch_names_the_argument() -> None:
    ws = Workspace()
    t = torch.randn(3, 5).t()
    b = ws.buffer(("k", 0), t)
    assert b.shape == t.shape and b.stride() == t.stride() and b.dtype == t.dtype
    for bad in (torch.randn(4, 5), torch.randn(3, 5), torch.randn(5, 3).double()):
        with pytest.raises(ValueError, match=r"like must match the buffers kept under key "
                                             r"\('k', 0\)"):
            ws.buffer(("k", 0), bad)
    with pytest.raises(ValueError, match="max_per_key"):
        Workspace(0)
    with pytest.raises(ValueError, match="max_per_key"):
        Workspace(True)  # type: ignore[arg-type]


def test_max_per_key_and_release() -> None:
    ws = Workspace(max_per_key=2)
    like = torch.zeros(100)
    held = [ws.buffer("k", like) for _ in range(4)]
    assert len(ws._buffers["k"]) == 2 and ws.nbytes == 2 * 400
    assert len({h.data_ptr() for h in held}) == 4
    s = ws.scratch(10, torch.float32, torch.device("cpu"))
    assert s.shape == (10,) and ws.scratch(50, torch.float32, "cpu").numel() == 50
    assert "buffers=2" in repr(ws)
    held[0].fill_(5.0)
    ws.release()
    assert ws.nbytes == 0 and not ws._buffers
    assert torch.equal(held[0], torch.full((100,), 5.0))  # still alive where it is used


def test_fallback_allocates_without_the_use_count(monkeypatch) -> None:
    monkeypatch.setattr(workspace_mod, "_use_count", None)
    ws = Workspace()
    assert not ws.reuses
    like = torch.zeros(8)
    a = ws.buffer("k", like)
    ptr = a.data_ptr()
    a.fill_(1.0)
    b = ws.buffer("k", like)
    assert b.data_ptr() != ptr and ws.nbytes == 0 and not ws._buffers
    opt = _trained("adamw", [((64, 64), "contiguous"), ((7,), "contiguous")], torch.float32)
    _assert_equal(predict(opt, 2, workspace=ws), reference_predict(opt, 2))


# ---------------------------------------------------------------------------------------------
# StageWorker: reuse changes no bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pipeoptim", "pipeoptim-lean", "pipedream", "gpipe",
                                    "pipedream-2bw"])
def test_stage_workspace_changes_no_bit(method, monkeypatch, small_threshold) -> None:
    from predictopt.data import mlp_stages
    from predictopt.pipeline import PipelineSimulator

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)

    def run():
        stages = mlp_stages(5, 16, 3, 3, seed=2)
        sim = PipelineSimulator(stages, lambda p: torch.optim.AdamW(p, lr=1e-2,
                                                                    weight_decay=1e-2),
                                method=method, n_microbatches=4)
        losses = [v for _ in range(3) for v in sim.step(x, y)]
        return [p.detach().clone() for m in stages for p in m.parameters()], losses, sim

    w1, l1, sim = run()
    if method in ("pipeoptim", "pipeoptim-lean", "pipedream"):  # they predict or stash
        assert any(w.workspace.nbytes for w in sim.workers)  # buffers were kept and reused
    sim.workers[0].release_buffers()
    assert sim.workers[0].workspace.nbytes == 0
    monkeypatch.setattr(workspace_mod, "_use_count", None)  # allocate every time
    w2, l2, _ = run()
    assert l1 == l2
    for p, q in zip(w1, w2, strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# CUDA (run by benchmarks/gpu.sh: pytest -k cuda)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt_name", ["adamw", "adamw-fused", "nadam", "radam", "sgd-momentum"])
def test_engine_equals_reference_on_cuda(opt_name, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).cuda())
              for s in [(300, 200), (70000,), (5,)]]
    opt = OPTIMIZERS[opt_name](params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).cuda()
        opt.step()
    ref = reference_predict(opt, 2)
    ws = Workspace()
    for _ in range(2):
        _assert_equal(predict(opt, 2, workspace=ws), ref)
    popt = PredictiveOptimizer(opt, steps=2, calibrate=False)
    real = [p.detach().clone() for p in params]
    popt.predict_(2)
    _assert_equal({p: p.detach() for p in params}, ref)
    popt.restore_()
    assert all(torch.equal(p, r) for p, r in zip(params, real))
