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


WRAP, RESET, ERROR = "wrap", "reset", "error"
CEILING_WATTS = 5000.0
"""The most any one device may be taken to draw when it does not say (its power limit): above
any single CPU package, DRAM zone, platform or GPU, so it only catches the impossible."""
MAX_COUNTER_DIGITS = 20  # 2**64 - 1 has 20: a longer number is out of every range


def parse_counter(raw: bytes | str) -> int:
    """A counter file's contents as the kernel writes them: ASCII decimal digits and at most
    one trailing newline. Anything else (`+5`, ` 5`, `1_000_000`, `0x10`, `-1`, non-ASCII
    digits), which `int()` would take or bend, is a ValueError: a bad sample, never energy."""
    data = raw.encode("latin-1", "replace") if isinstance(raw, str) else bytes(raw)
    digits = data[:-1] if data.endswith(b"\n") else data
    if not digits or len(digits) > MAX_COUNTER_DIGITS or not digits.isdigit():
        raise ValueError(f"not a counter value: {data[:40]!r}")
    return int(digits)


class EnergyCounter:
    """Turns a raw, wrapping hardware counter into a cumulative, never-decreasing total.

    `range_units` is the largest raw value (`max_energy_range_uj`); the counter wraps to 0 after
    it, so a delta is taken modulo `range_units + 1`. `max_units_per_second` is the most the
    device can draw (twice its power limit, or a ceiling). A raw value is an ERROR sample,
    counted by the meter and never energy, when it is outside 0..range_units, or when the energy
    it implies since the last good reading exceeds `max_units_per_second` however it is read
    (an increase, a wrap, or a reset whose new value is the energy since): one read of 2**64,
    or a glitch, added 1.8e13 J before. The baseline stays on the last good value, so the next
    good reading continues from it. A decrease is a reset (the zone was re-created, the driver
    reloaded) when it cannot be a plausible wrap; then the new raw value is the energy since.
    A counter that really did restart from another value is picked up at the second reading
    that goes on plausibly from the first rejected one (a RESET, adding only what was drawn
    between those two).
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
        self._rejected: tuple[int, float | None] | None = None  # the last ERROR sample

    def restart(self) -> None:
        """Forget the baseline (a different device took this name): the next value is a new
        baseline, adding nothing."""
        self.last_raw = self.last_seconds = self._rejected = None

    def update(self, raw: int, now_seconds: float | None = None) -> str | None:
        """Feed a raw reading taken at monotonic `now_seconds`; returns WRAP, RESET, ERROR or
        None."""
        if raw < 0 or (self.range_units is not None and raw > self.range_units):
            return ERROR
        previous, last_seconds = self.last_raw, self.last_seconds
        if previous is None:
            self._accept(raw, now_seconds)
            return None
        event, units = self._step(previous, raw, now_seconds, last_seconds)
        if not self._plausible(units, now_seconds, last_seconds):
            rejected = self._rejected
            if rejected is None or raw < rejected[0] or not self._plausible(
                    raw - rejected[0], now_seconds, rejected[1]):
                self._rejected = (raw, now_seconds)
                return ERROR
            event, units = RESET, raw - rejected[0]
        self.total_units += units
        if event == WRAP:
            self.wraps += 1
        elif event == RESET:
            self.resets += 1
        self._accept(raw, now_seconds)
        return event

    def _accept(self, raw: int, now: float | None) -> None:
        self.last_raw, self.last_seconds, self._rejected = raw, now, None

    def _step(self, previous: int, raw: int, now: float | None,
              last: float | None) -> tuple[str | None, int]:
        if raw >= previous:
            return None, raw - previous
        if self.range_units is not None and previous <= self.range_units:
            wrapped = (raw - previous) % (self.range_units + 1)
            if self._plausible(wrapped, now, last):
                return WRAP, wrapped
        return RESET, raw

    def _plausible(self, units: int, now: float | None, last: float | None) -> bool:
        """Whether `units` could have been drawn between `last` and `now`; without a bound or
        a clock that moved, only the range check applies."""
        if self.max_units_per_second is None or now is None or last is None or now <= last:
            return True
        return units <= self.max_units_per_second * (now - last)
