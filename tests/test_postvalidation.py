"""Tests for predictopt.pipeline.postvalidation: global-norm clipping and NaN/Inf skipping by
optimistic steps, validated and redone, against the synchronous rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from predictopt.data import mlp_stages
from predictopt.pipeline import PipelineSimulator
from predictopt.pipeline.postvalidation import PostValidation

IN, HID, OUT, MB = 6, 8, 3, 4


def _opt(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)


def _sim(method="gpipe", schedule="1F1B", stages=3, n=4, seed=1, modules=None):
    modules = modules or mlp_stages(IN, HID, OUT, stages, seed=seed)
    return PipelineSimulator(modules, _opt, method=method, schedule=schedule, n_microbatches=n,
                             loss_fn=F.cross_entropy)


def _batches(n, steps, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(MB * n, IN, generator=gen),
             torch.randint(0, OUT, (MB * n,), generator=gen)) for _ in range(steps)]


class _Synchronous:
    """The synchronous rule, by deferring every stage's step until all stages have their
    gradient of the same update (exact for one update per step, where nothing runs between a
    stage's step and the last stage's): global norm, then clip or skip, then step."""

    def __init__(self, workers, max_norm):
        self.workers, self.max_norm = workers, max_norm
        self.real = [w.optimizer.step for w in workers]
        self.count = [0] * len(workers)
        self.stash: dict[int, dict[int, list]] = {}
        for k, w in enumerate(workers):
            w.optimizer.step = (lambda _k=k: self.step(_k))

    @torch.no_grad()
    def step(self, k):
        j = self.count[k]
        self.count[k] += 1
        w = self.workers[k]
        self.stash.setdefault(j, {})[k] = [None if p.grad is None else p.grad.clone()
                                           for p in w.params]
        if len(self.stash[j]) < len(self.workers):
            return
        per_stage = self.stash.pop(j)
        norms = [torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, 2.0) for g in per_stage[s] if g is not None]), 2.0)
            for s in range(len(self.workers))]
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        skip = not bool(torch.isfinite(total))
        coef = None
        if not skip and self.max_norm is not None:
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        for s, ws in enumerate(self.workers):
            for p, g in zip(ws.params, per_stage[s]):
                p.grad = None if skip else g
            if coef is not None and not bool(coef == 1.0):
                torch._foreach_mul_([p.grad for p in ws.params if p.grad is not None], coef)
            self.real[s]()
            ws.optimizer.zero_grad(set_to_none=True)


def _state(sim):
    out = [p.detach().clone() for m in sim.stages for p in m.parameters()]
    for w in sim.workers:
        inner = w.optimizer.optimizer
        for p in w.params:
            out += [v.clone() for v in inner.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def _equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs (max {(x - y).abs().max().item():.3g})"


def _train(sim, batches):
    return [v for x, y in batches for v in sim.step(x, y)]


# ------------------------------------------------------------------ one update per step


@pytest.mark.parametrize("schedule", ["1F1B", "ZBH1", "InterleavedZeroBubble"])
def test_post_validated_clipping_equals_the_synchronous_clipped_step(schedule):
    """gpipe (one update per step): nothing runs between a stage's optimistic step and the
    validation, so the whole run equals synchronous global-norm clipping bit for bit, although
    stages were restored and redone."""
    stages = 4 if schedule == "InterleavedZeroBubble" else 3  # 2 ranks x 2, or 3 ranks
    batches = _batches(4, 4)
    sim = _sim(schedule=schedule, stages=stages)
    pv = PostValidation(sim.workers, max_norm=0.5)
    losses = _train(sim, batches)
    ref = _sim(schedule=schedule, stages=stages)
    _Synchronous(ref.workers, 0.5)
    assert losses == _train(ref, batches)
    _equal(_state(sim), _state(ref))
    assert pv.clipped > 0 and pv.redone > 0 and pv.pending == [0] * stages
    unclipped = _sim(schedule=schedule, stages=stages)
    _train(unclipped, batches)
    assert any(not torch.equal(a, b) for a, b in zip(_state(sim), _state(unclipped)))


class _NaNWeightGrad(torch.autograd.Function):
    """``x * a`` whose backward gives ``a`` a NaN gradient when ``poison`` (``x``'s stays
    finite)."""

    @staticmethod
    def forward(ctx, x, a, poison):
        ctx.save_for_backward(x, a)
        ctx.poison = poison
        return x * a

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        ga = torch.full_like(a, float("nan")) if ctx.poison else (g * x).sum().reshape(a.shape)
        return g * a, ga, None


class _Poison(nn.Module):
    """A scalar gain on the first stage whose gradient is NaN on chosen forward calls."""

    def __init__(self, poison_calls):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.calls, self.poison = 0, set(poison_calls)

    def forward(self, x):
        self.calls += 1
        return _NaNWeightGrad.apply(x, self.a, self.calls in self.poison)


def _poisoned(poison_calls):
    mods = mlp_stages(IN, HID, OUT, 3, seed=1)
    mods[0] = nn.Sequential(_Poison(poison_calls), mods[0])
    return mods


def test_a_nan_anywhere_skips_the_update_on_every_stage():
    """A NaN in the first stage's gradient of one micro-batch (the stage that reports last):
    the later stages stepped optimistically and are restored; the update of that step is
    skipped on every stage, exactly as the synchronous rule skips it."""
    batches = _batches(4, 3)
    sim = _sim(modules=_poisoned({6}))  # step 2, micro-batch 1
    pv = PostValidation(sim.workers, max_norm=5.0)
    _train(sim, batches)
    ref = _sim(modules=_poisoned({6}))
    _Synchronous(ref.workers, 5.0)
    _train(ref, batches)
    _equal(_state(sim), _state(ref))
    assert pv.skipped == 1 and pv.redone == 2
    assert all(torch.isfinite(t).all() for t in _state(sim))


# ------------------------------------------------------------------ per-micro-batch updates


@pytest.mark.parametrize("method,schedule", [("pipeoptim", "1F1B"), ("pipedream", "ZBH1"),
                                             ("qh-dl", "1F1B"), ("pipeoptim-qh-dl", "ZBH1")])
def test_validated_state_is_the_synchronous_rule_on_the_same_gradients(method, schedule):
    """Per-micro-batch updates: after validation every stage's weights and optimizer state are
    those of the synchronous rule applied, in order, to the gradients the run computed
    (replayed on a fresh copy), although optimistic steps were redone."""
    batches = _batches(4, 3)
    sim = _sim(method=method, schedule=schedule)
    pv = PostValidation(sim.workers, max_norm=0.8, record=True)
    _train(sim, batches)
    assert pv.redone > 0 and pv.clipped > 0 and pv.pending == [0, 0, 0]
    ref = _sim(method=method, schedule=schedule)
    for k, w in enumerate(ref.workers):
        for grads, hyper, (skip, coef) in pv.history[k]:
            for p, g in zip(w.params, grads):
                p.grad = None if (g is None or skip) else g.clone()
            if coef is not None:
                torch._foreach_mul_([p.grad for p in w.params if p.grad is not None], coef)
            for g, h in zip(w.optimizer.param_groups, hyper):
                g["lr"] = h["lr"]  # the lr the method scaled for that update
            w.optimizer.step()
            if w._after and not skip:  # the method's corrections, on the clipped gradient
                for t in w._after:
                    t.after_step(w.context, w._update_context())
            w.optimizer.zero_grad(set_to_none=True)
    _equal(_state(sim), _state(ref))


@pytest.mark.parametrize("method", ["pipeoptim", "gpipe"])
def test_nothing_is_redone_when_nothing_clips(method):
    """max_norm above every global norm, finite gradients: no step is redone and the run is
    exactly the plain one (post-validation costs no change of the math)."""
    batches = _batches(4, 3, scale=0.1)
    sim = _sim(method=method)
    pv = PostValidation(sim.workers, max_norm=1e6)
    losses = _train(sim, batches)
    plain = _sim(method=method)
    assert losses == _train(plain, batches)
    _equal(_state(sim), _state(plain))
    assert pv.redone == 0 and pv.clipped == 0 and pv.skipped == 0


def test_arguments():
    sim = _sim()
    with pytest.raises(ValueError, match="non-empty sequence of StageWorker"):
        PostValidation([])
    with pytest.raises(ValueError, match="max_norm"):
        PostValidation(sim.workers, max_norm=0.0)
    with pytest.raises(ValueError, match="eps"):
        PostValidation(sim.workers, eps=0)


# ------------------------------------------------------------------ across ranks

_DIST_CONFIGS = [
    {"schedule": "1F1B", "method": "gpipe", "opt": "adamw", "n": 4, "steps": 3,
     "max_norm": 0.3, "poison": True},
    {"schedule": "1F1B", "method": "qh-dl", "opt": "adamw", "n": 4, "steps": 3,
     "max_norm": 0.3},
    {"schedule": "1F1B", "method": "pipedream", "opt": "sgdm", "n": 4, "steps": 3,
     "max_norm": 0.3, "poison": True},
    {"schedule": "InterleavedZeroBubble", "method": "pipeoptim", "opt": "adam", "n": 4,
     "steps": 2, "max_norm": 0.3},
]


def _bits(t):
    return t.view(torch.int32)  # NaN losses (the poisoned step) compare by their bits


@pytest.mark.timeout(240)
def test_distributed_post_validation_equals_the_deferred_simulator_bit_for_bit():
    """Two gloo ranks, the norms exchanged by an asynchronous all-gather and validated after
    every step: weights, losses and counters equal the simulator's deferred post-validation,
    with clipping redoing steps (per-micro-batch and per-step methods, one and two stages per
    rank) and a non-finite step skipped."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import _dist

    values = _dist.launch_ok(_dist.postvalidation_worker, 2, _DIST_CONFIGS, timeout=200.0,
                             pg_timeout=60.0)
    for i, cfg in enumerate(_DIST_CONFIGS):
        tag = _dist.config_tag(cfg)
        ref = _dist.simulate_postvalidation(cfg, i, 2)
        redone, clipped, skipped, pending = ref["counters"]
        assert redone > 0 and clipped > 0 and pending == [0] * len(ref["modules"]), tag
        assert skipped == (1 if cfg.get("poison") else 0), tag
        got = [value[tag] for value in values]
        assert sum(g["counters"][0] for g in got) == redone, tag
        assert all(g["counters"][1:3] == (clipped, skipped) for g in got), tag
        seen = set()
        for g in got:
            for k, ws in g["weights"].items():
                seen.add(k)
                for p, q in zip(ws, ref["modules"][k].parameters(), strict=True):
                    assert torch.isfinite(p).all(), (tag, k)
                    assert torch.equal(p, q.detach()), (tag, k)
            if g["losses"] is not None:
                assert torch.equal(_bits(g["losses"]), _bits(ref["losses"])), tag
        assert seen == set(range(len(ref["modules"]))), tag


def test_distributed_post_validation_errors(monkeypatch):
    from predictopt.pipeline import DistributedPostValidation

    with pytest.raises(ValueError, match="PredictiveStage"):
        DistributedPostValidation([object()])
    with pytest.raises(TypeError, match="deferred must be a bool"):
        PostValidation(_sim().workers, deferred="yes")


def test_deferred_validation_equals_the_synchronous_clipped_step():
    """Deferred (the rule the distributed runs use): optimistic steps on each stage's own norm,
    validation after the step; with one update per step the run is synchronous clipping."""
    batches = _batches(4, 4)
    sim = _sim()
    pv = PostValidation(sim.workers, max_norm=0.5, deferred=True)
    losses = []
    for x, y in batches:
        losses += sim.step(x, y)
        assert pv.pending == [1, 1, 1]  # nothing validates before validate()
        pv.validate()
    ref = _sim()
    _Synchronous(ref.workers, 0.5)
    assert losses == _train(ref, batches)
    _equal(_state(sim), _state(ref))
    assert pv.clipped > 0 and pv.redone > 0 and pv.pending == [0, 0, 0]
