"""Per-device energy between ticks: pure, no I/O.

Meters report cumulative joules; this turns them into per-tick deltas, so that a meter that
restarts or a device that disappears and comes back never gives negative energy.
"""

from __future__ import annotations

from collections.abc import Iterable

from carbond.types import DeviceDelta, DeviceEnergy

SeriesKey = tuple[str, str, str]  # component, device, source


class DeviceDeltas:
    """The last cumulative reading of every device, and the energy since."""

    def __init__(self) -> None:
        self._last_cumulative: dict[SeriesKey, float] = {}

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
