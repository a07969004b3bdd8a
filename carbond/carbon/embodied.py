"""Embodied carbon (the "M" of the Software Carbon Intensity specification, ISO/IEC
21031:2024): the host's manufacturing emissions, amortised evenly over its lifetime and
shared between consumers by their share of the host energy in each tick. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

from carbond.types import IDLE

# An average year, leap days included: a lifetime of 4y is 4 x 365.25 days.
SECONDS_PER_YEAR = 365.25 * 86400

K = TypeVar("K", bound=Hashable)


def embodied_grams_per_second(kgco2e: float, lifetime_seconds: float) -> float:
    """The host's embodied emissions per second of its lifetime; 0 when not configured."""
    if not kgco2e > 0 or not lifetime_seconds > 0:
        return 0.0
    return kgco2e * 1000.0 / lifetime_seconds


def share_embodied(grams: float, energy: Mapping[K, Mapping[str, float]],
                   fallback: K = IDLE) -> dict[K, float]:  # type: ignore[assignment]
    """Split one tick's embodied grams by each consumer's share of the tick's host energy.

    The shares sum to `grams` (the host's amortised emissions accrue whether or not anything
    ran); a tick without energy gives everything to `fallback` (the idle consumer).
    """
    if not grams > 0:
        return {}
    joules = {key: math.fsum(v for v in parts.values() if 0.0 < v < math.inf)
              for key, parts in energy.items()}
    host_joules = math.fsum(joules.values())
    if not host_joules > 0:
        return {fallback: grams}
    # The fraction first: grams * value can round in the subnormal range (1.5 * 5e-324 is
    # 1e-323), and dividing that by host_joules would then give more than `grams`.
    return {key: grams * (value / host_joules) for key, value in joules.items() if value > 0}
