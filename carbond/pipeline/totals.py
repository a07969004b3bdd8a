"""Per-device energy bookkeeping between ticks: pure, no I/O.

Meters report cumulative joules; this turns them into per-tick deltas and exported totals that
never go backwards, even when a meter restarts or a device disappears and comes back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from carbond.types import DeviceDelta, DeviceEnergy

TICK_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

SeriesKey = tuple[str, str, str]  # component, device, source


@dataclass(frozen=True)
class DeviceSeries:
    component: str
    device: str
    source: str
    joules_total: float
    watts: float


class DeviceTotals:
    """Exported host counters: the sum of the deltas counted as host energy, per series."""

    def __init__(self) -> None:
        self._last_cumulative: dict[SeriesKey, float] = {}
        self.joules_total: dict[SeriesKey, float] = {}

    def deltas(self, readings: Iterable[DeviceEnergy]) -> list[DeviceDelta]:
        """Energy since each device's previous reading; a first sighting is 0 J (a baseline).

        Every reading moves its baseline, counted or not, so a meter that only stands in now
        and then (the model) never brings energy from ticks it did not stand in for.
        """
        deltas = []
        for energy in readings:
            key = (energy.component, energy.device, energy.source)
            previous = self._last_cumulative.get(key)
            self._last_cumulative[key] = energy.joules
            joules = 0.0 if previous is None else max(0.0, energy.joules - previous)
            deltas.append(DeviceDelta(*key, joules))
        return deltas

    def add(self, counted: Iterable[DeviceDelta]) -> None:
        for delta in counted:
            key = (delta.component, delta.device, delta.source)
            self.joules_total[key] = self.joules_total.get(key, 0.0) + delta.joules


def series(totals: DeviceTotals, deltas: list[DeviceDelta], seconds: float) -> list[DeviceSeries]:
    """Every series ever used, with power as the mean over the last tick (0 when not read)."""
    joules_now = {(d.component, d.device, d.source): d.joules for d in deltas}
    result = []
    for key in sorted(totals.joules_total):
        watts = joules_now.get(key, 0.0) / seconds if seconds > 0 else 0.0
        result.append(DeviceSeries(*key, totals.joules_total.get(key, 0.0), watts))
    return result


class Histogram:
    """A cumulative histogram for the tick duration, published by value in each snapshot."""

    def __init__(self, buckets: tuple[float, ...] = TICK_BUCKETS_SECONDS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum_seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.sum_seconds += seconds
        for index, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[index] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, rows = 0, []
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows
