"""Forecasts: the first one a provider can give, bucketed, and its lowest-carbon window.
`fetch_forecast` is the only function here that touches the network (through the providers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from carbond.carbon.intensity import FetchError, ForecastPoint, ForecastUnsupported
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
