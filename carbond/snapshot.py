"""What one tick leaves behind for the exporter: immutable, swapped in whole.

Scrapes read the latest Snapshot by reference and never trigger measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carbond.energy import DeviceSeries


@dataclass(frozen=True)
class Snapshot:
    devices: tuple[DeviceSeries, ...] = ()
    meters_up: dict[str, bool] = field(default_factory=dict)
    meter_errors_total: dict[str, int] = field(default_factory=dict)
    counter_wraps_total: dict[str, int] = field(default_factory=dict)
    tick_buckets: tuple[tuple[str, int], ...] = ()
    tick_seconds_sum: float = 0.0
    ticks_total: int = 0
