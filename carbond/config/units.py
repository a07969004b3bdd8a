"""Parsing of the human units that config and flags accept: durations and masses."""

from __future__ import annotations

import math
import re

from carbond.types import shown

_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MASS_GRAMS = {"g": 1.0, "kg": 1000.0, "t": 1_000_000.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _parse(value: object, units: dict[str, float], default_unit: str, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a {what}, got {shown(value)}")
    if isinstance(value, (int, float)):
        number, unit = float(value), default_unit
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"must be positive, got {shown(value)}")
        match = _NUMBER_UNIT.match(value)
        if not match:
            raise ValueError(f"cannot parse {shown(value)} as a {what} (e.g. {_example(units)})")
        number, unit = float(match.group(1)), match.group(2) or default_unit
        if unit not in units:
            raise ValueError(
                f"unknown unit {shown(unit)} in {shown(value)}; use one of {', '.join(units)}"
            )
    else:
        raise ValueError(f"expected a {what}, got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be positive, got {shown(value)}")
    scaled = number * units[unit]
    if not math.isfinite(scaled):  # 1e308t is finite as a number, not as grams
        raise ValueError(f"too large, got {shown(value)}")
    return scaled


def _example(units: dict[str, float]) -> str:
    return "5s, 1m" if "s" in units else "500g, 250kg, 1t"


def parse_seconds(value: object) -> float:
    """'5s', '1m', '2h', '500ms' or a bare number of seconds; always > 0."""
    return _parse(value, _DURATION_SECONDS, "s", "duration")


def parse_grams(value: object) -> float:
    """'500g', '250kg', '1t' or a bare number of grams; always > 0."""
    return _parse(value, _MASS_GRAMS, "g", "mass")
