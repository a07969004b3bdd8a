"""What every provider module shares: the interface, the registry entry, credentials, and the
helpers that check a decoded API answer field by field.

Kept apart from the package's `__init__` so each provider module can import it without
importing its siblings.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from carbond.carbon.http import HttpClient
from carbond.carbon.intensity import FetchError, ForecastPoint, ForecastUnsupported, Intensity
from carbond.carbon.static import Tables
from carbond.types import ConfigError

log = logging.getLogger(__name__)


class Secret:
    """A credential read from a file; repr/str never show it, only `reveal()` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # keep it out of pickles too
        raise TypeError("Secret cannot be pickled")


class Provider(Protocol):
    """One intensity source. `network` False means a local figure: always fresh, never polled."""

    name: str
    marginal: bool
    network: bool

    def fetch(self, now: float) -> Intensity: ...

    def forecast(self, now: float) -> list[ForecastPoint]: ...

    def describe(self) -> str: ...


class ProviderBase:
    """Defaults for the Provider interface: an average figure, fetched over the network, with
    no forecast."""

    name = "base"
    marginal = False
    network = True

    def forecast(self, now: float) -> list[ForecastPoint]:
        raise ForecastUnsupported(f"{self.name} has no forecast")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class BuildContext:
    """What building one provider may use: its options, already checked and normalised by
    `provider_specs_from_config`, and what all providers share."""

    options: Mapping[str, Any]
    zone: str
    http: HttpClient
    tables: Tables
    key: str  # intensity.providers[0].electricitymaps: credential file errors name it


@dataclass(frozen=True)
class ProviderType:
    """One provider as config names it: the options it takes, each with the kind of value the
    one validation checks (path, text, url, ukregion, grams), and how to build it."""

    name: str
    options: Mapping[str, str]
    required: tuple[str, ...]
    build: Callable[[BuildContext], Provider]


def read_secret_file(path: str, key: str) -> Secret:
    """A token or password from a file (first line, whitespace stripped) or ConfigError.

    The error names the file and the OS reason, never the content.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            value = handle.readline().strip()
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    if mode & stat.S_IROTH:
        log.warning("%s: %s is readable by every user; chmod 600 it", key, path)
    return Secret(value)


# ---------------------------------------------------------------- answer helpers


def expect_object(value: Any) -> dict[str, Any]:
    """The value if it is a JSON object, else FetchError."""
    if not isinstance(value, dict):
        raise FetchError("missing_field", f"expected an object, got {type(value).__name__}")
    return value


def require_field(body: Any, key: str) -> Any:
    """body[key], or FetchError when the body is no object or the field is absent or null."""
    if not isinstance(body, dict) or key not in body or body[key] is None:
        raise FetchError("missing_field", f"no {key!r}")
    return body[key]


def finite_number(value: Any) -> float:
    """A JSON number as a finite float, or FetchError (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FetchError("invalid_value", "not a finite number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise FetchError("invalid_value", "not a finite number") from None
    if not math.isfinite(number):
        raise FetchError("invalid_value", "not a finite number")
    return number


def points_from_starts(
    starts: Sequence[tuple[float, float]], default_period_seconds: float
) -> list[ForecastPoint]:
    """Periods from start times only: each ends where the next begins, the last after the
    typical period."""
    ordered = sorted(starts)
    points = []
    for index, (start, grams) in enumerate(ordered):
        end = ordered[index + 1][0] if index + 1 < len(ordered) else start + default_period_seconds
        points.append(ForecastPoint(start, end, grams))
    return points
