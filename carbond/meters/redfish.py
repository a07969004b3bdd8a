"""Whole-node energy from the BMC over Redfish: source `redfish`.

What is read, in order of preference, from the chassis (`meters.redfish.chassis`, else the one
top-level chassis of `/redfish/v1/Chassis`), following the chassis resource's own links:

1. `EnvironmentMetrics` `EnergyJoules` or `EnergykWh` (`Reading`): an energy counter, exact
   whenever it moves; `PowerWatts` beside it gives the power between its moves;
2. `EnvironmentMetrics` `PowerWatts`, else `Power` `PowerControl[].PowerConsumedWatts` (the
   first entry with a number: the chassis input), else the sum of `PowerSubsystem`
   `PowerSupplies/*/Metrics` `InputPowerWatts`: a power gauge, integrated (trapezoid).

BMCs refresh their sensors every few seconds, so the meter polls on its own thread every
`interval` (default 10 s) and the tick's `read()` only returns the energy up to now from what
the last poll left (integrate.py): it never waits on the network. A reading that does not
move for `stale_after` (counter flat and power unchanged, or the same power over and over) is
stale: not power, the meter goes down and the host falls back to its parts; when it moves
again the integration restarts, so the stale spell is never counted. NaN (which JSON cannot
carry: the answer is refused), negative or above-100-kW readings are errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from carbond.carbon.intensity import FetchError
from carbond.meters.base import DeviceEnergy, DeviceReport, MeterReading
from carbond.meters.integrate import (
    TRAPEZOID,
    CounterTrack,
    Freshness,
    Gaps,
    PowerIntegrator,
    ReadingError,
    Reported,
    check_joules,
    check_watts,
)
from carbond.meters.poller import Poller
from carbond.meters.redfish_client import resource_path

log = logging.getLogger(__name__)

SOURCE = "redfish"
DEVICE = COMPONENT = "platform"
CHASSIS_PATH = "/redfish/v1/Chassis"
JOULES_PER_KWH = 3.6e6
MAX_CHASSIS = 32
MAX_SUPPLIES = 16
GAP_POLLS = 3.0  # a power interval longer than this many polls is a gap

COUNTER = "energy counter"
ENV_POWER, POWER_CONTROL, SUPPLIES = ("EnvironmentMetrics PowerWatts",
                                      "Power PowerControl PowerConsumedWatts",
                                      "PowerSubsystem InputPowerWatts")


class Client(Protocol):
    host: str

    def get(self, path: str) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What to read each poll: the method and the resources it reads."""

    chassis: str
    method: str  # COUNTER, ENV_POWER, POWER_CONTROL or SUPPLIES
    paths: tuple[str, ...]
    counter_name: str = ""  # EnergyJoules or EnergykWh


@dataclass(frozen=True)
class Sample:
    """One poll's answer: a counter in joules and/or a power, and its reading time if given."""

    joules: float | None
    watts: float | None
    reading_time: str | None = None


def _reading(document: Any, name: str) -> tuple[Any, str | None] | None:
    """`document[name].Reading` (and its ReadingTime), None when absent or null."""
    if not isinstance(document, dict):
        raise FetchError("missing_field", "the resource is not a JSON object")
    excerpt = document.get(name)
    if not isinstance(excerpt, dict) or excerpt.get("Reading") is None:
        return None
    stamp = excerpt.get("ReadingTime")
    return excerpt["Reading"], stamp if isinstance(stamp, str) else None


def counter_name(environment: Any) -> str:
    """EnergyJoules where the BMC has it (finer), else EnergykWh, else ""."""
    for name in ("EnergyJoules", "EnergykWh"):
        if _reading(environment, name) is not None:
            return name
    return ""


def environment_sample(environment: Any, name: str) -> Sample:
    """A counter sample from EnvironmentMetrics; ReadingError for values that are not."""
    found = _reading(environment, name)
    if found is None:
        raise ReadingError(f"EnvironmentMetrics has no {name} reading")
    raw, stamp = found
    joules = check_joules(raw) * (JOULES_PER_KWH if name == "EnergykWh" else 1.0)
    power = _reading(environment, "PowerWatts")
    return Sample(joules, check_watts(power[0]) if power else None, stamp)


def environment_power(environment: Any) -> Sample:
    found = _reading(environment, "PowerWatts")
    if found is None:
        raise ReadingError("EnvironmentMetrics has no PowerWatts reading")
    return Sample(None, check_watts(found[0]), found[1])


def power_control_watts(power: Any) -> float:
    """The first PowerControl entry's PowerConsumedWatts (the chassis input power)."""
    controls = power.get("PowerControl") if isinstance(power, dict) else None
    if not isinstance(controls, list):
        raise ReadingError("Power has no PowerControl list")
    for control in controls:
        if isinstance(control, dict) and control.get("PowerConsumedWatts") is not None:
            return check_watts(control["PowerConsumedWatts"])
    raise ReadingError("no PowerControl entry has PowerConsumedWatts")


