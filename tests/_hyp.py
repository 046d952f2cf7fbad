"""``props(n)``: hypothesis settings for a property test, scaled by ``PREDICTOPT_EXPLORE``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = max(1, int(os.environ.get("PREDICTOPT_EXPLORE", "1")))


def props(max_examples: int, **kwargs) -> settings:
    """Settings with ``max_examples * PREDICTOPT_EXPLORE`` examples and no deadline (CI machines
    are shared; speed is measured in ``benchmarks/``, never here)."""
    kwargs.setdefault("suppress_health_check", [HealthCheck.too_slow])
    return settings(max_examples=max_examples * SCALE, deadline=None, **kwargs)
