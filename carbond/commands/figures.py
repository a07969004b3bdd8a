"""Figures for people: three significant digits in a scaled unit (J, kJ, Wh, kWh; g, kg, t),
never in exponent form. One place, so `carbond exec`, `carbond report` and the html page
print the same figure the same way; CSV and JSON keep base units and never come here."""

from __future__ import annotations

import math
from collections.abc import Sequence

SIGNIFICANT = 3
JOULES_PER_KWH = 3.6e6
# (symbol, base units per one, the base value below which the next larger unit is not used)
ENERGY_UNITS: Sequence[tuple[str, float, float]] = (
    ("J", 1.0, 1e3), ("kJ", 1e3, 1e5), ("Wh", 3600.0, JOULES_PER_KWH),
    ("kWh", JOULES_PER_KWH, math.inf))
MASS_UNITS: Sequence[tuple[str, float, float]] = (
    ("g", 1.0, 1e3), ("kg", 1e3, 1e6), ("t", 1e6, math.inf))


def round_significant(value: float, significant: int = SIGNIFICANT) -> float:
    """`value` rounded to `significant` digits (999.6 -> 1000.0)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, significant - 1 - math.floor(math.log10(abs(value))))


def decimal(value: float, significant: int = SIGNIFICANT) -> str:
    """`value` to `significant` digits in fixed point, thousands separated: 0.00000243,
    13.0, 1,230. Not finite: "unknown"."""
    if not math.isfinite(value):
        return "unknown"
    rounded = round_significant(value, significant)
    if rounded == 0:
        return "0"
    places = max(0, significant - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:,.{places}f}"


def scaled(value: float, units: Sequence[tuple[str, float, float]]) -> str:
    """`value` (in base units) in the first unit whose range holds it once rounded (999.6 J
    is 1.00 kJ), to three significant digits of that unit."""
    if not math.isfinite(value):
        return "unknown"
    symbol, per_base = unit_for(value, units)
    return f"{decimal(value / per_base)} {symbol}"


def unit_for(value: float, units: Sequence[tuple[str, float, float]]) -> tuple[str, float]:
    """(symbol, base units per one) that `scaled` prints `value` in."""
    rounded = round_significant(value)
    symbol, per_base, _ = next((u for u in units if abs(rounded) < u[2]), units[-1])
    return symbol, per_base


def human_joules(joules: float) -> str:
    """J below 1 kJ, kJ below 100 kJ, Wh below 1 kWh, then kWh."""
    return scaled(joules, ENERGY_UNITS)


def human_grams(grams: float | None) -> str:
    """g below 1 kg (three significant digits, however small), kg below 1 t, then t."""
    return "unknown" if grams is None else scaled(grams, MASS_UNITS)
