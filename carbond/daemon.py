"""The daemon: runs the pipeline on an internal monotonic timer and hands every tick to its
sinks.

Each tick: `Pipeline.tick()` (meters and usage under deadlines, then attribution) -> the
intensity valid now -> `carbon.accounting.account()` -> the ledger and the budgets
(`record()`), then the exporter's `Publisher` makes the next snapshot. Ticks are independent of
scrapes. Everything is built by one composition root (`commands/build.py`) and passed in, so a
test builds a Daemon from fakes; the command that starts it (`commands/run.py`) owns signals,
the process and the order of start and stop (`runtime.lifecycle.Runner`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from carbond.attribution import Policy
from carbond.carbon import IntensityFeed
from carbond.carbon.accounting import Pricing, account
from carbond.config import RESTART, Config, fields_on_reload
from carbond.exporter.publisher import Health, Publisher
from carbond.exporter.snapshot import BudgetSample, GpuLabel, Snapshot, status_line
from carbond.ledger.budgets import BudgetTracker
from carbond.ledger.ledger import Ledger
from carbond.meters.base import Meter
from carbond.pipeline.tick import Measurement, Pipeline
from carbond.runtime.applied import record_applied, record_refused
from carbond.runtime.systemd import notify, watchdog_seconds
from carbond.types import ConfigError, TickRecord
from carbond.workloads.gpu import GpuUsageTracker
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.naming import CgroupNamer

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where each accounted tick goes besides the exporter: the ledger, the budgets."""

    def record(self, record: TickRecord) -> None: ...


@dataclass(frozen=True)
class Reconfiguration:
    """A reloaded configuration and the parts it needed rebuilt (None: keep the old)."""

    config: Config
    meters: list[Meter] | None = None
    gpu_usage: GpuUsageTracker | None = None
    feed: IntensityFeed | None = None
    namer: CgroupNamer | None = None
    budgets: BudgetTracker | None = None
    metadata_changed: bool = False  # then `resolver` replaces the running one (None: off)
    resolver: MetadataResolver | None = None


