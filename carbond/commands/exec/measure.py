"""`carbond exec` measuring on its own: the daemon's meters and its one attribution step, over
two consumers, the run and everything else.

Every tick (1 s): the meters' host energy deltas; the run cgroup's CPU seconds against the
host's (the cgroup root's counter: exact v1 cpuacct where the host has it, plus irq time where
the kernel keeps it apart, as the daemon counts it); the run's pids' share of each GPU from
NVML; then `attribution.attribute` with the configured idle policy and the idle baseline the
daemon saved (learning on from there, never saving). Emissions use the intensity valid during
each tick, as in the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from carbond.attribution import GpuWeights, Policy, TickInput, attribute
from carbond.carbon import IntensityFeed, grams
from carbond.carbon.http import DEFAULT_TIMEOUT_SECONDS
from carbond.carbon.intensity import Intensity
from carbond.commands.build import build_meters
from carbond.commands.exec.cgroup import RunCgroup
from carbond.config import Config
from carbond.meters.base import Meter
from carbond.meters.nvml import NvmlMeter
from carbond.meters.rapl import RaplMeter
from carbond.pipeline.idle import IdleBaseline
from carbond.pipeline.totals import DeviceTotals
from carbond.types import OTHER, Consumer
from carbond.workloads.cgroups import V1, V2, CgroupRoot, read_counter
from carbond.workloads.cpu import host_cpuacct_root, irq_seconds, irq_time_apart
from carbond.workloads.gpu import GpuUsageTracker, PidConsumers, consumer_weights
from carbond.workloads.kernfiles import mount_fstype

log = logging.getLogger(__name__)

IDLE_STATE_FILE = "idle-baseline.json"  # the daemon's (daemon.IDLE_STATE_FILE), read only
COMPONENTS = ("cpu", "dram", "gpu")


def _is_kernel_root(root: CgroupRoot) -> bool:
    """A hierarchy's true root, not a sub-tree: only a v1 root has release_agent, only a v2
    root lacks cgroup.events."""
    if root.hierarchy == V1:
        return os.path.isfile(os.path.join(root.path, "release_agent"))
    return not os.path.exists(os.path.join(root.path, "cgroup.events"))


class HostCpu:
    """The host's cumulative CPU seconds, counted as the daemon counts the sum of its
    consumers: the cgroup root's counter, the exact v1 cpuacct root instead of the sampled v2
    root where a hybrid host has both, and /proc/stat's irq time added for a system-wide root
    where the kernel keeps it out of task time."""

    def __init__(self, root: CgroupRoot, proc_root: str = "/proc") -> None:
        kernel_root = _is_kernel_root(root)
        system_wide = (root.rel == "/" and kernel_root
                       and mount_fstype(root.path, proc_root) in ("cgroup", "cgroup2"))
        exact = root.hierarchy == V1 or not kernel_root
        self._read: Callable[[], float | None]
        path = os.path.join(root.path, root.usage_file)
        cpuacct = host_cpuacct_root(proc_root) if (not exact and system_wide) else None
        if cpuacct:
            self._read = lambda: read_counter(f"{cpuacct}/cpuacct.usage", False)
            exact = True
        else:
            self._read = lambda: read_counter(path, root.hierarchy == V2)
        stat_file = os.path.join(proc_root, "stat")
        self._irq = system_wide and exact and irq_time_apart(proc_root)
        self._irq_read = lambda: irq_seconds(stat_file) if self._irq else 0.0

    def read(self) -> float | None:
        value = self._read()
        if value is None:
            return None
        return value + (self._irq_read() or 0.0)


class _Delta:
    """Growth of a cumulative reading between calls; None when unreadable or first."""

    def __init__(self, read: Callable[[], float | None]) -> None:
        self._read = read
        self._last = read()

    def __call__(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now if now is not None else self._last
        return None if now is None or last is None else max(0.0, now - last)


@dataclass
class Pricing:
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


class Measurement:
    """The run's joules per component and CPU seconds, from `tick()` calls."""

    def __init__(self, config: Config, cgroup: RunCgroup, run: Consumer,
                 meters: list[Meter] | None = None) -> None:
        self.config = config
        self.cgroup = cgroup
        self.run = run
        self.meters = meters if meters is not None else build_meters(config, sampler=False)
        self._rapl = [m for m in self.meters if isinstance(m, RaplMeter)]
        self.nvml = next((m for m in self.meters if isinstance(m, NvmlMeter)), None)
        self._gpu_usage = GpuUsageTracker(self.nvml) if self.nvml else None
        rel = cgroup.rel.strip("/")
        self._pid_consumer = PidConsumers(
            lambda path: run if path == rel or path.startswith(rel + "/") else OTHER,
            cgroup.root.rel, config.proc_root, per_process=False,
        )
        self._policy = Policy(config.idle_policy, config.model_enabled)
        self._totals = DeviceTotals()
        wall, mono = time.time(), time.monotonic()
        self._idle = IdleBaseline.load(os.path.join(config.state_dir, IDLE_STATE_FILE), wall,
                                       mono, fixed_watts=config.idle_watts_cpu)
        self._vcpus = os.cpu_count() or 1
        self._host = _Delta(HostCpu(cgroup.root, config.proc_root).read)
        self._run_cpu = _Delta(cgroup.cpu_seconds)
        for meter in self.meters:  # baselines: the first tick already has deltas
            self._totals.deltas(meter.read().devices)
        if self._gpu_usage:
            self._gpu_usage.sample()
        self._last = time.monotonic()
        self.joules: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
        self.cpu_seconds = 0.0
        self.host_cpu_seconds = 0.0
        self.seconds = 0.0
        self.ticks = 0

    def _gpu_weights(self) -> dict[str, GpuWeights]:
        if not self._gpu_usage:
            return {}
        usage = self._gpu_usage.sample()
        weights = {
            device: GpuWeights(consumer_weights(u.sm, self._pid_consumer),
                               consumer_weights(u.memory, self._pid_consumer))
            for device, u in usage.items()
        }
        self._pid_consumer.retain(set().union(*(u.pids for u in usage.values())))
        return weights

    def tick(self) -> float:
        """One interval; returns the run's joules in it."""
        now = time.monotonic()
        seconds, self._last = now - self._last, now
        deltas = []
        complete = True
        for meter in self.meters:
            reading = meter.read()
            complete = complete and not reading.errors
            deltas += self._totals.deltas(reading.devices)
        run_cpu = self._run_cpu() or 0.0
        host_cpu = self._host()
        usage = {self.run: run_cpu}
        if host_cpu is not None:
            usage[OTHER] = max(0.0, host_cpu - run_cpu)
        measured = frozenset().union(*(meter.components() for meter in self._rapl))
        result = attribute(
            TickInput(seconds, deltas, usage, self._gpu_weights(), measured, self._idle.watts(),
                      self.config.idle_watts_gpu or 0.0),
            self._policy,
        )
        total_cpu = math.fsum(usage.values())
        if seconds > 0 and complete and result.cpu_joules > 0:
            used = total_cpu / (self._vcpus * seconds)
            self._idle.observe(result.cpu_joules / seconds, min(1.0, used), now)
        mine = result.energy.get(self.run, {})
        for component, joules in mine.items():
            self.joules[component] = self.joules.get(component, 0.0) + joules
        self.cpu_seconds += run_cpu
        self.host_cpu_seconds += total_cpu
        self.seconds += seconds
        self.ticks += 1
        return math.fsum(mine.values())

    def gpu_models(self) -> list[str]:
        if self.nvml is None:
            return []
        return [g.name for g in self.nvml.gpus() if g.name]

    def close(self) -> None:
        for meter in self.meters:
            with contextlib.suppress(Exception):
                meter.close()
