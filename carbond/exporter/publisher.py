"""The exporter's sink: each accounted tick becomes the next immutable `Snapshot`.

It keeps what only the exported series need: bounded consumer series, host counters per
device, the tick histogram, and the counts that every `*_total` series continues from across
restarts (restored from the ledger's totals and state, and handed back to it every tick).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from carbond.carbon.intensity import Intensity
from carbond.exporter.series import ConsumerSeries
from carbond.exporter.snapshot import BudgetSample, DeviceSeries, GpuLabel, Snapshot
from carbond.types import Consumer, TickRecord

log = logging.getLogger(__name__)

COUNTERS_STATE = "counters"  # the ledger state key the counts are kept under
TICK_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DeviceKey = tuple[str, str, str]  # component, device, source


@dataclass(frozen=True)
class Health:
    """One tick's view of the parts' own state, for the self-monitoring series. Counts named
    `_total` are this run's; the publisher adds what earlier runs counted."""

    tick_seconds: float = 0.0  # how long the tick took
    meters_up: Mapping[str, bool] = field(default_factory=dict)
    meter_errors_total: Mapping[str, float] = field(default_factory=dict)
    wraps: Mapping[str, int] = field(default_factory=dict)  # this tick
    resets: Mapping[str, int] = field(default_factory=dict)  # this tick
    exited_tasks: int = 0  # this tick
    exit_overruns_total: int = 0
    gpus: tuple[GpuLabel, ...] = ()
    intensity: Intensity | None = None
    zone: str = ""
    fetch_errors_total: Mapping[str, float] = field(default_factory=dict)
    ledger_errors_total: int = 0
    budgets: tuple[BudgetSample, ...] = ()
    coverage_ratio: float | None = None
    platform_excess_joules: float = 0.0  # this tick
    metadata_errors_total: Mapping[str, float] = field(default_factory=dict)  # by source


@dataclass
class Counters:
    """Cumulative counts that only the publisher sees whole, carried across restarts through
    the ledger's state so that every `*_total` series continues where it stopped."""

    wraps: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)
    exited_tasks: int = 0
    tick_failures: int = 0
    host_grams: float = 0.0
    platform_excess_joules: float = 0.0
    # Counts kept by other parts (meters, feed, ledger) as exported at the last stop: added
    # to what those parts count in this run.
    carried: dict[str, dict[str, float]] = field(default_factory=dict)

    def plus_carried(self, family: str, counts: Mapping[str, float]) -> dict[str, float]:
        carried = self.carried.get(family, {})
        return {key: carried.get(key, 0.0) + counts.get(key, 0.0)
                for key in {*carried, *counts}}

    @classmethod
    def from_state(cls, state: Any, host_grams: float) -> Counters:
        """From the ledger's COUNTERS_STATE; anything malformed is started afresh."""
        counters = cls(host_grams=host_grams)
        if not isinstance(state, dict):
            return counters
        try:
            counters.wraps = {str(k): int(v) for k, v in state.get("wraps", {}).items()}
            counters.resets = {str(k): int(v) for k, v in state.get("resets", {}).items()}
            counters.exited_tasks = int(state.get("exited_tasks", 0))
            counters.tick_failures = int(state.get("tick_failures", 0))
            counters.platform_excess_joules = float(state.get("platform_excess_joules", 0.0))
            counters.carried = {
                str(family): {str(k): float(v) for k, v in counts.items()}
                for family, counts in state.get("carried", {}).items()
            }
        except (AttributeError, TypeError, ValueError):
            log.warning("ledger state %r is malformed: its counters start afresh",
                        COUNTERS_STATE)
            return cls(host_grams=host_grams)
        return counters


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


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


