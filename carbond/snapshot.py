"""What one tick leaves behind for the exporter: immutable, swapped in whole.

Scrapes read the latest Snapshot by reference and never trigger measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carbond.carbon.model import Intensity
from carbond.cardinality import SeriesSample
from carbond.consumers import Consumer
from carbond.energy import DeviceSeries


@dataclass(frozen=True)
class GpuLabel:
    device: str
    uuid: str
    name: str


@dataclass(frozen=True)
class Snapshot:
    devices: tuple[DeviceSeries, ...] = ()
    meters_up: dict[str, bool] = field(default_factory=dict)
    meter_errors_total: dict[str, int] = field(default_factory=dict)
    counter_wraps_total: dict[str, int] = field(default_factory=dict)
    tick_buckets: tuple[tuple[str, int], ...] = ()
    tick_seconds_sum: float = 0.0
    consumers: tuple[SeriesSample, ...] = ()
    consumer_grams_total: tuple[tuple[Consumer, float], ...] = ()
    exited_tasks_total: int = 0
    host_grams_total: float = 0.0
    intensity: Intensity | None = None
    intensity_age_seconds: float | None = None
    intensity_fetch_errors_total: dict[str, int] = field(default_factory=dict)
    pue: float = 1.0
    gpus: tuple[GpuLabel, ...] = ()
