"""What one tick leaves behind for the exporter: immutable, swapped in whole.

Scrapes read the latest Snapshot by reference and never trigger measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from carbond.attribution import ATTRIBUTED, is_platform_meter
from carbond.carbon.intensity import Intensity
from carbond.exporter.series import SeriesSample
from carbond.types import Consumer


@dataclass(frozen=True)
class DeviceSeries:
    """carbond_host_energy_joules_total and carbond_host_power_watts of one device."""

    component: str
    device: str
    source: str
    joules_total: float
    watts: float


@dataclass(frozen=True)
class GpuLabel:
    device: str
    uuid: str
    name: str


@dataclass(frozen=True)
class BudgetSample:
    """One emission budget now: carbond_budget_{limit,used,projected}_grams{budget}."""

    name: str
    limit_grams: float
    used_grams: float
    projected_grams: float
    period_start: float  # epoch seconds, the period's calendar start
    period_end: float


@dataclass(frozen=True)
class Snapshot:
    devices: tuple[DeviceSeries, ...] = ()
    meters_up: dict[str, bool] = field(default_factory=dict)
    meter_errors_total: dict[str, float] = field(default_factory=dict)
    counter_wraps_total: dict[str, int] = field(default_factory=dict)
    tick_buckets: tuple[tuple[str, int], ...] = ()
    tick_seconds_sum: float = 0.0
    consumers: tuple[SeriesSample, ...] = ()
    consumer_grams_total: tuple[tuple[Consumer, float], ...] = ()
    exited_tasks_total: int = 0
    host_grams_total: float = 0.0
    intensity: Intensity | None = None
    zone: str = ""  # the configured (or resolved) zone: the `zone` label, whoever answers
    intensity_age_seconds: float | None = None
    intensity_fetch_errors_total: dict[str, float] = field(default_factory=dict)
    pue: float = 1.0
    gpus: tuple[GpuLabel, ...] = ()
    consumer_embodied_grams_total: tuple[tuple[Consumer, float], ...] = ()
    budgets: tuple[BudgetSample, ...] = ()
    counter_resets_total: dict[str, int] = field(default_factory=dict)
    exit_records_lost_total: int = 0
    tick_failures_total: int = 0
    last_tick_timestamp_seconds: float = 0.0  # wall clock of the last successful tick
    ledger_errors_total: int = 0
    coverage_ratio: float | None = None  # measured parts / platform, where one measures
    platform_excess_joules_total: float = 0.0  # parts beyond the platform reading
    # carbond_consumer_info: the owner's labels of exported consumers (the energy series'
    # set, at most max_consumers), where known
    consumer_info: tuple[tuple[Consumer, Mapping[str, str]], ...] = ()
    metadata_errors_total: dict[str, float] = field(default_factory=dict)  # source -> count


def host_watts(snapshot: Snapshot) -> float:
    """Host power as attribution counts it: the platform meter's where one had power in the
    tick (only the chosen one does), else cpu + dram + gpu; psys overlaps and is never added."""
    platform = math.fsum(d.watts for d in snapshot.devices
                         if is_platform_meter(d) and d.watts > 0)
    if platform > 0:
        return platform
    return math.fsum(d.watts for d in snapshot.devices if d.component in ATTRIBUTED)


def status_line(snapshot: Snapshot) -> str:
    """What `systemctl status carbond` shows: consumers, host power, intensity and provider."""
    consumers = len({sample.consumer for sample in snapshot.consumers})
    text = f"{consumers} consumers, host {host_watts(snapshot):.1f} W"
    intensity = snapshot.intensity
    if intensity is None:
        text += ", no grid intensity yet"
    else:
        zone = snapshot.zone or intensity.zone
        text += f", {intensity.grams_per_kwh:.0f} g/kWh from {intensity.provider} ({zone})"
    if snapshot.tick_failures_total:
        text += f", {snapshot.tick_failures_total} failed ticks"
    return " ".join(text.split())  # a STATUS= value must not end the datagram's line early