class Publisher:
    """Feed `publish()` every tick; `latest()` is what scrapes read."""

    def __init__(self, max_consumers: int, pue: float = 1.0,
                 keep_state: Callable[[str, Any], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pue = pue
        self._keep_state = keep_state
        self._series = ConsumerSeries(max_consumers, clock=clock)
        self._device_joules: dict[DeviceKey, float] = {}
        self._histogram = Histogram()
        self._counters = Counters()
        self._owners: dict[Consumer, Mapping[str, str]] = {}  # of the exported consumers
        self._snapshot = Snapshot(pue=pue)

    @property
    def max_consumers(self) -> int:
        return self._series.max_consumers

    @max_consumers.setter
    def max_consumers(self, value: int) -> None:
        self._series.max_consumers = value

    def restore(self, consumer_joules: Mapping[Consumer, Mapping[str, float]],
                consumer_grams: Mapping[Consumer, float],
                consumer_embodied_grams: Mapping[Consumer, float],
                consumer_age_seconds: Mapping[Consumer, float],
                device_joules: Mapping[DeviceKey, float], host_grams: float,
                state: Any) -> None:
        """Counters continue from the ledger's totals instead of starting at zero."""
        self._series.restore(dict(consumer_joules), dict(consumer_grams),
                             dict(consumer_embodied_grams), dict(consumer_age_seconds))
        self._device_joules.update(device_joules)
        self._counters = Counters.from_state(state, host_grams)
        folded = state.get("other") if isinstance(state, dict) else None
        if isinstance(folded, dict):
            try:
                self._series.continue_folded(folded)
            except (AttributeError, TypeError, ValueError):
                log.warning("ledger state %r: `other` is malformed; it continues from the "
                            "ledger's totals", COUNTERS_STATE)

    def latest(self) -> Snapshot:
        return self._snapshot

    def publish(self, record: TickRecord, health: Health) -> Snapshot:
        counters = self._counters
        _add(counters.wraps, health.wraps)
        _add(counters.resets, health.resets)
        counters.exited_tasks += health.exited_tasks
        counters.platform_excess_joules += health.platform_excess_joules
        counters.host_grams += record.host_grams
        for delta in record.devices:
            key = (delta.component, delta.device, delta.source)
            self._device_joules[key] = self._device_joules.get(key, 0.0) + delta.joules
        self._series.update(dict(record.energy), record.seconds, dict(record.grams),
                            dict(record.embodied_grams))
        self._histogram.observe(health.tick_seconds)
        self._snapshot = self._snapshot_of(record, health)
        if self._keep_state is not None:
            self._keep_state(COUNTERS_STATE, self.state())
        return self._snapshot

    def _devices(self, record: TickRecord) -> tuple[DeviceSeries, ...]:
        """Every series ever used, with power as the mean over the last tick (0 when not
        read in it)."""
        joules_now = {(d.component, d.device, d.source): d.joules for d in record.devices}
        seconds = record.seconds
        return tuple(
            DeviceSeries(*key, self._device_joules[key],
                         joules_now.get(key, 0.0) / seconds if seconds > 0 else 0.0)
            for key in sorted(self._device_joules))

    def _consumer_info(self, exported: tuple[tuple[Consumer, float], ...],
                       metadata: Mapping[Consumer, Mapping[str, str]]
                       ) -> tuple[tuple[Consumer, Mapping[str, str]], ...]:
        """carbond_consumer_info for exactly the consumers with energy series (a folded or
        expired consumer's info goes with its series): this tick's labels, else the last
        known; what is kept is bounded the same (only exported consumers are looked at)."""
        owners, kept = self._owners, {}
        for consumer, _grams in exported:
            labels = metadata.get(consumer) or owners.get(consumer)
            if labels:
                kept[consumer] = labels
        self._owners = kept
        return tuple(kept.items())

    def _snapshot_of(self, record: TickRecord, health: Health) -> Snapshot:
        counters = self._counters
        intensity = health.intensity
        grams_total = tuple(self._series.emissions())
        return Snapshot(
            devices=self._devices(record),
            meters_up=dict(health.meters_up),
            meter_errors_total=counters.plus_carried("meter_errors", health.meter_errors_total),
            counter_wraps_total=dict(counters.wraps),
            counter_resets_total=dict(counters.resets),
            tick_buckets=tuple(self._histogram.cumulative()),
            tick_seconds_sum=self._histogram.sum_seconds,
            consumers=tuple(self._series.samples()),
            consumer_grams_total=grams_total,
            consumer_embodied_grams_total=tuple(self._series.embodied()),
            exited_tasks_total=counters.exited_tasks,
            exit_records_lost_total=int(counters.plus_carried(
                "exit_overruns", {"": health.exit_overruns_total}).get("", 0)),
            host_grams_total=counters.host_grams,
            intensity=intensity,
            zone=health.zone,
            intensity_age_seconds=(intensity.age_seconds(record.wall_time)
                                   if intensity else None),
            intensity_fetch_errors_total=counters.plus_carried("fetch_errors",
                                                               health.fetch_errors_total),
            pue=self.pue,
            gpus=health.gpus,
            budgets=health.budgets,
            tick_failures_total=counters.tick_failures,
            last_tick_timestamp_seconds=record.wall_time,
            ledger_errors_total=int(counters.plus_carried(
                "ledger_errors", {"": health.ledger_errors_total}).get("", 0)),
            coverage_ratio=health.coverage_ratio,
            platform_excess_joules_total=counters.platform_excess_joules,
            consumer_info=self._consumer_info(grams_total, record.metadata),
            metadata_errors_total=counters.plus_carried("metadata_errors",
                                                        health.metadata_errors_total),
        )

    def state(self) -> dict[str, Any]:
        """What the next start needs to continue every counter from its exported value."""
        snap = self._snapshot
        return {
            "wraps": snap.counter_wraps_total,
            "resets": snap.counter_resets_total,
            "exited_tasks": snap.exited_tasks_total,
            "tick_failures": snap.tick_failures_total,
            "platform_excess_joules": snap.platform_excess_joules_total,
            "other": self._series.folded(),
            "carried": {
                "meter_errors": snap.meter_errors_total,
                "fetch_errors": snap.intensity_fetch_errors_total,
                "ledger_errors": {"": snap.ledger_errors_total},
                "exit_overruns": {"": snap.exit_records_lost_total},
                "metadata_errors": snap.metadata_errors_total,
            },
        }

    def tick_failed(self) -> Snapshot:
        """A tick raised: count it, keep serving the last good snapshot with the count."""
        self._counters.tick_failures += 1
        self._snapshot = dataclasses.replace(self._snapshot,
                                             tick_failures_total=self._counters.tick_failures)
        return self._snapshot
