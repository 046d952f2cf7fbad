r"""Linear stability of delayed momentum updates: why staleness hurts adaptive optimizers.

One direction of the loss with curvature $h$ (in the optimizer's preconditioned units), the EMA
momentum of Adam (or momentum SGD in EMA form), a quasi-hyperbolic mix $\nu$ of momentum and
fresh gradient, a gradient $D$ updates old and, optionally, a forward on weights predicted
$D$ updates ahead along the momentum with gain $\gamma$:

$$
g_t = h\,(w_{t-D} - \gamma D\, m_{t-D}), \qquad
m_{t+1} = \beta m_t + (1-\beta)\, g_t, \qquad
w_{t+1} = w_t - \eta\,[\nu\, m_{t+1} + \phi\,(1-\nu)\, g_t],
$$

with $\phi$ a factor on the fresh-gradient term alone (1 unless given: the default method's
momentum SGD update has $\phi = 1/(1 + D)$).

The system is linear in $(w_t, \dots, w_{t-D}, m_t, \dots, m_{t-D})$; it converges iff the
spectral radius of its companion matrix is below 1. :func:`max_stable_curvature` returns the
largest $a = \eta h$ up to which it does. Without delay and with $\nu = 1$ the answer is
$2(1+\beta)/(1-\beta)$ (38 for $\beta = 0.9$), the curvature adaptive optimizers are known to
train at (the edge of stability); with one update of delay it is 1 whatever $\beta$.
"""

from __future__ import annotations

import numpy as np

__all__ = ["companion", "max_stable_curvature", "spectral_radius"]


def companion(a: float, beta: float, delay: int, *, nu: float = 1.0,
              gain: float = 0.0, fresh: float = 1.0) -> np.ndarray:
    """The update matrix of the state ``(w_t..w_{t-D}, m_t..m_{t-D})`` (see the module)."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    L = delay + 1
    n = 2 * L
    A = np.zeros((n, n))
    g = np.zeros(n)
    g[delay] = a
    g[L + delay] = -a * gain * delay
    m_new = np.zeros(n)
    m_new[L] = beta
    m_new += (1 - beta) * g
    w_new = np.zeros(n)
    w_new[0] = 1.0
    w_new -= nu * m_new + fresh * (1 - nu) * g
    A[0] = w_new
    A[L] = m_new
    for i in range(1, L):
        A[i, i - 1] = 1.0
        A[L + i, L + i - 1] = 1.0
    return A


def spectral_radius(a: float, beta: float, delay: int, **kw: float) -> float:
    """The largest eigenvalue modulus of :func:`companion`."""
    return float(np.max(np.abs(np.linalg.eigvals(companion(a, beta, delay, **kw)))))


def max_stable_curvature(beta: float, delay: int, *, nu: float = 1.0, gain: float = 0.0,
                         fresh: float = 1.0, high: float = 1e4, tol: float = 1e-6) -> float:
    """The largest $a = \\eta h$ such that every $a' \\in (0, a]$ is stable.

    Scans a geometric grid for the first unstable point, then bisects between it and the last
    stable one.
    """
    grid = np.geomspace(1e-4, high, 400)
    last = 0.0
    for a in grid:
        if spectral_radius(a, beta, delay, nu=nu, gain=gain, fresh=fresh) >= 1 - 1e-12:
            lo, hi = last, float(a)
            while hi - lo > tol * max(hi, 1e-3):
                mid = 0.5 * (lo + hi)
                if spectral_radius(mid, beta, delay, nu=nu, gain=gain, fresh=fresh) < 1 - 1e-12:
                    lo = mid
                else:
                    hi = mid
            return lo
        last = float(a)
    return float(high)
