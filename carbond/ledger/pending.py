"""What the ledger holds in memory between flushes: the running totals, the hourly rows not yet
written (typed records), owner metadata, and what changed since the last flush.

The tick path (`Book.book`) only adds here, O(consumers) and without I/O; the flush thread
`take()`s a batch, and `put_back()`s it when the disk refused it. Memory stays bounded:
totals of consumers not seen for `keep_seconds` leave memory once written (`evict`), and a
consumer that returns starts from 0 here, "unresolved", until the flush thread has added its
stored totals (`resolve`), so the totals written are always the whole ones.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass

from carbond.ledger.periods import spread_over_hours
from carbond.ledger.schema import DeviceKey, Totals, positive, text
from carbond.types import Consumer, TickRecord

log = logging.getLogger("carbond.ledger.ledger")  # one logger for the ledger

# Rows kept in memory while the disk refuses writes (about 20 MB): 200 consumers for 20 days.
# Past this the oldest hours are dropped (and logged); the totals in memory stay exact.
MAX_PENDING_ROWS = 100_000
MAX_NAME_CACHE = 10_000


@dataclass(slots=True)
class HourRow:
    """One consumer's hour as booked since the last flush (added to the stored row)."""

    cpu_joules: float = 0.0
    dram_joules: float = 0.0
    gpu_joules: float = 0.0
    platform_joules: float = 0.0
    grams: float = 0.0
    embodied_grams: float = 0.0
    intensity_joules: float = 0.0
    intensity_weighted: float = 0.0
    providers: int = 0  # bit mask over the provider ids

    def add(self, other: HourRow) -> None:
        self.cpu_joules += other.cpu_joules
        self.dram_joules += other.dram_joules
        self.gpu_joules += other.gpu_joules
        self.platform_joules += other.platform_joules
        self.grams += other.grams
        self.embodied_grams += other.embodied_grams
        self.intensity_joules += other.intensity_joules
        self.intensity_weighted += other.intensity_weighted
        self.providers |= other.providers

    def copy(self) -> HourRow:
        return HourRow(*astuple(self))


HourKey = tuple[int, Consumer]
DeviceSlot = tuple[int, str, str, str]  # hour, component, device, source


@dataclass
class Batch:
    """What one flush writes, taken from memory under the lock."""

    hours: dict[HourKey, HourRow]
    devices: dict[DeviceSlot, float]
    energy: list[tuple[Consumer, str, float]]
    grams: list[tuple[Consumer, float, float, float]]
    labels: list[tuple[Consumer, dict[str, str]]]
    device_totals: list[tuple[str, str, str, float]]
    host: list[tuple[str, float]]
    state: list[tuple[str, str]]
    providers: list[tuple[int, str]]

    def empty(self) -> bool:
        return not (self.hours or self.devices or self.energy or self.grams or self.labels
                    or self.device_totals or self.host or self.state)

    def consumers(self) -> Iterable[Consumer]:
        yield from (c for _, c in self.hours)
        yield from (row[0] for row in self.grams)
        yield from (row[0] for row in self.labels)


def _merge_rows(into: dict[HourKey, HourRow], rows: Mapping[HourKey, HourRow]) -> None:
    for key, row in rows.items():
        mine = into.get(key)
        if mine is None:
            into[key] = row
        else:
            mine.add(row)


def _merge_devices(into: dict[DeviceSlot, float], slots: Mapping[DeviceSlot, float]) -> None:
    for slot, joules in slots.items():
        into[slot] = into.get(slot, 0.0) + joules


