"""The pipeline of DESIGN.md, one tick at a time, on an internal monotonic timer.

meters -> energy deltas per device; workloads -> usage deltas; attribution (pure) -> energy
per consumer; carbon -> grams; the result is published as one immutable Snapshot. Ticks are
independent of scrapes, and a faulty source loses its own sample for that tick, nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

from carbond.applied import record_applied, record_refused
from carbond.attribution import (
    MODEL_SOURCE,
    Attribution,
    ConsumerEnergy,
    GpuWeights,
    Policy,
    TickInput,
    attribute,
    model_stands_in,
)
from carbond.budgets import BudgetTracker
from carbond.carbon import IntensityFeed, grams
from carbond.carbon.intensity import Intensity
from carbond.cardinality import ConsumerSeries
from carbond.config import Config
from carbond.consumers import Consumer
from carbond.deadline import DeadlineWorker, Missed
from carbond.embodied import embodied_grams_per_second, share_embodied
from carbond.energy import DeviceDelta, DeviceTotals, Histogram, series
from carbond.errors import ConfigError
from carbond.idle import IdleBaseline
from carbond.ledger import Ledger
from carbond.meters.base import Meter, MeterReading
from carbond.meters.nvml import NvmlMeter
from carbond.meters.rapl import RaplMeter
from carbond.snapshot import BudgetSample, GpuLabel, Snapshot
from carbond.systemd import notify, status_line, watchdog_seconds
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.gpu import GpuUsageTracker, PidConsumers, consumer_weights
from carbond.workloads.naming import CgroupNamer

log = logging.getLogger(__name__)
T = TypeVar("T")


# Settings the running process was started with: a reload logs a change and keeps them.
RESTART_KEYS = ("listen_host", "listen_port", "state_dir", "interval_seconds", "cgroup_root",
                "proc_root", "web_config_file", "processes", "ledger_retention_seconds",
                "ledger_flush_seconds")


@dataclass(frozen=True)
class Reconfiguration:
    """A reloaded configuration and what had to be rebuilt for it (None: keep the old)."""

    config: Config
    meters: list[Meter] | None = None
    feed: IntensityFeed | None = None
    namer: CgroupNamer | None = None


@dataclass
class Counters:
    """Cumulative counts that only the daemon sees whole, carried across restarts through
    the ledger's state so that every `*_total` series continues where it stopped."""

    wraps: dict[str, int] = field(default_factory=dict)
    resets: dict[str, int] = field(default_factory=dict)
    exited_tasks: int = 0
    tick_failures: int = 0
    host_grams: float = 0.0
    # Counts kept by other parts (meters, feed, ledger) as exported at the last stop: added
    # to what those parts count in this run.
    carried: dict[str, dict[str, float]] = field(default_factory=dict)

    def plus_carried(self, family: str, counts: Mapping[str, float]) -> dict[str, float]:
        carried = self.carried.get(family, {})
        return {key: carried.get(key, 0.0) + counts.get(key, 0.0)
                for key in {*carried, *counts}}

    @classmethod
    def from_state(cls, state: Any, host_grams: float) -> Counters:
        """From `Ledger.get_state(COUNTERS_STATE)`; anything malformed is started afresh."""
        counters = cls(host_grams=host_grams)
        if not isinstance(state, dict):
            return counters
        try:
            counters.wraps = {str(k): int(v) for k, v in state.get("wraps", {}).items()}
            counters.resets = {str(k): int(v) for k, v in state.get("resets", {}).items()}
            counters.exited_tasks = int(state.get("exited_tasks", 0))
            counters.tick_failures = int(state.get("tick_failures", 0))
            counters.carried = {
                str(family): {str(k): float(v) for k, v in counts.items()}
                for family, counts in state.get("carried", {}).items()
            }
        except (AttributeError, TypeError, ValueError):
            log.warning("ledger state %r is malformed: its counters start afresh",
                        COUNTERS_STATE)
            return cls(host_grams=host_grams)
        return counters


READ_DEADLINE_SECONDS = 2.0  # or half the interval, whichever is shorter
IDLE_STATE_FILE = "idle-baseline.json"
COUNTERS_STATE = "counters"
PERSIST_SECONDS = 300.0


