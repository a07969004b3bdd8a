"""The one small interface every energy source implements.

A meter's `read()` returns cumulative joules per device since the meter started, already
corrected for counter wrap and reset, so downstream code only ever subtracts two readings.
A device whose read failed is simply absent from that reading ("no sample", never zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class DeviceEnergy:
    device: str  # package-0, dram-0, psys, gpu-0, cpu (model)
    component: str  # cpu, dram, gpu, platform
    source: str  # rapl, nvml, model
    joules: float  # cumulative since the meter started, never decreasing


@dataclass
class MeterReading:
    devices: list[DeviceEnergy] = field(default_factory=list)
    errors: int = 0  # failed device reads during this read (cumulative count is the meter's)
    wraps: dict[str, int] = field(default_factory=dict)  # device -> wraps/resets seen this read


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

    def report(self) -> list[DeviceReport]: ...

    def close(self) -> None: ...


class EnergyCounter:
    """Turns a raw, wrapping hardware counter into a cumulative, never-decreasing total.

    `range_units` is the largest raw value (`max_energy_range_uj`); the counter wraps to 0 after
    it, so a delta is taken modulo `range_units + 1`. Without a known range a decrease can't be
    told apart from a reset: it is treated as a restart from zero, so the new raw value is the
    energy since then (never negative, never a spike).
    """

    def __init__(self, range_units: int | None = None) -> None:
        self.range_units = range_units
        self.last_raw: int | None = None
        self.total_units = 0
        self.wraps = 0

    def update(self, raw: int) -> int:
        """Feed a raw reading; returns how many wraps/resets this update saw (0 or 1)."""
        if self.last_raw is None:
            self.last_raw = raw
            return 0
        previous, self.last_raw = self.last_raw, raw
        if raw >= previous:
            self.total_units += raw - previous
            return 0
        self.wraps += 1
        if self.range_units is not None and previous <= self.range_units:
            self.total_units += (raw - previous) % (self.range_units + 1)
        else:
            self.total_units += raw
        return 1
