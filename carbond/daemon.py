"""The pipeline of DESIGN.md, one tick at a time, on an internal monotonic timer.

meters -> energy deltas per device; workloads -> usage deltas; attribution (pure) -> energy
per consumer; carbon -> grams; the result is published as one immutable Snapshot. Ticks are
independent of scrapes, and a faulty source loses its own sample for that tick, nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType

from carbond.attribution import IdleBaseline, follow_split, split_energy
from carbond.carbon import IntensityFeed, grams
from carbond.carbon.model import Intensity
from carbond.cardinality import ConsumerSeries
from carbond.config import Config
from carbond.consumers import OTHER, Consumer
from carbond.energy import DeviceDelta, DeviceTotals, Histogram, series
from carbond.meters.base import Meter, MeterReading
from carbond.meters.nvml import NvmlMeter
from carbond.snapshot import GpuLabel, Snapshot
from carbond.systemd import notify
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.gpu import GpuUsageTracker, PidConsumers, consumer_weights
from carbond.workloads.naming import CgroupNamer

log = logging.getLogger(__name__)

ConsumerEnergy = dict[Consumer, dict[str, float]]


def _add(energy: ConsumerEnergy, split: Mapping[Consumer, float], component: str) -> None:
    for consumer, joules in split.items():
        parts = energy.setdefault(consumer, {})
        parts[component] = parts.get(component, 0.0) + joules


@dataclass
class Counters:
    """Cumulative counts that only the daemon sees whole."""

    wraps: dict[str, int] = field(default_factory=dict)
    exited_tasks: int = 0
    host_grams: float = 0.0


class Daemon:
    def __init__(
        self,
        config: Config,
        meters: list[Meter],
        cpu_usage: CpuUsageCollector | None = None,
        feed: IntensityFeed | None = None,
        namer: CgroupNamer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.meters = meters
        self.cpu_usage = cpu_usage
        self.feed = feed
        self._clock = clock
        self._totals = DeviceTotals()
        self._histogram = Histogram()
        self._counters = Counters()
        self._cpu_idle = IdleBaseline(config.idle_watts_cpu)
        self._series = ConsumerSeries(config.max_consumers, clock=clock)
        self._nvml = next((m for m in meters if isinstance(m, NvmlMeter)), None)
        self._gpu_usage = GpuUsageTracker(self._nvml) if self._nvml else None
        namer = namer or CgroupNamer(config.rules)
        rel = cpu_usage.reader.root.rel if cpu_usage else "/"
        per_process = cpu_usage is not None and cpu_usage.processes is not None
        self._pid_to_consumer = PidConsumers(namer, rel, config.proc_root, per_process)
        self._last_tick = clock()
        self._snapshot = Snapshot(pue=config.pue)
        # Baselines, so the first tick already has deltas.
        for meter in meters:
            self._account(meter, meter.read(), used=False)
        if cpu_usage:
            cpu_usage.tick()
        if self._gpu_usage:
            self._gpu_usage.sample()

    def latest(self) -> Snapshot:
        return self._snapshot

    def _model_in_use(self, readings: dict[str, MeterReading]) -> bool:
        if self.config.model_enabled == "on":
            return True
        rapl = readings.get("rapl")
        return rapl is None or not rapl.devices

    def _account(self, meter: Meter, reading: MeterReading, used: bool) -> list[DeviceDelta]:
        for device, wraps in reading.wraps.items():
            self._counters.wraps[device] = self._counters.wraps.get(device, 0) + wraps
        return self._totals.update(reading.devices, used=used)

    def _attribute(self, deltas: list[DeviceDelta], seconds: float, now: float) -> ConsumerEnergy:
        """Host energy of this tick to consumers; sums to the attributed host energy."""
        energy: ConsumerEnergy = {}
        cpu_joules = math.fsum(d.joules for d in deltas if d.component == "cpu")
        dram_joules = math.fsum(d.joules for d in deltas if d.component == "dram")
        usage: dict[Consumer, float] = {}
        if self.cpu_usage:
            cpu = self.cpu_usage.tick()
            usage = cpu.usage
            self._counters.exited_tasks += cpu.exited_tasks
        if seconds > 0:
            self._cpu_idle.observe(cpu_joules / seconds, now)
        cpu_split = split_energy(cpu_joules, seconds, self._cpu_idle.watts(),
                                 self.config.idle_policy, usage or {OTHER: 1.0})
        _add(energy, cpu_split, "cpu")
        _add(energy, follow_split(dram_joules, cpu_split), "dram")
        gpu_usage = self._gpu_usage.sample() if self._gpu_usage else {}
        for delta in deltas:
            if delta.component != "gpu":
                continue
            weights = {}
            if delta.device in gpu_usage:
                weights = consumer_weights(gpu_usage[delta.device], self._pid_to_consumer)
            idle_watts = self.config.idle_watts_gpu or 0.0
            _add(energy, split_energy(delta.joules, seconds, idle_watts,
                                      self.config.idle_policy, weights), "gpu")
        if self._gpu_usage:
            self._pid_to_consumer.retain({pid for u in gpu_usage.values() for pid in u.weights})
        return energy

    def _emissions(
        self, energy: ConsumerEnergy, intensity: Intensity | None
    ) -> tuple[dict[Consumer, float], float]:
        if intensity is None:
            return {}, 0.0
        per_consumer = {
            consumer: grams(math.fsum(parts.values()), intensity.grams_per_kwh, self.config.pue)
            for consumer, parts in energy.items()
        }
        return per_consumer, math.fsum(per_consumer.values())

    def tick(self) -> Snapshot:
        started = self._clock()
        seconds, self._last_tick = started - self._last_tick, started
        readings = {meter.name: meter.read() for meter in self.meters}
        use_model = self._model_in_use(readings)
        deltas: list[DeviceDelta] = []
        for meter in self.meters:
            deltas += self._account(meter, readings[meter.name], meter.name != "model" or use_model)
        energy = self._attribute(deltas, seconds, started)
        intensity = self.feed.current() if self.feed else None  # the value valid for this tick
        consumer_grams, host_grams = self._emissions(energy, intensity)
        self._counters.host_grams += host_grams
        self._series.update(energy, seconds, consumer_grams)
        self._histogram.observe(self._clock() - started)
        self._snapshot = self._publish(deltas, seconds, intensity)
        return self._snapshot

    def _publish(
        self, deltas: list[DeviceDelta], seconds: float, intensity: Intensity | None
    ) -> Snapshot:
        errors = {meter.name: meter.errors_total for meter in self.meters}
        gpus: tuple[GpuLabel, ...] = ()
        if self._nvml:
            gpus = tuple(GpuLabel(g.device, g.uuid, g.name) for g in self._nvml.gpus() if g.uuid)
            if self._gpu_usage:  # failed usage queries count with the meter's failed reads
                errors["nvml"] = errors.get("nvml", 0) + self._gpu_usage.errors
        return Snapshot(
            devices=tuple(series(self._totals, deltas, seconds)),
            meters_up={meter.name: meter.up() for meter in self.meters},
            meter_errors_total=errors,
            counter_wraps_total=dict(self._counters.wraps),
            tick_buckets=tuple(self._histogram.cumulative()),
            tick_seconds_sum=self._histogram.sum_seconds,
            consumers=tuple(self._series.samples()),
            consumer_grams_total=tuple(self._series.emissions()),
            exited_tasks_total=self._counters.exited_tasks,
            host_grams_total=self._counters.host_grams,
            intensity=intensity,
            intensity_age_seconds=intensity.age_seconds(time.time()) if intensity else None,
            intensity_fetch_errors_total=self.feed.fetch_errors() if self.feed else {},
            pue=self.config.pue,
            gpus=gpus,
        )

    def run(self, stop: threading.Event) -> None:
        """Tick on a fixed cadence until `stop` is set; overruns skip, never pile up."""
        interval = self.config.interval_seconds
        deadline = self._clock() + interval
        notify("READY=1")
        while not stop.wait(max(0.0, deadline - self._clock())):
            try:
                self.tick()
            except Exception:  # a bug in one tick must not end accounting
                log.exception("tick failed")
            notify("WATCHDOG=1")
            deadline += interval
            now = self._clock()
            if deadline <= now:
                deadline = now + interval - (now - deadline) % interval
        notify("STOPPING=1")

    def close(self) -> None:
        if self.feed:
            self.feed.stop()
        if self.cpu_usage:
            self.cpu_usage.close()
        for meter in self.meters:
            meter.close()


# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value for both thresholds


def tune_malloc() -> None:
    """Keep a long-running daemon's RSS flat under churn.

    One arena: the GIL already serialises allocation, and per-thread arenas (HTTP, intensity,
    taskstats threads) only hold on to freed memory. Fixed thresholds: glibc otherwise raises
    its mmap threshold each time a large block is freed, so later large buffers land in the
    heap, fragment it and keep it swinging by megabytes (30-minute soak at 100 exits/s: +6.1%
    with the dynamic threshold, +2.2% with fixed ones; benchmarks/README.md).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD_BYTES)


def prepare_state_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as exc:
        log.warning("state dir %s unusable (%s): nothing is cached across restarts", path,
                    exc.strerror)


def install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