class Book:
    """The ledger's memory. Not thread-safe: the Ledger calls it under its lock."""

    def __init__(self, warn_once: Callable[..., None]) -> None:
        self.totals = Totals()
        self.hours: dict[HourKey, HourRow] = {}
        self.devices: dict[DeviceSlot, float] = {}
        self.labels: dict[Consumer, dict[str, str]] = {}  # as last known (and written)
        self.dirty_consumers: set[Consumer] = set()
        self.dirty_labels: set[Consumer] = set()
        self.dirty_devices: set[DeviceKey] = set()
        self.dirty_state: set[str] = set()
        self.host_dirty = False
        self.unresolved: set[Consumer] = set()  # totals here lack what the file holds
        self.provider_bits: dict[str, int] = {}
        self.dropped_rows = 0
        self._names: dict[object, Consumer] = {}
        self._warn_once = warn_once

    # ---- the tick path ---------------------------------------------------------------------

    def _consumer(self, key: object) -> Consumer:
        consumer = self._names.get(key)
        if consumer is None:
            kind, name = key  # type: ignore[misc]
            consumer = Consumer(text(kind), text(name))
            if len(self._names) > MAX_NAME_CACHE:
                self._names.clear()
            self._names[key] = consumer
        return consumer

    def _provider_bit(self, provider: str) -> int:
        index = self.provider_bits.get(provider)
        if index is None:
            index = max(self.provider_bits.values(), default=-1) + 1
            if index > 62:
                return 0  # more provider names than bits: stop tracking new ones
            self.provider_bits[provider] = index
        return 1 << index

    def _known(self, consumer: Consumer) -> None:
        """A consumer booked while memory holds no totals for it: new, or evicted and back."""
        if consumer not in self.totals.consumer_updated:
            self.unresolved.add(consumer)

    def book(self, record: TickRecord) -> None:
        """Add one tick to the totals and the pending hourly rows."""
        wall_time, seconds = record.wall_time, record.seconds
        if not math.isfinite(wall_time):
            return
        energy, grams, embodied_grams = record.energy, record.grams, record.embodied_grams
        intensity, provider = record.grams_per_kwh, record.provider
        totals = self.totals
        if totals.first_record is None:
            totals.first_record = wall_time
        shares = spread_over_hours(wall_time, seconds)
        weight = intensity if intensity is not None and 0.0 <= intensity < math.inf else None
        bit = self._provider_bit(text(provider)) if provider and weight is not None else 0
        hours = self.hours
        for key in set(energy) | set(grams) | set(embodied_grams):
            cpu = dram = gpu = platform = 0.0
            parts = [(c, j) for c, j in energy.get(key, {}).items() if positive(j)]
            consumer_grams = grams.get(key, 0.0)
            consumer_grams = consumer_grams if positive(consumer_grams) else 0.0
            embodied = embodied_grams.get(key, 0.0)
            embodied = embodied if positive(embodied) else 0.0
            if not parts and not consumer_grams and not embodied:
                continue  # an idle cgroup: nothing to book, no row to write
            consumer = self._consumer(key)
            self._known(consumer)
            energy_total = totals.consumer_joules.setdefault(consumer, {})
            for component, joules in parts:
                energy_total[component] = energy_total.get(component, 0.0) + joules
                if component == "cpu":
                    cpu += joules
                elif component == "dram":
                    dram += joules
                elif component == "gpu":
                    gpu += joules
                elif component == "platform":
                    platform += joules
                else:
                    self._warn_once(f"component {component}", "ledger: component %r has no "
                                    "hourly column; kept in totals only", component)
            joules_sum = cpu + dram + gpu + platform
            totals.consumer_grams[consumer] = (
                totals.consumer_grams.get(consumer, 0.0) + consumer_grams)
            totals.consumer_embodied_grams[consumer] = (
                totals.consumer_embodied_grams.get(consumer, 0.0) + embodied)
            totals.consumer_updated[consumer] = wall_time
            totals.host_grams += consumer_grams
            totals.host_embodied_grams += embodied
            self.dirty_consumers.add(consumer)
            for hour, share in shares:
                row = hours.get((hour, consumer))
                if row is None:
                    row = hours[(hour, consumer)] = HourRow()
                row.cpu_joules += cpu * share
                row.dram_joules += dram * share
                row.gpu_joules += gpu * share
                row.platform_joules += platform * share
                row.grams += consumer_grams * share
                row.embodied_grams += embodied * share
                if weight is not None and joules_sum > 0:
                    row.intensity_joules += joules_sum * share
                    row.intensity_weighted += joules_sum * share * weight
                    row.providers |= bit
        if record.metadata:
            self._book_labels(record.metadata, wall_time)
        self._book_devices(record, shares)
        self.host_dirty = True
        if len(hours) > MAX_PENDING_ROWS:
            self.drop_oldest()

    def _book_labels(self, metadata: Mapping[Consumer, Mapping[str, str]],
                     wall_time: float) -> None:
        """Owner metadata, marked for writing only when it changed (most ticks: never)."""
        for key, labels in metadata.items():
            consumer = self._consumer(key)
            known = self.labels.get(consumer)
            if known == labels:
                continue
            clean = {text(k): text(v) for k, v in labels.items() if v}
            if known == clean:
                continue
            self.labels[consumer] = clean
            self.dirty_labels.add(consumer)
            if consumer not in self.totals.consumer_updated:
                self._known(consumer)  # written with a totals row, so eviction finds it
                self.totals.consumer_updated[consumer] = wall_time
                self.dirty_consumers.add(consumer)

    def _book_devices(self, record: TickRecord, shares: list[tuple[int, float]]) -> None:
        devices: dict[DeviceKey, float] = {}
        for d in record.devices:
            key = (d.component, d.device, d.source)
            devices[key] = devices.get(key, 0.0) + d.joules
        totals = self.totals
        for device_key, joules in devices.items():
            if not positive(joules):
                continue
            device_key = (text(device_key[0]), text(device_key[1]), text(device_key[2]))
            totals.device_joules[device_key] = totals.device_joules.get(device_key, 0.0) + joules
            self.dirty_devices.add(device_key)
            for hour, share in shares:
                slot = (hour, *device_key)
                self.devices[slot] = self.devices.get(slot, 0.0) + joules * share

    def drop_oldest(self) -> None:
        oldest = min(hour for hour, _ in self.hours)
        dropped = [key for key in self.hours if key[0] == oldest]
        for key in dropped:
            del self.hours[key]
        for slot in [slot for slot in self.devices if slot[0] == oldest]:
            del self.devices[slot]
        self.dropped_rows += len(dropped)
        self._warn_once("dropped", "ledger: writes failing for long; hourly rows from %s on "
                        "are being dropped (totals stay exact)",
                        time.strftime("%Y-%m-%d %H:00Z", time.gmtime(oldest)))

    def put_state(self, key: str, value: object) -> None:
        self.totals.state[key] = value
        self.dirty_state.add(key)

    # ---- the flush thread ------------------------------------------------------------------

    def resolve(self, stored: Totals, labels: Mapping[Consumer, Mapping[str, str]],
                asked: Iterable[Consumer]) -> None:
        """Add the stored totals of returning consumers (`asked`, read from the file) to what
        was booked for them since they came back."""
        t = self.totals
        for consumer in asked:
            if consumer not in self.unresolved:
                continue
            self.unresolved.discard(consumer)
            for component, joules in stored.consumer_joules.get(consumer, {}).items():
                parts = t.consumer_joules.setdefault(consumer, {})
                parts[component] = parts.get(component, 0.0) + joules
            for mine, theirs in ((t.consumer_grams, stored.consumer_grams),
                                 (t.consumer_embodied_grams, stored.consumer_embodied_grams)):
                if consumer in theirs:
                    mine[consumer] = mine.get(consumer, 0.0) + theirs[consumer]
            if consumer in labels and consumer not in self.labels:
                self.labels[consumer] = dict(labels[consumer])

    def take(self) -> Batch:
        """Everything to write, leaving memory with nothing pending; totals of unresolved
        consumers stay dirty (writing them now would overwrite the stored ones)."""
        t = self.totals
        ready = self.dirty_consumers - self.unresolved
        batch = Batch(
            hours=self.hours,
            devices=self.devices,
            energy=[(c, component, joules) for c in ready
                    for component, joules in t.consumer_joules.get(c, {}).items()],
            grams=[(c, t.consumer_grams.get(c, 0.0), t.consumer_embodied_grams.get(c, 0.0),
                    t.consumer_updated.get(c, 0.0)) for c in ready],
            labels=[(c, dict(self.labels[c])) for c in self.dirty_labels - self.unresolved
                    if c in self.labels],
            device_totals=[(*key, t.device_joules[key]) for key in self.dirty_devices],
            host=self._host_rows() if self.host_dirty else [],
            state=[(key, json.dumps(t.state[key])) for key in self.dirty_state
                   if key in t.state],
            providers=[(index, name) for name, index in self.provider_bits.items()],
        )
        self.hours, self.devices = {}, {}
        self.dirty_consumers = self.dirty_consumers & self.unresolved
        self.dirty_labels = self.dirty_labels & self.unresolved
        self.dirty_devices, self.dirty_state = set(), set()
        self.host_dirty = False
        return batch

    def _host_rows(self) -> list[tuple[str, float]]:
        t = self.totals
        rows = [("grams", t.host_grams), ("embodied_grams", t.host_embodied_grams)]
        if t.first_record is not None:
            rows.append(("first_record", t.first_record))
        return rows

    def put_back(self, batch: Batch) -> None:
        """A failed flush: its rows rejoin what was booked since, its totals stay dirty."""
        _merge_rows(self.hours, batch.hours)
        _merge_devices(self.devices, batch.devices)
        self.dirty_consumers.update(c for c, *_ in batch.grams)
        self.dirty_labels.update(c for c, _ in batch.labels)
        self.dirty_devices.update((c, d, s) for c, d, s, _ in batch.device_totals)
        self.dirty_state.update(key for key, _ in batch.state)
        self.host_dirty = self.host_dirty or bool(batch.host)
        while len(self.hours) > MAX_PENDING_ROWS:
            self.drop_oldest()

    def rewrite_everything(self) -> None:
        """The file is new (the old one was corrupt, or deleted and not copied): every total
        and label goes into it at the next flush."""
        t = self.totals
        self.dirty_consumers.update(t.consumer_updated, t.consumer_joules, t.consumer_grams)
        self.dirty_labels.update(self.labels)
        self.dirty_devices.update(t.device_joules)
        self.dirty_state.update(t.state)
        self.host_dirty = True
        # Consumers evicted from memory were only in the old file; a fresh one has none.
        self.unresolved.clear()

    def evict(self, before: float) -> list[Consumer]:
        """Forget the totals and labels of consumers last booked before `before`, once
        written: they live in the file and are read back if the consumer returns."""
        t = self.totals
        busy = self.dirty_consumers | self.dirty_labels | self.unresolved
        gone = [c for c, updated in t.consumer_updated.items()
                if updated < before and c not in busy]
        for consumer in gone:
            t.forget(consumer)
            self.labels.pop(consumer, None)
        if gone:
            self._names.clear()
        return gone
