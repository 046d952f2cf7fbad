"""Error feedback for delayed updates (:class:`~predictopt.pipeline.transforms.ErrorFeedback`):
its invariant, its special cases, its errors and its place in the pipeline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.pipeline import StageContext
from predictopt.pipeline.methods import UpdateContext
from predictopt.pipeline.transforms import ErrorFeedback
from tests._hyp import props

torch.set_num_threads(1)


def ctx(delay: int) -> StageContext:
    return StageContext(staleness=(0, delay), update_every=1, stage=0, num_stages=delay + 1)


def run_hooks(ef: ErrorFeedback | None, delay: int, grads: list[torch.Tensor], lr: float
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain SGD on gradients given in advance (independent of the weights), with ``ef``'s hooks
    around every step as the stage worker calls them; returns the final weights and the
    optimizer's own updates."""
    p = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = torch.optim.SGD([p], lr=lr)
    state: dict = {}
    own = []
    for t, g in enumerate(grads):
        p.grad = g.clone()
        up = UpdateContext(opt, [p], t, state=state)
        if ef is not None:
            ef.before_step(ctx(delay), up)
        before = p.detach().clone()
        opt.step()
        own.append(p.detach() - before)
        if ef is not None:
            ef.after_step(ctx(delay), up)
    return p.detach(), own


@props(max_examples=60)
@given(beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]), gain=st.floats(0.0, 2.0),
       delay=st.integers(0, 7), steps=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_weights_are_the_iterate_plus_the_error_estimate(beta, gain, delay, steps, seed):
    """w_t = x_t + gain * D * avg_t, avg the EMA (zero start) of the optimizer's own updates and
    x_t the weights of the same optimizer without the correction."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(steps)]
    w, own = run_hooks(ErrorFeedback(beta, gain), delay, grads, lr=0.1)
    x, plain = run_hooks(None, delay, grads, lr=0.1)
    avg = torch.zeros_like(x)
    for u in plain:
        avg = beta * avg + (1 - beta) * u
    torch.testing.assert_close(w, x + gain * delay * avg, rtol=1e-12, atol=1e-12)
    for u, v in zip(own, plain):  # plain SGD: the optimizer's own updates are unchanged
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_without_smoothing_a_one_step_delay_gives_the_optimistic_update():
    """beta = 0, gain = 1, D = 1: each step moves the weights by 2 u_t - u_{t-1}."""
    grads = [torch.tensor([1.0, -2.0], dtype=torch.float64),
             torch.tensor([3.0, 0.5], dtype=torch.float64)]
    w1, _ = run_hooks(ErrorFeedback(0.0, 1.0), 1, grads[:1], lr=0.1)
    w2, own = run_hooks(ErrorFeedback(0.0, 1.0), 1, grads, lr=0.1)
    torch.testing.assert_close(w1, 2 * own[0], rtol=1e-15, atol=0.0)
    torch.testing.assert_close(w2 - w1, 2 * own[1] - own[0], rtol=1e-15, atol=1e-17)


def test_an_undelayed_stage_is_left_as_it_is():
    grads = [torch.randn(5) for _ in range(4)]
    w, _ = run_hooks(ErrorFeedback(0.9, 1.0), 0, grads, lr=0.1)
    x, _ = run_hooks(None, 0, grads, lr=0.1)
    assert torch.equal(w, x)


@pytest.mark.parametrize("kwargs, name", [({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"),
                                          ({"gain": -1.0}, "gain"),
                                          ({"gain": float("nan")}, "gain"),
                                          ({"beta": True}, "beta")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ErrorFeedback(**kwargs)
