"""predictopt.analysis: the stability limits quoted in docs/study.md, against closed forms."""

from __future__ import annotations

import math

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
