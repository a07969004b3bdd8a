"""`carbond exec` measuring on its own: the daemon's pipeline over two consumers, the run
and everything else.

Every tick (1 s) is one `Pipeline.tick()`, as in the daemon: the meters under deadlines (the
model only where no counter measures), the run cgroup's CPU seconds against the host's
(`workloads.run`), the run's pids' share of each GPU from NVML, then `attribution.attribute`
with the configured idle policy and the idle baseline the daemon saved (learning on from there,
never saving). Emissions use the intensity valid during each tick, as in the daemon.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from carbond.carbon import IntensityFeed, grams
from carbond.carbon.http import DEFAULT_TIMEOUT_SECONDS
from carbond.carbon.intensity import Intensity
from carbond.commands.build import build_meters, build_pipeline
from carbond.commands.exec.cgroup import RunCgroup
from carbond.config import Config
from carbond.meters.base import Meter
from carbond.pipeline.tick import Pipeline
from carbond.types import OTHER, Consumer
from carbond.workloads.gpu import PidConsumers
from carbond.workloads.run import RunUsage

log = logging.getLogger(__name__)

COMPONENTS = ("cpu", "dram", "gpu")


@dataclass
class RunPricing:
    """Grams of CO2e for the run's energy, at the intensity valid when it was used. Energy
    used before the feed's first refresh round finished waits and is priced once it has (or
    at the end, with whatever the feed then has: static at worst)."""

    pue: float
    grams: float = 0.0
    priced_joules: float = 0.0
    pending_joules: float = 0.0
    providers: dict[str, float] = field(default_factory=dict)  # provider -> joules priced
    zone: str = ""

    def add(self, joules: float, intensity: Intensity | None) -> None:
        if intensity is None:
            self.pending_joules += joules
            return
        joules, self.pending_joules = joules + self.pending_joules, 0.0
        self.grams += grams(joules, intensity.grams_per_kwh, self.pue)
        self.priced_joules += joules
        self.providers[intensity.provider] = self.providers.get(intensity.provider, 0.0) + joules
        self.zone = intensity.zone

    @property
    def grams_per_kwh(self) -> float | None:
        """The energy-weighted mean intensity applied (grams / (kWh x PUE))."""
        if self.priced_joules <= 0:
            return None
        return self.grams / (self.priced_joules / 3.6e6 * self.pue)

    def provider_names(self) -> list[str]:
        """Providers used, most energy first."""
        return sorted(self.providers, key=lambda name: -self.providers[name])


class FeedStarter:
    """The feed's first refresh round off the main thread, then its periodic refresh; ticks
    know whether the first round is done, so they never price with a fallback that a slow
    API would have replaced a second later."""

    RECHECK_SECONDS = 30.0  # refresh_now keeps the feed's own schedule and backoff

    def __init__(self, feed: IntensityFeed) -> None:
        self.feed = feed
        self.done = threading.Event()
        self._stop = threading.Event()
        network = sum(1 for p in feed.providers if p.network)
        # WattTime logs in before it fetches: two requests at most per provider
        self.budget_seconds = 2 * DEFAULT_TIMEOUT_SECONDS * network + 1.0
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._refresh, name="carbond-exec-intensity",
                                        daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        first = True
        while first or not self._stop.wait(self.RECHECK_SECONDS):
            try:
                self.feed.refresh_now(force=False)
            except Exception:  # the feed turns provider failures into values; belt and braces
                log.exception("intensity refresh failed")
            if first:
                self.done.set()
                first = False

    def current(self) -> Intensity | None:
        return self.feed.current() if self.done.is_set() else None

    def settle(self) -> Intensity | None:
        """Wait for the first round within the providers' timeouts, then the figure."""
        self.done.wait(max(0.0, self._started + self.budget_seconds - time.monotonic()))
        return self.feed.current()

    def stop(self) -> None:
        """The thread is a daemon: a fetch in flight never holds up the exit."""
        self._stop.set()


class RunMeasurement:
    """The run's joules per component and CPU seconds, from `tick()` calls."""

    def __init__(self, config: Config, cgroup: RunCgroup, run: Consumer, tick_seconds: float,
                 meters: list[Meter] | None = None) -> None:
        self.run = run
        meters = meters if meters is not None else build_meters(config, sampler=False)
        rel = cgroup.rel.strip("/")
        pid_consumers = PidConsumers(
            lambda path: run if path == rel or path.startswith(rel + "/") else OTHER,
            cgroup.root.rel, config.proc_root, per_process=False,
        )
        usage = RunUsage(run, cgroup.cpu_seconds, cgroup.root, config.proc_root)
        self.pipeline: Pipeline = build_pipeline(config, meters, usage, pid_consumers,
                                                 interval_seconds=tick_seconds)
        self.pipeline.prime()
        # Named now: a meter stuck in a read later holds the lock its GPU list is behind.
        self._gpu_models = [g.name for meter in self.pipeline.meters
                            for g in getattr(meter, "gpus", list)() if g.name]
        self.joules: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
        self.cpu_seconds = 0.0
        self.host_cpu_seconds = 0.0
        self.seconds = 0.0
        self.ticks = 0

    def tick(self) -> float:
        """One interval; returns the run's joules in it."""
        measurement = self.pipeline.tick()
        mine = measurement.attribution.energy.get(self.run, {})
        for component, joules in mine.items():
            self.joules[component] = self.joules.get(component, 0.0) + joules
        usage = measurement.usage or {}
        self.cpu_seconds += usage.get(self.run, 0.0)
        self.host_cpu_seconds += math.fsum(usage.values())
        self.seconds += measurement.seconds
        self.ticks += 1
        return math.fsum(mine.values())

    def gpu_models(self) -> list[str]:
        return list(self._gpu_models)

    def close(self) -> None:
        self.pipeline.close()