class Daemon:
    """One tick at a time: `tick()` measures and publishes; `run()` ticks on a cadence."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        publisher: Publisher,
        feed: IntensityFeed | None = None,
        budgets: BudgetTracker | None = None,
        sinks: Sequence[Sink] = (),
        ledger: Ledger | None = None,
        rename: Callable[[CgroupNamer], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.publisher = publisher
        self.feed = feed
        self.budgets = budgets
        self.sinks = list(sinks)
        self.ledger = ledger
        self._rename = rename
        self._clock = clock
        self._wall_clock = wall_clock
        self._pricing = Pricing.from_config(config.pue, config.embodied_kgco2e,
                                            config.embodied_lifetime_seconds)
        self._ticked = False

    @property
    def meters(self) -> list[Meter]:
        return self.pipeline.meters

    def latest(self) -> Snapshot:
        return self.publisher.latest()

    # ---- one tick --------------------------------------------------------------------------

    def tick(self) -> Snapshot:
        measurement = self.pipeline.tick()
        intensity = self.feed.current() if self.feed else None  # the value valid for this tick
        wall = self._wall_clock()
        result = measurement.attribution
        record = account(result.energy, result.counted, measurement.seconds, wall, intensity,
                         self._pricing, measurement.metadata)
        for sink in self.sinks:
            sink.record(record)
        if self.budgets is not None:
            self.budgets.record(record)
        snapshot = self.publisher.publish(record, self._health(measurement, wall))
        self._ticked = True
        return snapshot

    def _health(self, measurement: Measurement, wall: float) -> Health:
        pipeline = self.pipeline
        errors: dict[str, float] = {
            meter.name: meter.errors_total + pipeline.missed_total(meter.name)
            for meter in pipeline.meters
        }
        gpus: tuple[GpuLabel, ...] = ()
        for meter in pipeline.meters:
            listed = getattr(meter, "gpus", None)
            if listed is not None:
                gpus += tuple(GpuLabel(g.device, g.uuid, g.name) for g in listed() if g.uuid)
        if pipeline.gpu_usage is not None:  # failed usage queries count with the meter's reads
            errors["nvml"] = errors.get("nvml", 0) + pipeline.gpu_usage.errors
        exits = getattr(pipeline.cpu, "exits", None)
        budgets = tuple(
            BudgetSample(b.name, b.limit_grams, b.used_grams, b.projected_grams,
                         b.period_start, b.period_end)
            for b in (self.budgets.status(wall) if self.budgets is not None else ()))
        return Health(
            tick_seconds=self._clock() - measurement.started,
            meters_up=measurement.meters_up,
            meter_errors_total=errors,
            wraps=measurement.wraps,
            resets=measurement.resets,
            exited_tasks=measurement.exited_tasks,
            exit_overruns_total=int(getattr(exits, "overruns", 0)),
            gpus=gpus,
            intensity=self.feed.current() if self.feed else None,
            zone=self.feed.zone if self.feed else "",
            fetch_errors_total=self.feed.fetch_errors() if self.feed else {},
            ledger_errors_total=self.ledger.errors_total if self.ledger is not None else 0,
            budgets=budgets,
            coverage_ratio=measurement.attribution.coverage_ratio,
            platform_excess_joules=measurement.attribution.platform_excess_joules,
            metadata_errors_total=pipeline.names.errors(),
        )

    def tick_failed(self) -> Snapshot:
        """A tick raised: count it, keep serving the last good snapshot with the count."""
        return self.publisher.tick_failed()

    # ---- reload ----------------------------------------------------------------------------

    def apply(self, new: Reconfiguration) -> None:
        """Take a reloaded configuration: meters, rules, providers, budgets, attribution and
        carbon settings. What the process was started with needs a restart (keys marked
        RESTART in `config.KEYS`): a change is logged and the running value kept."""
        old, config = self.config, new.config
        kept = {key: getattr(old, key) for key in fields_on_reload(RESTART)}
        for key, value in kept.items():
            if getattr(config, key) != value:
                log.warning("%s changed: takes effect after a restart", key)
        config = replace(config, **kept)
        if new.meters is not None:
            for meter in self.pipeline.meters:
                meter.close()
            self.pipeline.set_meters(new.meters, new.gpu_usage)
        if new.feed is not None:
            if self.feed is not None:
                self.feed.stop()
            self.feed = new.feed
            self.feed.start()
        if new.namer is not None and self._rename is not None:
            self._rename(new.namer)
        if new.budgets is not None:
            self.budgets = new.budgets
        if new.metadata_changed:
            self._swap_resolver(new.resolver)
        self.config = config
        self.pipeline.policy = policy_of(config)
        self.pipeline.cpu_idle.fixed_watts = config.idle_watts_cpu
        self.pipeline.gpu_idle_watts = config.idle_watts_gpu or 0.0
        self.publisher.max_consumers = config.max_consumers
        self.publisher.pue = config.pue
        self._pricing = Pricing.from_config(config.pue, config.embodied_kgco2e,
                                            config.embodied_lifetime_seconds)
        log.info("configuration reloaded")

    def _swap_resolver(self, resolver: MetadataResolver | None) -> None:
        """The new metadata sources start, then the old ones stop (their threads are
        daemons: one stuck in a call ends at its deadline, never holding up the ticks)."""
        names = self.pipeline.names
        old = names.resolver
        if resolver is not None:
            resolver.start()
        names.use(resolver)
        stop = getattr(old, "stop", None)
        if stop is not None:
            stop(timeout_seconds=0.1)

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

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event, reload: threading.Event | None = None,
            reconfigure: Callable[[], Reconfiguration] | None = None) -> None:
        """Tick on a fixed cadence until `stop` is set; overruns skip, never pile up. When
        `reload` is set (SIGHUP), `reconfigure()` is applied between two ticks.

        systemd hears READY=1 once a tick has completed (the caller's first tick, or one made
        here), WATCHDOG=1 after every good tick (so a daemon whose ticks keep failing or hang
        is restarted), STATUS= with what it measures, and STOPPING=1 when it shuts down.
        """
        interval = self.config.interval_seconds
        if not self._ticked:
            self.tick()  # READY=1 promises a measurement
        watchdog = watchdog_seconds()
        if watchdog is not None and interval * 2 > watchdog:
            log.warning("interval %gs is more than half of the systemd watchdog (%gs): "
                        "raise WatchdogSec= or the daemon is restarted between ticks",
                        interval, watchdog)
        deadline = self._clock() + interval
        record_applied(self.config.state_dir, self.config.source_sha256)
        notify(f"READY=1\nSTATUS={status_line(self.latest())}")
        while not stop.wait(max(0.0, deadline - self._clock())):
            if reload is not None and reload.is_set() and reconfigure is not None:
                reload.clear()
                self._reconfigure(reconfigure)
            try:
                snapshot = self.tick()
            except Exception as exc:  # a bug in one tick must not end accounting
                log.exception("tick failed")
                snapshot = self.tick_failed()
                notify(f"STATUS=tick failed ({type(exc).__name__}); {status_line(snapshot)}")
            else:  # the watchdog fires when ticks keep failing: /metrics would be stale
                notify(f"WATCHDOG=1\nSTATUS={status_line(snapshot)}")
            deadline += interval
            now = self._clock()
            if deadline <= now:
                deadline = now + interval - (now - deadline) % interval
        notify("STOPPING=1\nSTATUS=stopping: flushing the ledger")


def policy_of(config: Config) -> Policy:
    return Policy(config.idle_policy, config.model_enabled, config.platform_policy)
