"""One tick of DESIGN.md's pipeline, the same for the daemon and for `carbond exec`.

meters (each under a deadline) -> device deltas; CPU usage (each source under a deadline) and
each GPU's pid weights named as consumers, renamed from the metadata resolver's cache
(`names.Names`, which never waits) -> `attribution.attribute` -> one `Measurement`.
What happens to a measurement (carbon, ledger, exporter, a run's summary) is the caller's.
A source that blocks or fails misses its own sample for the tick; everything else is counted,
and cumulative counters bring the missed energy with the next good reading.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from carbond.attribution import (
    MODEL_SOURCE,
    Attribution,
    GpuWeights,
    Policy,
    TickInput,
    attribute,
    model_stands_in,
)
from carbond.meters.base import Meter, MeterReading
from carbond.pipeline.deadline import DeadlineWorker, Missed
from carbond.pipeline.deltas import DeviceDeltas
from carbond.pipeline.idle import IdleBaseline
from carbond.pipeline.names import Names
from carbond.types import Consumer
from carbond.workloads.cpu import CpuUsage
from carbond.workloads.gpu import GpuUsageTracker, PidConsumers, consumer_weights

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_DEADLINE_SECONDS = 2.0  # or half the interval, whichever is shorter


class CpuSource(Protocol):
    """CPU seconds per consumer since the previous call (a `CpuUsageCollector`, or exec's
    run-against-the-host usage)."""

    def tick(self) -> CpuUsage: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Measurement:
    """One tick, measured and attributed."""

    started: float  # monotonic
    seconds: float
    attribution: Attribution
    usage: dict[Consumer, float] | None  # CPU seconds per consumer; None: no CPU source
    exited_tasks: int = 0
    complete: bool = True  # every meter and device read: fit to teach the idle baseline
    meters_up: dict[str, bool] = field(default_factory=dict)
    wraps: dict[str, int] = field(default_factory=dict)  # device -> wraps in this tick
    resets: dict[str, int] = field(default_factory=dict)
    # the owner's labels (carbond_consumer_info) of the consumers given energy, where known
    metadata: Mapping[Consumer, Mapping[str, str]] = field(default_factory=dict)


class Pipeline:
    """Meters, usage sources and the attribution policy, ticked by `tick()`.

    `prime()` takes the baselines, so the first tick already has deltas. The caller owns the
    meters and sources and closes them (`close()`); a reload swaps meters with `set_meters`.
    `names` renames ID consumers (none: the cgroup names stand, as in `carbond exec`).
    """

    def __init__(
        self,
        meters: Sequence[Meter],
        cpu: CpuSource | None,
        gpu_usage: GpuUsageTracker | None,
        pid_consumers: PidConsumers | None,
        policy: Policy,
        cpu_idle: IdleBaseline,
        gpu_idle_watts: float = 0.0,
        read_deadline_seconds: float = READ_DEADLINE_SECONDS,
        vcpus: int = 1,
        clock: Callable[[], float] = time.monotonic,
        names: Names | None = None,
    ) -> None:
        self.cpu = cpu
        self.names = names if names is not None else Names(None)
        self.policy = policy
        self.cpu_idle = cpu_idle
        self.gpu_idle_watts = gpu_idle_watts
        self.read_deadline_seconds = read_deadline_seconds
        self._vcpus = vcpus
        self._clock = clock
        self._pid_consumers = pid_consumers
        self._totals = DeviceDeltas()
        self._workers: dict[str, DeadlineWorker[Any]] = {
            name: DeadlineWorker(name) for name in ("cgroups", "gpu")}
        self._up: dict[str, bool] = {}
        self.meters: list[Meter] = []
        self.gpu_usage: GpuUsageTracker | None = None
        self.set_meters(meters, gpu_usage)
        self._last = clock()

    # ---- setup -----------------------------------------------------------------------------

    def set_meters(self, meters: Sequence[Meter], gpu_usage: GpuUsageTracker | None) -> None:
        """Meters to read from the next tick on (each with a fresh worker, clear of any read
        still stuck in an old one)."""
        self.meters = list(meters)
        self.gpu_usage = gpu_usage
        for meter in self.meters:
            self._workers[meter.name] = DeadlineWorker(meter.name)

    def prime(self) -> None:
        """Baselines: the first reading of every meter and source is 0 J and 0 s."""
        for meter in self.meters:
            reading = self._read(meter)
            if reading is not None:
                self._totals.deltas(reading.devices)
        self._collect("cgroups", self.cpu.tick if self.cpu else None)
        self._collect("gpu", self.gpu_usage.sample if self.gpu_usage else None)
        self._last = self._clock()

    def missed_total(self, name: str) -> int:
        """Reads of a meter or source that missed their deadline (counted as its errors)."""
        worker = self._workers.get(name)
        return worker.missed_total if worker else 0

    # ---- reading under deadlines -----------------------------------------------------------

    def _read(self, meter: Meter) -> MeterReading | None:
        """The meter's reading, or None when it missed its deadline or failed: down alone."""
        try:
            reading = self._workers[meter.name].call(meter.read, self.read_deadline_seconds)
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
            return self._workers[name].call(fn, self.read_deadline_seconds)
        except Missed:
            return None
        except Exception:
            log.exception("%s usage failed", name)
            return None

    def _gpu_weights(self) -> dict[str, GpuWeights]:
        """Each GPU's pid weights, named as consumers (the only I/O: /proc/PID/cgroup)."""
        if not self.gpu_usage or self._pid_consumers is None:
            return {}
        usage = self.gpu_usage.sample()
        to_consumer = self._pid_consumers
        weights = {
            device: GpuWeights(consumer_weights(u.sm, to_consumer),
                               consumer_weights(u.memory, to_consumer))
            for device, u in usage.items()
        }
        to_consumer.retain(set().union(*(u.pids for u in usage.values())))
        return weights

    # ---- the tick --------------------------------------------------------------------------

    def tick(self) -> Measurement:
        started = self._clock()
        seconds, self._last = started - self._last, started
        deltas = []
        wraps: dict[str, int] = {}
        resets: dict[str, int] = {}
        complete = True  # every device read: a partial tick would teach the baseline a low
        measured = frozenset().union(*(meter.components() for meter in self.meters))
        model_needed = bool(model_stands_in(measured, self.policy.model))
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
            for device, count in reading.wraps.items():
                wraps[device] = wraps.get(device, 0) + count
            for device, count in reading.resets.items():
                resets[device] = resets.get(device, 0) + count
            deltas += self._totals.deltas(reading.devices)
        cpu = self._collect("cgroups", self.cpu.tick if self.cpu else None)
        gpus = self._collect("gpu", self._gpu_weights if self.gpu_usage else None) or {}
        usage, gpus = self._named(cpu.usage if cpu else None, gpus)
        result = attribute(
            TickInput(seconds, deltas, usage, gpus, measured,
                      self.cpu_idle.watts(), self.gpu_idle_watts),
            self.policy,
        )
        if usage is not None and seconds > 0 and complete and result.cpu_joules > 0:
            used = math.fsum(usage.values()) / (self._vcpus * seconds)
            self.cpu_idle.observe(result.cpu_joules / seconds, min(1.0, used), started)
        up = {meter.name: self._up.get(meter.name, False) for meter in self.meters}
        if MODEL_SOURCE in up:  # the model is up when it stands in, not merely when it can
            up[MODEL_SOURCE] = result.model_used
        return Measurement(started, seconds, result, usage, cpu.exited_tasks if cpu else 0,
                           complete, up, wraps, resets, self.names.metadata(result.energy))

    def _named(self, usage: dict[Consumer, float] | None, gpus: dict[str, GpuWeights]
               ) -> tuple[dict[Consumer, float] | None, dict[str, GpuWeights]]:
        """The tick's CPU seconds and GPU weights by named consumer, with the GPUs held by one
        container given to it; on a bug in naming, the ID names (the tick is not lost)."""
        names = self.names
        if names.resolver is None:
            return usage, gpus
        try:
            named = names.usage(usage) if usage is not None else None
            if self.gpu_usage is None:
                return named, gpus
            return named, names.gpus(gpus, self._gpu_infos())
        except Exception:
            names.failed()
            return usage, gpus

    def _gpu_infos(self) -> list[Any]:
        """The GPUs the meters know (UUIDs, MIG devices), to match the kubelet's device IDs."""
        found: list[Any] = []
        for meter in self.meters:
            listed = getattr(meter, "gpus", None)
            if listed is not None:
                found += listed()
        return found

    def close(self) -> None:
        """Close the sources and meters, each meter under the read deadline: one whose read
        never returned (a hung driver call holding its lock) is left to the process exit
        rather than holding up the daemon's shutdown or exec's summary."""
        if self.cpu is not None:
            self.cpu.close()
        for meter in self.meters:
            closing = threading.Thread(target=_close_meter, args=(meter,), daemon=True,
                                       name=f"carbond-{meter.name}-close")
            closing.start()
            closing.join(self.read_deadline_seconds)
            if closing.is_alive():
                log.warning("meter %s did not close within %gs: left open", meter.name,
                            self.read_deadline_seconds)


def _close_meter(meter: Meter) -> None:
    try:
        meter.close()
    except Exception:
        log.exception("closing meter %s failed", meter.name)
