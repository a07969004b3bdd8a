"""Pure emissions arithmetic: energy to CO2e with PUE and grid intensity."""

from __future__ import annotations

JOULES_PER_KWH = 3.6e6


def grams(joules: float, grams_per_kwh: float, pue: float = 1.0) -> float:
    """CO2e grams for `joules` of IT energy: kWh x PUE x g/kWh (PUE adds the facility's
    cooling and power-conversion overhead to what the meters saw)."""
    return joules / JOULES_PER_KWH * pue * grams_per_kwh