def supply_watts(metrics: Any) -> float:
    found = _reading(metrics, "InputPowerWatts")
    if found is None:
        raise ReadingError("a power supply's Metrics has no InputPowerWatts reading")
    return check_watts(found[0])


def members(collection: Any, limit: int) -> list[str]:
    """The member paths of a Redfish collection (at most `limit`)."""
    items = collection.get("Members") if isinstance(collection, dict) else None
    if not isinstance(items, list):
        raise FetchError("missing_field", "a collection without Members")
    return [resource_path(item) for item in items[:limit]]


def _link(resource: Any, name: str, fallback: str) -> str:
    link = resource.get(name) if isinstance(resource, dict) else None
    return resource_path(link) if link is not None else fallback


class RedfishMeter:
    """The node's energy from its BMC (module docstring)."""

    name = SOURCE

    def __init__(self, client: Client, *, chassis: str | None = None,
                 interval_seconds: float = 10.0, stale_after_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 start_poller: bool = True) -> None:
        if not stale_after_seconds > interval_seconds > 0:
            raise ValueError("stale_after_seconds must exceed interval_seconds > 0")
        self.client = client
        self.chassis = chassis
        self.interval_seconds = interval_seconds
        self.stale_after_seconds = stale_after_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self.plan: Plan | None = None
        self._counter = CounterTrack()
        self._freshness = Freshness(stale_after_seconds)
        self._power = PowerIntegrator(min(GAP_POLLS * interval_seconds, stale_after_seconds),
                                      TRAPEZOID)
        self._reported = Reported()
        self._stale = False
        self._polled_at: float | None = None  # the last good poll
        self.gaps = Gaps()
        self.stale_total = 0
        self._up = False
        self._pending_errors = 0
        self.errors_total = 0
        self.last_error = ""
        self.last_sample: Sample | None = None
        self.polls_total = 0
        self._poller: Poller | None = None
        if start_poller:
            self._poller = Poller(f"{SOURCE}-poller", interval_seconds, self.poll, self._failed)
            self._poller.start()

    # -- the poller's side ----------------------------------------------------------------

    def poll(self) -> None:
        """One poll of the BMC (the poller thread's work; tests and `probe` call it)."""
        try:
            plan = self.plan or self._discover()
            sample = self._sample(plan)
        except (FetchError, ReadingError) as exc:
            self._failed(exc)
            return
        self._take(self._clock(), sample)

    def _discover(self) -> Plan:
        chassis = self.chassis or self._only_chassis()
        base = f"{CHASSIS_PATH}/{chassis}"
        resource = self.client.get(base)
        environment_path = _link(resource, "EnvironmentMetrics", f"{base}/EnvironmentMetrics")
        environment = None
        try:
            environment = self.client.get(environment_path)
        except FetchError as exc:
            if exc.reason not in ("http_404", "http_405", "http_501"):
                raise
        name = counter_name(environment) if environment is not None else ""
        if name:
            plan = Plan(chassis, COUNTER, (environment_path,), name)
        elif environment is not None and _reading(environment, "PowerWatts") is not None:
            plan = Plan(chassis, ENV_POWER, (environment_path,))
        else:
            plan = self._power_plan(chassis, base, resource)
        with self._lock:
            self.plan = plan
        log.info("redfish %s: chassis %s, %s", self.client.host, chassis,
                 f"{plan.method} {plan.counter_name}".strip())
        return plan

    def _power_plan(self, chassis: str, base: str, resource: Any) -> Plan:
        power_path = _link(resource, "Power", f"{base}/Power")
        try:
            power_control_watts(self.client.get(power_path))
            return Plan(chassis, POWER_CONTROL, (power_path,))
        except (FetchError, ReadingError) as exc:
            if isinstance(exc, FetchError) and exc.reason not in ("http_404", "http_405",
                                                                  "http_501"):
                raise
        subsystem = self.client.get(_link(resource, "PowerSubsystem", f"{base}/PowerSubsystem"))
        supplies = self.client.get(_link(subsystem, "PowerSupplies",
                                         f"{base}/PowerSubsystem/PowerSupplies"))
        paths = []
        for supply in members(supplies, MAX_SUPPLIES):
            paths.append(_link(self.client.get(supply), "Metrics", f"{supply}/Metrics"))
        if not paths:
            raise ReadingError(f"chassis {chassis} has no energy counter, PowerControl or "
                               "power supplies")
        return Plan(chassis, SUPPLIES, tuple(paths))

    def _only_chassis(self) -> str:
        """The chassis Id when there is one top-level chassis (not ContainedBy another)."""
        paths = members(self.client.get(CHASSIS_PATH), MAX_CHASSIS)
        ids = [path.rstrip("/").rsplit("/", 1)[-1] for path in paths]
        if len(ids) == 1:
            return ids[0]
        top = []
        for chassis_id, path in zip(ids, paths, strict=True):
            resource = self.client.get(path)
            links = resource.get("Links") if isinstance(resource, dict) else None
            if not (isinstance(links, dict) and links.get("ContainedBy")):
                top.append(chassis_id)
        if len(top) == 1:
            return top[0]
        shown = ", ".join(ascii(i)[1:-1] for i in (top or ids)[:8])
        raise ReadingError(f"several chassis ({shown}): set meters.redfish.chassis")

    def _sample(self, plan: Plan) -> Sample:
        documents = [self.client.get(path) for path in plan.paths]
        if plan.method == COUNTER:
            return environment_sample(documents[0], plan.counter_name)
        if plan.method == ENV_POWER:
            return environment_power(documents[0])
        if plan.method == POWER_CONTROL:
            return Sample(None, power_control_watts(documents[0]))
        return Sample(None, check_watts(sum(supply_watts(d) for d in documents)))

    @property
    def max_gap_seconds(self) -> float:
        """The longest time without a good poll that is still bridged; beyond it the meter
        is down and the next poll starts afresh."""
        return self._power.max_gap_seconds

    def _take(self, now: float, sample: Sample) -> None:
        with self._lock:
            self.polls_total += 1
            self.last_sample = sample
            if self._polled_at is not None and now - self._polled_at > self.max_gap_seconds:
                # The BMC was away: what its counter gained meanwhile is not energy of now
                # (the host counted its parts), and a power gap is not integrated either.
                self.gaps.add(now - self._polled_at)
                self._counter.restart()
                self._power.restart()
            self._polled_at = now
            stale = self._freshness.observe(now, sample)
            self._set_stale(stale)
            if stale:
                return
            if sample.joules is not None:
                try:
                    self._counter.add(now, sample.joules, sample.watts)
                except ReadingError as exc:
                    self._error(exc)
            elif sample.watts is not None:
                self._power.add(now, sample.watts)

    def _set_stale(self, stale: bool) -> None:
        if stale and not self._stale:
            self.stale_total += 1
            self._error(ReadingError(f"the reading has not moved for more than "
                                     f"{self.stale_after_seconds:g} s: stale, not power"))
            self._counter.restart()
            self._power.restart()
        elif not stale and self._stale:
            log.info("redfish %s: readings move again", self.client.host)
        self._stale = stale

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._error(exc)
            if isinstance(exc, FetchError) and exc.reason in ("http_404", "missing_field"):
                self.plan = None  # the BMC changed (firmware update): find the resources again

    def _error(self, exc: BaseException) -> None:
        self._pending_errors += 1
        self.errors_total += 1
        text = str(exc) or type(exc).__name__
        if text != self.last_error:
            log.warning("redfish %s: %s", self.client.host, text)
        self.last_error = text

    # -- the tick's side ------------------------------------------------------------------

    def read(self) -> MeterReading:
        """The energy up to now from the last poll; no device while stale or without a fresh
        poll (never zero). Never touches the network."""
        now = self._clock()
        with self._lock:
            reading = MeterReading(errors=self._pending_errors)
            self._pending_errors = 0
            joules = None
            fresh = self._polled_at is not None and now - self._polled_at <= self.max_gap_seconds
            if fresh and not self._stale and self.plan is not None:
                if self.plan.method == COUNTER:
                    joules = self._counter.joules_at(now, self.stale_after_seconds)
                else:
                    joules = self._power.joules_at(now, self._power.max_gap_seconds)
            if joules is not None:
                reading.devices.append(DeviceEnergy(DEVICE, COMPONENT, SOURCE,
                                                    self._reported.update(joules)))
            self._up = joules is not None
        return reading

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        return frozenset({COMPONENT}) if self._up else frozenset()

    def probe(self) -> None:
        """One poll now, for `carbond check` (which has no poller cadence to wait for)."""
        self.poll()

    def report(self) -> list[DeviceReport]:
        with self._lock:
            plan, sample, errors = self.plan, self.last_sample, self.errors_total
            stale, last_error = self._stale, self.last_error
            gaps = self.gaps
        where = f"BMC {self.client.host}"
        if plan is None:
            return [DeviceReport(DEVICE, f"{where}: {last_error or 'not polled yet'}", False)]
        method = f"{plan.method} {plan.counter_name}".strip()
        detail = f"{where}, chassis {ascii(plan.chassis)[1:-1]}: {method}, every " \
                 f"{self.interval_seconds:g} s"
        if sample is not None and sample.watts is not None:
            detail += f"; {sample.watts:.1f} W"
        if sample is not None and sample.joules is not None:
            detail += f"; counter {sample.joules / JOULES_PER_KWH:.3f} kWh"
        if stale:
            detail += f"; STALE (no change for over {self.stale_after_seconds:g} s)"
        if gaps.count:
            detail += f"; {gaps.count} polling gaps ({gaps.seconds:.0f} s) not integrated"
        if errors:
            detail += f"; {errors} failed polls, last: {last_error}"
        lines = [DeviceReport(DEVICE, detail, sample is not None and not stale)]
        if self._poller is not None and not self._poller.alive:
            lines.append(DeviceReport(DEVICE, "the polling thread has stopped", False))
        return lines

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        self.client.close()
