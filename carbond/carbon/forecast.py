"""`carbond intensity` output: the current figure and, where a provider has one, a forecast
table with the lowest-carbon window marked. Formatting is pure; `fetch_forecast` is the only
function that touches the network (through the providers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo

from carbond.carbon.intensity import FetchError, ForecastPoint, ForecastUnsupported, Intensity
from carbond.carbon.providers import Provider


@dataclass(frozen=True)
class Forecast:
    provider: str
    marginal: bool
    points: list[ForecastPoint]


def fetch_forecast(providers: Sequence[Provider], now: float) -> Forecast:
    """The first forecast a provider, in configured order, can give.

    Raises ForecastUnsupported when none offers one, or the last FetchError when all that do
    failed.
    """
    last_error: FetchError | None = None
    for provider in providers:
        try:
            points = provider.forecast(now)
        except ForecastUnsupported:
            continue
        except FetchError as exc:
            last_error = exc
            continue
        if points:
            return Forecast(provider.name, provider.marginal, points)
    if last_error is not None:
        raise last_error
    raise ForecastUnsupported(
        "no configured provider offers a forecast (electricitymaps, watttime and ukgrid do)"
    )


def aggregate(points: Sequence[ForecastPoint], bucket_seconds: float) -> list[ForecastPoint]:
    """Time-weighted means over aligned buckets (WattTime's 5-minute points to hours)."""
    buckets: dict[float, list[float]] = {}
    for point in points:
        key = point.start - point.start % bucket_seconds
        weight = max(point.end - point.start, 0.0)
        acc = buckets.setdefault(key, [0.0, 0.0, point.end])
        acc[0] += point.grams_per_kwh * weight
        acc[1] += weight
        acc[2] = max(acc[2], point.end)
    result = []
    for start in sorted(buckets):
        total, weight, end = buckets[start]
        mean = total / weight if weight > 0 else 0.0
        result.append(ForecastPoint(start, min(end, start + bucket_seconds), mean))
    return result


def lowest_window(points: Sequence[ForecastPoint], duration_seconds: float) -> tuple[int, int]:
    """[first, last] indexes of the contiguous run of points covering at least
    `duration_seconds` with the lowest time-weighted mean; the earliest wins a tie."""
    if not points:
        raise ValueError("no forecast points")
    best: tuple[float, int, int] | None = None
    for first in range(len(points)):
        total = weight = 0.0
        for last in range(first, len(points)):
            span = points[last].end - points[last].start
            total += points[last].grams_per_kwh * span
            weight += span
            if points[last].end - points[first].start >= duration_seconds - 1e-9:
                mean = total / weight if weight > 0 else points[first].grams_per_kwh
                if best is None or mean < best[0] - 1e-9:
                    best = (mean, first, last)
                break
    if best is None:  # the whole forecast is shorter than the window
        return 0, len(points) - 1
    return best[1], best[2]


def _clock(epoch: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(epoch, tz=tz).strftime("%a %H:%M")


def format_forecast(
    forecast: Forecast,
    zone: str,
    window_seconds: float | None = None,
    tz: tzinfo = timezone.utc,
    max_rows: int = 48,
) -> str:
    """A small table, one row per period (hourly when the provider's are finer), with the
    lowest-carbon window of `window_seconds` (default: one period) marked with '*'."""
    points = list(forecast.points)
    if not points:
        return f"{forecast.provider}: no forecast points\n"
    if len(points) > max_rows:
        points = aggregate(points, 3600.0)
    period = points[0].end - points[0].start
    first, last = lowest_window(points, window_seconds or period)
    kind = "marginal " if forecast.marginal else ""
    tz_name = datetime.fromtimestamp(points[0].start, tz=tz).tzname() or "UTC"
    lines = [
        f"{kind}grid intensity forecast, {forecast.provider}, zone {zone} (times {tz_name})",
        f"  {'from':<9}  {'to':<9}  {'gCO2e/kWh':>9}",
    ]
    for index, point in enumerate(points):
        mark = "*" if first <= index <= last else " "
        lines.append(
            f"{mark} {_clock(point.start, tz):<9}  {_clock(point.end, tz):<9}  "
            f"{point.grams_per_kwh:>9.0f}"
        )
    chosen = points[first : last + 1]
    weight = sum(p.end - p.start for p in chosen)
    mean = (
        sum(p.grams_per_kwh * (p.end - p.start) for p in chosen) / weight
        if weight > 0
        else chosen[0].grams_per_kwh
    )
    lines.append(
        f"* lowest-carbon window: {_clock(chosen[0].start, tz)} to "
        f"{_clock(chosen[-1].end, tz)}, mean {mean:.0f} gCO2e/kWh"
    )
    return "\n".join(lines) + "\n"


def format_age(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_current(intensity: Intensity | None, now: float, zone: str | None = None) -> str:
    """One line: value, zone, provider, age, and whether it is marginal or estimated. Where
    the provider looked up another zone than the configured one (static falls back from an
    Electricity Maps zone to its country), both are shown."""
    if intensity is None:
        return "no grid intensity available\n"
    shown = intensity.zone
    if zone and zone != intensity.zone:
        shown = f"{zone} (as {intensity.zone})"
    notes = []
    if intensity.marginal:
        notes.append("marginal (MOER): the rate of the plants that follow load, not the mix")
    if intensity.is_estimated:
        notes.append("estimated")
    extra = f"; {'; '.join(notes)}" if notes else ""
    return (
        f"{intensity.grams_per_kwh:.1f} gCO2e/kWh  zone {shown}  "
        f"provider {intensity.provider}  age {format_age(intensity.age_seconds(now))}"
        f"{extra}\n"
    )
