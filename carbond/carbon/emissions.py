"""Pure emissions arithmetic: energy to CO2e with PUE and grid intensity."""

from __future__ import annotations

from collections.abc import Mapping

JOULES_PER_KWH = 3.6e6


def kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


def grams(joules: float, grams_per_kwh: float, pue: float = 1.0) -> float:
    """CO2e grams for `joules` of IT energy: kWh x PUE x g/kWh (PUE adds the facility's
    cooling and power-conversion overhead to what the meters saw)."""
    return joules / JOULES_PER_KWH * pue * grams_per_kwh


def grams_by_consumer(
    joules_by_consumer: Mapping[str, float], grams_per_kwh: float, pue: float = 1.0
) -> dict[str, float]:
    """Per-consumer grams for one tick, all at the intensity valid during that tick, so the sum
    over consumers equals the host figure (same linear factor)."""
    factor = pue * grams_per_kwh / JOULES_PER_KWH
    return {consumer: joules * factor for consumer, joules in joules_by_consumer.items()}
