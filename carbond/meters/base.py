"""The one small interface every energy source implements.

A meter's `read()` returns cumulative joules per device since the meter started, already
corrected for counter wrap and reset, so downstream code only ever subtracts two readings.
A device whose read failed is simply absent from that reading ("no sample", never zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from carbond.types import DeviceEnergy


@dataclass
class MeterReading:
    devices: list[DeviceEnergy] = field(default_factory=list)
    errors: int = 0  # failed device reads during this read (cumulative count is the meter's)
    wraps: dict[str, int] = field(default_factory=dict)  # device -> wraps seen this read
    resets: dict[str, int] = field(default_factory=dict)  # device -> resets seen this read


@dataclass(frozen=True)
class DeviceReport:
    """One line of `carbond check`: what a device is and whether it can be read."""

    device: str
    detail: str
    ok: bool


class Meter(Protocol):
    name: str
    errors_total: int  # failed device reads since start, also those between reads

    def read(self) -> MeterReading: ...

    def up(self) -> bool:
        """True when the last read produced at least one device sample."""
        ...

    def components(self) -> frozenset[str]:
        """The components a hardware counter of this meter measures (cpu, dram, gpu,
        platform); empty for an estimate. The power model stands in only for the rest."""
        ...

    def report(self) -> list[DeviceReport]: ...

    def close(self) -> None: ...


WRAP, RESET = "wrap", "reset"


class EnergyCounter:
    """Turns a raw, wrapping hardware counter into a cumulative, never-decreasing total.

    `range_units` is the largest raw value (`max_energy_range_uj`); the counter wraps to 0 after
    it, so a delta is taken modulo `range_units + 1`. A decrease is a reset instead (the zone
    was re-created, firmware restarted the counter) when the range is unknown, or when the
    wrapped delta would mean more than `max_units_per_second` since the last reading: no
    device draws that, and taking it for a wrap would add most of a whole range at once. After
    a reset the new raw value is the energy since then (never negative, never a spike).
    """

    def __init__(self, range_units: int | None = None,
                 max_units_per_second: float | None = None) -> None:
        self.range_units = range_units
        self.max_units_per_second = max_units_per_second
        self.last_raw: int | None = None
        self.last_seconds: float | None = None
        self.total_units = 0
        self.wraps = 0
        self.resets = 0

    def update(self, raw: int, now_seconds: float | None = None) -> str | None:
        """Feed a raw reading taken at monotonic `now_seconds`; returns WRAP, RESET or None."""
        previous, last_seconds = self.last_raw, self.last_seconds
        self.last_raw, self.last_seconds = raw, now_seconds
        if previous is None:
            return None
        if raw >= previous:
            self.total_units += raw - previous
            return None
        if self.range_units is not None and previous <= self.range_units:
            wrapped = (raw - previous) % (self.range_units + 1)
            if not self._implausible(wrapped, now_seconds, last_seconds):
                self.total_units += wrapped
                self.wraps += 1
                return WRAP
        self.total_units += raw
        self.resets += 1
        return RESET

    def _implausible(self, units: int, now: float | None, last: float | None) -> bool:
        if self.max_units_per_second is None or now is None or last is None or now <= last:
            return False
        return units > self.max_units_per_second * (now - last)
