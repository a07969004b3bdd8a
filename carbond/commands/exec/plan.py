"""`carbond exec --greenest`: when to start a run of known length so that the mean forecast
grid intensity over it is lowest, and by how much that beats starting now. Pure: no clock, no
network; the caller fetches the forecast and waits."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from carbond.carbon.intensity import ForecastPoint

RELATIVE_TIE = 1e-9  # means this close are equal: the earlier start wins (no needless wait)


@dataclass(frozen=True)
class Plan:
    """The chosen start (epoch seconds) and the mean forecast intensity over the run from it,
    next to the mean when starting at `now`."""

    now: float
    start: float
    duration_seconds: float
    grams_per_kwh: float
    now_grams_per_kwh: float

    @property
    def wait_seconds(self) -> float:
        return max(0.0, self.start - self.now)

    @property
    def saving_percent(self) -> float:
        """How much lower the planned mean is than starting now, in percent (0 when now is
        already best, or the forecast is all zero)."""
        if self.now_grams_per_kwh <= 0:
            return 0.0
        return max(0.0, 100.0 * (1.0 - self.grams_per_kwh / self.now_grams_per_kwh))


class Steps:
    """A forecast as one step function over all time: periods in order, a gap split at its
    middle between the two neighbours (each instant takes the nearest period's value), an
    overlap cut where the later period starts, the first value before the forecast and the
    last after its horizon. `integral` is O(log n), so planning over thousands of points is
    instant."""

    def __init__(self, points: Sequence[ForecastPoint]) -> None:
        usable = sorted(
            (p for p in points
             if math.isfinite(p.start) and math.isfinite(p.end) and p.end > p.start
             and math.isfinite(p.grams_per_kwh) and p.grams_per_kwh >= 0),
            key=lambda p: (p.start, p.end),
        )
        if not usable:
            raise ValueError("no usable forecast points")
        bounds = [usable[0].start]
        values: list[float] = []
        for index, point in enumerate(usable):
            following = usable[index + 1] if index + 1 < len(usable) else None
            end = point.end
            if following is not None:
                end = min(end, following.start) if following.start < end else (
                    (end + following.start) / 2.0)
            if end > bounds[-1]:
                bounds.append(end)
                values.append(point.grams_per_kwh)
        if not values:  # every period overlapped away: the last one alone
            bounds, values = [usable[-1].start, usable[-1].end], [usable[-1].grams_per_kwh]
        self.bounds = bounds
        self.values = values
        self._cumulative = [0.0]
        for index, value in enumerate(values):
            self._cumulative.append(
                self._cumulative[-1] + value * (bounds[index + 1] - bounds[index]))

    @property
    def boundaries(self) -> list[float]:
        return list(self.bounds)

    def integral(self, moment: float) -> float:
        """∫ intensity dt from the first boundary to `moment` (negative before it)."""
        bounds, values = self.bounds, self.values
        if moment <= bounds[0]:
            return (moment - bounds[0]) * values[0]
        if moment >= bounds[-1]:
            return self._cumulative[-1] + (moment - bounds[-1]) * values[-1]
        index = bisect.bisect_right(bounds, moment) - 1
        return self._cumulative[index] + (moment - bounds[index]) * values[index]

    def value_at(self, moment: float) -> float:
        if moment < self.bounds[0]:
            return self.values[0]
        index = min(bisect.bisect_right(self.bounds, moment) - 1, len(self.values) - 1)
        return self.values[index]

    def mean(self, start: float, seconds: float) -> float:
        if seconds <= 0:
            return self.value_at(start)
        return (self.integral(start + seconds) - self.integral(start)) / seconds


def mean_intensity(points: Sequence[ForecastPoint], start: float, seconds: float) -> float:
    """Time-weighted mean forecast intensity over [start, start + seconds) (see `Steps` for
    gaps and the ends); `seconds` 0 gives the value at `start`. ValueError: no usable point."""
    return Steps(points).mean(start, seconds)


def plan_greenest(
    points: Sequence[ForecastPoint], now: float, deadline_seconds: float, duration_seconds: float
) -> Plan:
    """The start in [now, now + deadline - duration] (the run ends by the deadline) that
    minimises the mean forecast intensity over the run; the earliest start among equals.

    The mean is piecewise linear in the start, with kinks only where the run's start or end
    crosses a period boundary, so the minimum is at one of those starts or at either end of
    the range: checking those is exact. Raises ValueError for no usable points or a run longer
    than the deadline.
    """
    steps = Steps(points)
    if not (duration_seconds > 0 and deadline_seconds >= duration_seconds):
        raise ValueError("the run must be shorter than the deadline")
    latest = now + deadline_seconds - duration_seconds
    candidates = {now, latest}
    for boundary in steps.boundaries:
        for start in (boundary, boundary - duration_seconds):
            if now <= start <= latest:
                candidates.add(start)
    now_mean = steps.mean(now, duration_seconds)
    best_start, best_mean = now, now_mean
    for start in sorted(candidates):
        mean = steps.mean(start, duration_seconds)
        if mean < best_mean - RELATIVE_TIE * max(1.0, abs(best_mean)):
            best_start, best_mean = start, mean
    return Plan(now, best_start, duration_seconds, best_mean, now_mean)
