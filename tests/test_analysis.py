"""predictopt.analysis: the stability limits quoted in docs/study.md, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from predictopt.analysis import companion, max_stable_curvature, spectral_radius
from tests._hyp import props


@props(20)
@given(beta=st.floats(0.0, 0.99))
def test_undelayed_ema_momentum_is_stable_up_to_the_edge_of_stability(beta):
    # no delay: stable iff a < 2 (1 + beta) / (1 - beta)
    assert max_stable_curvature(beta, 0) == pytest.approx(2 * (1 + beta) / (1 - beta), rel=1e-4)


@props(20)
@given(beta=st.floats(0.0, 0.99))
def test_one_update_of_delay_caps_the_curvature_at_one(beta):
    # D = 1: characteristic z^2 - (1 + beta) z + beta + (1 - beta) a; product of roots < 1
    assert max_stable_curvature(beta, 1) == pytest.approx(1.0, rel=1e-4)


def test_plain_delayed_gradient_descent():
    # no momentum, delay D: x_{t+1} = x_t - a x_{t-D}; stable iff a < 2 sin(pi / (2 (2D + 1)))
    for d in (1, 2, 3, 7):
        expected = 2 * math.sin(math.pi / (2 * (2 * d + 1)))
        assert max_stable_curvature(0.0, d) == pytest.approx(expected, rel=1e-4)


def test_companion_matrix_and_radius():
    a = companion(0.5, 0.9, 2)
    assert a.shape == (6, 6)
    assert spectral_radius(0.01, 0.9, 3) < 1 < spectral_radius(5.0, 0.9, 3)
    with pytest.raises(ValueError, match="delay"):
        companion(1.0, 0.9, -1)


@props(20)
@given(beta=st.floats(0.0, 0.99), delay=st.integers(0, 7), f=st.floats(0.05, 1.0),
       gain=st.sampled_from([0.0, 1.0]))
def test_the_fresh_factor_scales_the_fresh_term_alone(beta, delay, f, gain):
    """phi on the fresh term: no effect without one (nu = 1); with the fresh term alone
    (nu = 0, no prediction) it is the rate times phi, so the stable range grows by 1 / phi;
    phi = 1 is the plain model."""
    a = 0.3
    assert np.array_equal(companion(a, beta, delay, nu=1.0, fresh=f, gain=gain),
                          companion(a, beta, delay, nu=1.0, gain=gain))
    assert np.array_equal(companion(a, beta, delay, nu=0.5, fresh=1.0, gain=gain),
                          companion(a, beta, delay, nu=0.5, gain=gain))
    # the weights' row (the momentum, which no longer feeds the weights, keeps its own)
    assert np.allclose(companion(a, beta, delay, nu=0.0, fresh=f)[0],
                       companion(a * f, beta, delay, nu=0.0)[0])
    assert max_stable_curvature(beta, delay, nu=0.0, fresh=f) == pytest.approx(
        max_stable_curvature(beta, delay, nu=0.0) / f, rel=1e-4)
