"""Leaf validators for carbond.yaml: (value, key) -> the normalised value, or a ConfigError
naming the key and what is wrong; and `section`, which checks a mapping against a schema of
them. The key table in carbond.config.schema composes these; nothing here knows a key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from carbond.carbon.providers import provider_specs_from_config
from carbond.carbon.zone import validate_zone
from carbond.config.units import parse_grams, parse_seconds
from carbond.ledger.periods import get_zone
from carbond.types import ConfigError, did_you_mean, shown
from carbond.workloads.naming import Rule, compile_rules

MIN_INTERVAL_SECONDS = 0.1
SECONDS_PER_YEAR = 365.25 * 86400  # an average year, leap days included

Validator = Callable[[Any, str], Any]



def duration(value: Any, key: str) -> float:
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


LONG_UNITS_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0,
                       "y": SECONDS_PER_YEAR}
LONG_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def long_duration(value: Any, key: str) -> float:
    """Durations of days to years (retention, hardware lifetime): also `w` and `y`."""
    if isinstance(value, str):
        match = LONG_DURATION.match(value)
        unit = match.group(2) if match else ""
        if match and unit in ("w", "y"):
            number = float(match.group(1))
            if number <= 0:
                raise ConfigError(key, f"must be positive, got {shown(value)}")
            return number * LONG_UNITS_SECONDS[unit]
        if match and unit and unit not in LONG_UNITS_SECONDS:
            raise ConfigError(key, f"unknown unit {shown(unit)} in {shown(value)}; use one of "
                              f"{', '.join(LONG_UNITS_SECONDS)}")
    return duration(value, key)


def timezone(value: Any, key: str) -> str:
    text = string(value, key)
    try:
        get_zone(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    return text


def mass(value: Any, key: str) -> float:
    try:
        return parse_grams(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def interval(value: Any, key: str) -> float:
    """A tick reads every cgroup and process counter: far below a second the agent would cost
    more than it measures (1 ms burned 82% of a core)."""
    seconds = duration(value, key)
    if seconds < MIN_INTERVAL_SECONDS:
        raise ConfigError(key, f"must be at least {MIN_INTERVAL_SECONDS:g}s, got {seconds:g}s")
    return seconds


def string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {show(value)}")
    return value


def optional_string(value: Any, key: str) -> str | None:
    return None if value is None else string(value, key)


def number(minimum: float, *, inclusive: bool = True) -> Validator:
    def check(value: Any, key: str) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {show(value)}")
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ConfigError(key, f"must be {bound}, got {shown(value)}")
        return float(value)

    return check


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"expected a positive integer, got {show(value)}")
    return value


def choice(*choices: str) -> Validator:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {show(value)}")
        return str(value)

    return check


def switch(value: Any, key: str) -> str:
    """`auto`, or a YAML boolean: normalised to 'auto', 'on' or 'off'."""
    if value is True or value in ("on", "true", "yes"):
        return "on"
    if value is False or value in ("off", "false", "no"):
        return "off"
    if value == "auto":
        return "auto"
    raise ConfigError(key, f"expected auto, true or false, got {show(value)}")


def auto_or_watts(value: Any, key: str) -> float | None:
    return None if value == "auto" else number(0.0)(value, key)


def listen(value: Any, key: str) -> tuple[str, int]:
    text = string(value, key)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected HOST:PORT, got {shown(text)}")
    return host.strip("[]") or "0.0.0.0", int(port)


def zone(value: Any, key: str) -> str | None:
    return None if value is None else validate_zone(value, key)


def rules(value: Any, key: str) -> tuple[Rule, ...]:
    return compile_rules(value, key)


def providers(value: Any, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Names, option names and option values, by the providers' one validation (the same
    that `build_providers` runs); credential files are read when the providers are built,
    still before anything runs."""
    return tuple(provider_specs_from_config(value, key))




def show(value: Any) -> str:
    return f"{type(value).__name__} {shown(value)}" if value is not None else "nothing"


def list_of(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list, got {show(value)}")
    return value


def unknown(name: str, known: Mapping[str, Any], what: str = "key") -> str:
    return f"unknown {what} {shown(name)}{did_you_mean(name, known)}"


def section(value: Any, key: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mapping against a schema of validators and nested schemas."""
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {show(value)}")
    result: dict[str, Any] = {}
    for name, item in value.items():
        item_key = f"{key}.{name}" if key else str(name)
        spec = schema.get(name)
        if spec is None:
            raise ConfigError(item_key, unknown(str(name), schema))
        result[name] = section(item, item_key, spec) if isinstance(spec, dict) else spec(
            item, item_key
        )
    return result
