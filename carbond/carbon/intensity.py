"""Values shared by every intensity provider: the intensity figure, forecast points, errors.

Kept free of I/O so providers, the refresher, the exporter and the CLI can all import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

# Above any real grid (lignite is ~1100 g/kWh); a larger figure is a unit or parsing mistake.
MAX_GRAMS_PER_KWH = 3000.0
# 1 lb = 0.45359237 kg, so 1 lb/MWh = 453.59237 g / 1000 kWh = 0.45359237 g/kWh.
GRAMS_PER_KWH_PER_LBS_PER_MWH = 0.45359237
# How far ahead of now a figure may be dated: the period that holds now starts at or before it
# (GB half hours, Electricity Maps' hour), but a host clock a little slow sees the next one.
FUTURE_TOLERANCE_SECONDS = 3600.0


@dataclass(frozen=True)
class Intensity:
    """One grid carbon-intensity figure and where it came from.

    `observed_at` is when the figure applies (the start of its period, epoch seconds); its age
    decides staleness. `fetched_at` is when carbond got it. `marginal` marks a marginal
    emission rate (WattTime MOER) rather than an average of the generation mix.
    """

    grams_per_kwh: float
    zone: str
    provider: str
    observed_at: float
    fetched_at: float
    is_estimated: bool = False
    marginal: bool = False

    def age_seconds(self, now: float) -> float:
        """Seconds since the figure applied, never negative (forecast periods start ahead)."""
        return max(0.0, now - self.observed_at)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Intensity:
        """Rebuild from `to_json` output; raises ValueError on anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        try:
            value = cls(
                grams_per_kwh=check_grams_per_kwh(data["grams_per_kwh"]),
                zone=_str(data["zone"]),
                provider=_str(data["provider"]),
                observed_at=_finite(data["observed_at"]),
                fetched_at=_finite(data["fetched_at"]),
                is_estimated=bool(data.get("is_estimated", False)),
                marginal=bool(data.get("marginal", False)),
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]}") from None
        return value


@dataclass(frozen=True)
class ForecastPoint:
    """One forecast period [start, end) in epoch seconds."""

    start: float
    end: float
    grams_per_kwh: float


class FetchError(Exception):
    """A failed or rejected fetch. `reason` is a short machine word (timeout, http_500,
    rate_limited, bad_json, html, invalid_value, wrong_zone, ...). Messages never carry
    secrets: they are built from the reason and public response facts only."""

    def __init__(self, reason: str, detail: str = "", retry_after_seconds: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retry_after_seconds = retry_after_seconds


class ForecastUnsupported(Exception):
    """The provider has no forecast endpoint."""


def check_grams_per_kwh(value: Any) -> float:
    """A plausible intensity or FetchError('invalid_value'): numeric, finite, 0..3000."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FetchError("invalid_value", f"not a number ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits: JSON allows it
        raise FetchError("invalid_value", "too large for a number") from None
    if math.isnan(number) or math.isinf(number):
        raise FetchError("invalid_value", "not finite")
    if number < 0:
        raise FetchError("invalid_value", f"negative ({number:g})")
    if number > MAX_GRAMS_PER_KWH:
        raise FetchError("invalid_value", f"{number:g} g/kWh is above {MAX_GRAMS_PER_KWH:g}")
    return number


def date_problem(observed_at: float, now: float, max_age_seconds: float) -> str | None:
    """Why a figure dated `observed_at` cannot be used at `now`: `future_date` when it is
    dated more than FUTURE_TOLERANCE_SECONDS ahead (it would never go stale), `stale_date`
    when older than `max_age_seconds` (it would never be used); None when usable."""
    if observed_at - now > FUTURE_TOLERANCE_SECONDS:
        return "future_date"
    if now - observed_at > max_age_seconds:
        return "stale_date"
    return None


def check_observed_at(observed_at: float, now: float, max_age_seconds: float) -> None:
    """FetchError `future_date` / `stale_date` (see date_problem), naming the date."""
    problem = date_problem(observed_at, now, max_age_seconds)
    if problem == "future_date":
        raise FetchError(
            problem, f"dated {describe_time(observed_at)}, {observed_at - now:.0f}s ahead of now"
        )
    if problem == "stale_date":
        raise FetchError(
            problem,
            f"dated {describe_time(observed_at)}, "
            f"{now - observed_at:.0f}s old (max_age {max_age_seconds:g}s)",
        )


def describe_time(epoch_seconds: float) -> str:
    """UTC ISO form for messages; the bare number where no calendar date can hold it."""
    try:
        return format_utc(epoch_seconds, minutes=False)
    except (OverflowError, OSError, ValueError):
        return f"{epoch_seconds:g} s after the epoch"


def snippet(value: Any, limit: int = 40) -> str:
    """A short, escaped rendering of a value an API sent, safe for one log line."""
    if isinstance(value, str):
        return repr(value[:limit])
    if value is None or isinstance(value, (bool, int, float)):
        try:
            text = repr(value)
        except ValueError:  # an int past Python's digit limit for str()
            return "a huge integer"
        return text if len(text) <= limit else f"{text[:limit]}..."
    return type(value).__name__


def lbs_per_mwh_to_grams_per_kwh(lbs_per_mwh: float) -> float:
    return lbs_per_mwh * GRAMS_PER_KWH_PER_LBS_PER_MWH


def parse_timestamp(value: Any) -> float:
    """ISO 8601 (with Z, offset, or the UK API's minute precision) to epoch seconds.

    A timestamp without an offset is taken as UTC: every API used here publishes UTC.
    """
    if not isinstance(value, str) or not value:
        raise FetchError("missing_field", "timestamp is not a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FetchError("bad_timestamp", f"cannot parse {value[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def format_utc(epoch_seconds: float, minutes: bool = True) -> str:
    """UTC ISO form the APIs accept in paths (the UK API wants minute precision, with Z)."""
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%MZ" if minutes else "%Y-%m-%dT%H:%M:%SZ")


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("expected a finite number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("expected a finite number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number