class Daemon:
    """Measures, calls `attribution.attribute`, converts to CO2e and publishes a Snapshot."""

    def __init__(
        self,
        config: Config,
        meters: list[Meter],
        cpu_usage: CpuUsageCollector | None = None,
        feed: IntensityFeed | None = None,
        namer: CgroupNamer | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.meters = meters
        self.cpu_usage = cpu_usage
        self.feed = feed
        self.ledger = ledger
        self._clock = clock
        self._wall_clock = wall_clock
        self._policy = Policy(config.idle_policy, config.model_enabled)
        self._totals = DeviceTotals()
        self._histogram = Histogram()
        self._series = ConsumerSeries(config.max_consumers, clock=clock)
        self._counters = Counters()
        if ledger is not None:
            self._restore(ledger)
        self._budgets = BudgetTracker(config.budgets, config.budgets_timezone, ledger,
                                      clock=wall_clock)
        self._embodied_grams_per_second = embodied_grams_per_second(
            config.embodied_kgco2e, config.embodied_lifetime_seconds)
        self._idle_state = os.path.join(config.state_dir, IDLE_STATE_FILE)
        self._cpu_idle = IdleBaseline.load(self._idle_state, wall_clock(), clock(),
                                           fixed_watts=config.idle_watts_cpu)
        self._vcpus = os.cpu_count() or 1
        # Every source reads on its own thread: one that blocks misses its deadline alone.
        self._read_deadline = min(READ_DEADLINE_SECONDS, config.interval_seconds / 2)
        self._workers: dict[str, DeadlineWorker[Any]] = {
            name: DeadlineWorker(name) for name in ("cgroups", "gpu")
        }
        self._up: dict[str, bool] = {}
        self._set_meters(meters)
        namer = namer or CgroupNamer(config.rules)
        rel = cpu_usage.reader.root.rel if cpu_usage else "/"
        per_process = cpu_usage is not None and cpu_usage.processes is not None
        self._pid_to_consumer = PidConsumers(namer, rel, config.proc_root, per_process)
        self._last_tick = clock()
        self._snapshot = Snapshot(pue=config.pue)
        # Baselines, so the first tick already has deltas.
        for meter in meters:
            reading = self._read(meter)
            if reading is not None:
                self._totals.deltas(reading.devices)
        self._collect("cgroups", cpu_usage.tick if cpu_usage else None)
        self._collect("gpu", self._gpu_usage.sample if self._gpu_usage else None)

    def _set_meters(self, meters: list[Meter]) -> None:
        self.meters = meters
        self._rapl = [m for m in meters if isinstance(m, RaplMeter)]
        self._nvml = next((m for m in meters if isinstance(m, NvmlMeter)), None)
        self._gpu_usage = GpuUsageTracker(self._nvml) if self._nvml else None
        for meter in meters:  # a reloaded meter gets a fresh worker, clear of any stuck read
            self._workers[meter.name] = DeadlineWorker(meter.name)

    def _read(self, meter: Meter) -> MeterReading | None:
        """The meter's reading, or None when it missed its deadline or failed: down alone."""
        try:
            reading = self._workers[meter.name].call(meter.read, self._read_deadline)
        except Missed:
            self._up[meter.name] = False
            return None
        except Exception:
            log.exception("meter %s failed", meter.name)
            self._up[meter.name] = False
            return None
        self._up[meter.name] = meter.up()
        return reading

    def _collect(self, name: str, fn: Callable[[], T] | None) -> T | None:
        """A usage source's result, or None when it is absent, missed its deadline or failed
        (its time then goes to `other` or `idle` for the tick; counters keep the rest)."""
        if fn is None:
            return None
        try:
            return self._workers[name].call(fn, self._read_deadline)
        except Missed:
            return None
        except Exception:
            log.exception("%s usage failed", name)
            return None

    def _restore(self, ledger: Ledger) -> None:
        """Counters continue from the ledger's totals instead of starting at zero."""
        totals = ledger.restore()
        wall = self._wall_clock()
        self._series.restore(totals.consumer_joules, totals.consumer_grams,
                             totals.consumer_embodied_grams,
                             {c: wall - t for c, t in totals.consumer_updated.items()})
        self._totals.joules_total.update(totals.device_joules)
        self._counters = Counters.from_state(ledger.get_state(COUNTERS_STATE), totals.host_grams)

    def latest(self) -> Snapshot:
        return self._snapshot

    def _gpu_weights(self) -> dict[str, GpuWeights]:
        """Each GPU's pid weights, named as consumers (the only I/O: /proc/PID/cgroup)."""
        if not self._gpu_usage:
            return {}
        usage = self._gpu_usage.sample()
        to_consumer = self._pid_to_consumer
        weights = {
            device: GpuWeights(consumer_weights(u.sm, to_consumer),
                               consumer_weights(u.memory, to_consumer))
            for device, u in usage.items()
        }
        to_consumer.retain(set().union(*(u.pids for u in usage.values())))
        return weights

    def tick(self) -> Snapshot:
        started = self._clock()
        seconds, self._last_tick = started - self._last_tick, started
        deltas: list[DeviceDelta] = []
        complete = True  # every device read: a partial tick would teach the baseline a low
        measured = frozenset().union(*(meter.components() for meter in self._rapl))
        model_needed = bool(model_stands_in(measured, self._policy.model))
        for meter in self.meters:
            # Counters that measure all the model could stand in for: it is not read (a
            # meter's components only grow, and a reload builds new meters, so it never
            # resumes with a reading that spans the rest).
            if meter.name == MODEL_SOURCE and not model_needed:
                continue
            reading = self._read(meter)
            if reading is None:
                complete = False
                continue
            complete = complete and not reading.errors
            for device, wraps in reading.wraps.items():
                self._counters.wraps[device] = self._counters.wraps.get(device, 0) + wraps
            for device, resets in reading.resets.items():
                self._counters.resets[device] = self._counters.resets.get(device, 0) + resets
            deltas += self._totals.deltas(reading.devices)
        cpu = self._collect("cgroups", self.cpu_usage.tick if self.cpu_usage else None)
        if cpu:
            self._counters.exited_tasks += cpu.exited_tasks
        result = attribute(
            TickInput(seconds, deltas, cpu.usage if cpu else None,
                      self._collect("gpu", self._gpu_weights if self._gpu_usage else None) or {},
                      measured, self._cpu_idle.watts(), self.config.idle_watts_gpu or 0.0),
            self._policy,
        )
        self._totals.add(result.counted)
        if cpu and seconds > 0 and complete and result.cpu_joules > 0:
            used = math.fsum(cpu.usage.values()) / (self._vcpus * seconds)
            self._cpu_idle.observe(result.cpu_joules / seconds, min(1.0, used), started)
        intensity = self.feed.current() if self.feed else None  # the value valid for this tick
        consumer_grams, host_grams = self._emissions(result.energy, intensity)
        embodied = share_embodied(self._embodied_grams_per_second * seconds, result.energy)
        self._counters.host_grams += host_grams
        self._series.update(result.energy, seconds, consumer_grams, embodied)
        wall = self._wall_clock()
        if self.ledger is not None:
            self.ledger.record(
                wall, seconds, result.energy, consumer_grams, embodied,
                {(d.component, d.device, d.source): d.joules for d in result.counted},
                intensity.grams_per_kwh if intensity else None,
                intensity.provider if intensity else None,
            )
        self._budgets.add(wall, seconds, consumer_grams)
        self._histogram.observe(self._clock() - started)
        self._snapshot = self._publish(result, seconds, intensity, wall)
        if self.ledger is not None:
            self.ledger.put_state(COUNTERS_STATE, self._counters_state(self._snapshot))
        return self._snapshot

    def _emissions(
        self, energy: ConsumerEnergy, intensity: Intensity | None
    ) -> tuple[dict[Consumer, float], float]:
        if intensity is None:
            return {}, 0.0
        per_consumer = {  # only consumers that used energy: most cgroups idle most ticks
            consumer: grams(joules, intensity.grams_per_kwh, self.config.pue)
            for consumer, parts in energy.items() if (joules := math.fsum(parts.values())) > 0
        }
        return per_consumer, math.fsum(per_consumer.values())

    def _publish(
        self, result: Attribution, seconds: float, intensity: Intensity | None, wall: float
    ) -> Snapshot:
        counters = self._counters
        errors: dict[str, float] = {
            meter.name: meter.errors_total + self._workers[meter.name].missed_total
            for meter in self.meters
        }
        up = {meter.name: self._up.get(meter.name, False) for meter in self.meters}
        if "model" in up:  # the model is up when it stands in, not merely when it can
            up["model"] = result.model_used
        gpus: tuple[GpuLabel, ...] = ()
        if self._nvml:
            gpus = tuple(GpuLabel(g.device, g.uuid, g.name) for g in self._nvml.gpus() if g.uuid)
            if self._gpu_usage:  # failed usage queries count with the meter's failed reads
                errors["nvml"] = errors.get("nvml", 0) + self._gpu_usage.errors
        fetch_errors = self.feed.fetch_errors() if self.feed else {}
        ledger_errors = {"": self.ledger.errors_total} if self.ledger else {}
        budgets = tuple(
            BudgetSample(b.name, b.limit_grams, b.used_grams, b.projected_grams,
                         b.period_start, b.period_end)
            for b in self._budgets.status(wall)
        )
        return Snapshot(
            devices=tuple(series(self._totals, list(result.counted), seconds)),
            meters_up=up,
            meter_errors_total=counters.plus_carried("meter_errors", errors),
            counter_wraps_total=dict(counters.wraps),
            counter_resets_total=dict(counters.resets),
            tick_buckets=tuple(self._histogram.cumulative()),
            tick_seconds_sum=self._histogram.sum_seconds,
            consumers=tuple(self._series.samples()),
            consumer_grams_total=tuple(self._series.emissions()),
            consumer_embodied_grams_total=tuple(self._series.embodied()),
            exited_tasks_total=counters.exited_tasks,
            exit_records_lost_total=int(counters.plus_carried(
                "exit_overruns", {"": self._exit_overruns()}).get("", 0)),
            host_grams_total=counters.host_grams,
            intensity=intensity,
            zone=self.feed.zone if self.feed else "",
            intensity_age_seconds=intensity.age_seconds(wall) if intensity else None,
            intensity_fetch_errors_total=counters.plus_carried("fetch_errors", fetch_errors),
            pue=self.config.pue,
            gpus=gpus,
            budgets=budgets,
            tick_failures_total=counters.tick_failures,
            last_tick_timestamp_seconds=wall,
            ledger_errors_total=int(counters.plus_carried("ledger_errors", ledger_errors)
                                    .get("", 0)),
        )

    def _exit_overruns(self) -> int:
        """Times the kernel dropped exit records (their CPU time stays with the root)."""
        exits = self.cpu_usage.exits if self.cpu_usage else None
        return int(getattr(exits, "overruns", 0))

    def _counters_state(self, snap: Snapshot) -> dict[str, Any]:
        """What the next start needs to continue every counter from its exported value."""
        return {
            "wraps": snap.counter_wraps_total,
            "resets": snap.counter_resets_total,
            "exited_tasks": snap.exited_tasks_total,
            "tick_failures": snap.tick_failures_total,
            "carried": {
                "meter_errors": snap.meter_errors_total,
                "fetch_errors": snap.intensity_fetch_errors_total,
                "ledger_errors": {"": snap.ledger_errors_total},
                "exit_overruns": {"": snap.exit_records_lost_total},
            },
        }

    def tick_failed(self) -> None:
        """A tick raised: count it, keep serving the last good snapshot with the count."""
        self._counters.tick_failures += 1
        self._snapshot = dataclasses.replace(self._snapshot,
                                             tick_failures_total=self._counters.tick_failures)

    def _reconfigure(self, reconfigure: Callable[[], Reconfiguration]) -> None:
        try:
            new = reconfigure()
        except ConfigError as exc:
            log.error("configuration not reloaded, the old one stays in force: %s", exc)
            record_refused(self.config.state_dir, str(exc))
            return
        except Exception as exc:
            log.exception("configuration not reloaded, the old one stays in force")
            record_refused(self.config.state_dir, f"{type(exc).__name__}: {exc}")
            return
        self.apply(new)
        record_applied(self.config.state_dir, new.config.source_sha256)

    def apply(self, new: Reconfiguration) -> None:
        """Take a reloaded configuration: meters, rules, providers, budgets, attribution and
        carbon settings. What the process was started with (listen address, state dir,
        interval, cgroup and proc roots, web config path) needs a restart."""
        old, config = self.config, new.config
        kept = {key: getattr(old, key) for key in RESTART_KEYS}
        for key, value in kept.items():
            if getattr(config, key) != value:
                log.warning("%s changed: takes effect after a restart", key)
        config = dataclasses.replace(config, **kept)
        if new.meters is not None:
            for meter in self.meters:
                meter.close()
            self._set_meters(new.meters)
        if new.feed is not None:
            if self.feed is not None:
                self.feed.stop()
            self.feed = new.feed
            self.feed.start()
        if new.namer is not None:
            if self.cpu_usage is not None:
                self.cpu_usage.reader.namer = new.namer
            self._pid_to_consumer.rename(new.namer)
        self.config = config
        self._policy = Policy(config.idle_policy, config.model_enabled)
        self._cpu_idle.fixed_watts = config.idle_watts_cpu
        self._series.max_consumers = config.max_consumers
        self._budgets = BudgetTracker(config.budgets, config.budgets_timezone, self.ledger,
                                      clock=self._wall_clock)
        self._embodied_grams_per_second = embodied_grams_per_second(
            config.embodied_kgco2e, config.embodied_lifetime_seconds)
        log.info("configuration reloaded")

    def persist(self) -> None:
        """State that must survive a restart; written off the tick path and at shutdown."""
        try:
            self._cpu_idle.save(self._idle_state, self._wall_clock(), self._clock())
        except OSError as exc:
            log.warning("cannot save the idle baseline to %s: %s", self._idle_state,
                        exc.strerror or exc)

    def _persist_until(self, stop: threading.Event) -> None:
        while not stop.wait(PERSIST_SECONDS):
            try:
                self.persist()
            except Exception:  # a bug here must not end this thread
                log.exception("saving state to %s failed", self.config.state_dir)

    def run(self, stop: threading.Event, reload: threading.Event | None = None,
            reconfigure: Callable[[], Reconfiguration] | None = None) -> None:
        """Tick on a fixed cadence until `stop` is set; overruns skip, never pile up. When
        `reload` is set (SIGHUP), `reconfigure()` is applied between two ticks.

        systemd hears READY=1 once a tick has completed (the caller's first tick, or one made
        here), WATCHDOG=1 after every good tick (so a daemon whose ticks keep failing or hang
        is restarted), STATUS= with what it measures, and STOPPING=1 when it shuts down.
        """
        interval = self.config.interval_seconds
        if not self._snapshot.last_tick_timestamp_seconds:
            self.tick()  # READY=1 promises a measurement
        watchdog = watchdog_seconds()
        if watchdog is not None and interval * 2 > watchdog:
            log.warning("interval %gs is more than half of the systemd watchdog (%gs): "
                        "raise WatchdogSec= or the daemon is restarted between ticks",
                        interval, watchdog)
        deadline = self._clock() + interval
        persister = threading.Thread(target=self._persist_until, args=(stop,),
                                     name="carbond-persist", daemon=True)
        persister.start()
        if self.ledger is not None:
            self.ledger.start(self.config.ledger_flush_seconds)
        record_applied(self.config.state_dir, self.config.source_sha256)
        notify(f"READY=1\nSTATUS={status_line(self._snapshot)}")
        while not stop.wait(max(0.0, deadline - self._clock())):
            if reload is not None and reload.is_set() and reconfigure is not None:
                reload.clear()
                self._reconfigure(reconfigure)
            try:
                snapshot = self.tick()
            except Exception as exc:  # a bug in one tick must not end accounting
                log.exception("tick failed")
                self.tick_failed()
                notify(f"STATUS=tick failed ({type(exc).__name__}); "
                       f"{status_line(self._snapshot)}")
            else:  # the watchdog fires when ticks keep failing: /metrics would be stale
                notify(f"WATCHDOG=1\nSTATUS={status_line(snapshot)}")
            deadline += interval
            now = self._clock()
            if deadline <= now:
                deadline = now + interval - (now - deadline) % interval
        notify("STOPPING=1\nSTATUS=stopping: flushing the ledger")

    def close(self) -> None:
        self.persist()
        if self.ledger is not None:
            self.ledger.close()  # flushes the last ticks
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


def install_signal_handlers(stop: threading.Event,
                            reload: threading.Event | None = None) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    def handle_reload(signum: int, frame: FrameType | None) -> None:
        log.info("received SIGHUP, reloading the configuration before the next tick")
        if reload is not None:
            reload.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, handle_reload)
