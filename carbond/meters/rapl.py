"""RAPL energy counters through the Linux powercap tree.

Zones are classified by their `name` file, never by index: index order is not socket order.
A package zone already includes its core and uncore subzones, `psys` covers package + DRAM +
the rest of the platform, and `intel-rapl-mmio` repeats a package zone, so only packages, DRAM
and psys are read, each once.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from carbond.meters.base import (
    CEILING_WATTS,
    ERROR,
    RESET,
    WRAP,
    DeviceEnergy,
    DeviceReport,
    EnergyCounter,
    MeterReading,
    parse_counter,
)

log = logging.getLogger(__name__)

_ZONE_DIR = re.compile(r"^(?P<prefix>[a-z0-9-]+):(?P<path>\d+(?::\d+)*)$")
_PACKAGE = re.compile(r"^package-(\d+)(-die-\d+)?$")
UNREADABLE_HINT = "run carbond as root, or grant it CAP_DAC_READ_SEARCH"
REDISCOVER_SECONDS = 60.0
# A reading is accepted (as an increase, a wrap or a reset) only if the energy it implies could
# have been drawn: at most twice the zone's highest power constraint (turbo can exceed the
# long-term limit), else CEILING_WATTS.
__all__ = ["CEILING_WATTS", "RaplMeter", "Zone", "classify", "discover"]


@dataclass(frozen=True)
class Zone:
    path: str
    name: str  # contents of the `name` file
    device: str  # package-0, dram-1, psys; "" when the zone is not counted
    component: str  # cpu, dram, platform; "" when not counted
    range_uj: int | None
    why_skipped: str = ""
    max_power_uw: int | None = None  # the highest constraint_N_max_power_uw, if any

    @property
    def max_uj_per_second(self) -> float:
        """The most energy per second a wrap may imply (see CEILING_WATTS)."""
        if self.max_power_uw:
            return 2.0 * self.max_power_uw
        return CEILING_WATTS * 1e6


def _read_bytes(path: str) -> bytes:
    """A small sysfs file. Non-blocking, so a FIFO planted where a counter should be reads as
    garbage instead of stalling the tick (a hung driver is the daemon's deadline's job)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("ascii").strip()


def _read_counter(path: str) -> int:
    """An integer file, strictly (see parse_counter); OSError or ValueError."""
    return parse_counter(_read_bytes(path))


def _read_int(path: str) -> int | None:
    """A positive integer file, else None (absent, unreadable, malformed or 0)."""
    try:
        return _read_counter(path) or None
    except (OSError, ValueError):
        return None


def _zone_dirs(root: str) -> list[str]:
    """Every zone directory under root, found both flat (sysfs links) and nested, once each."""
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if _ZONE_DIR.match(entry.name) and entry.is_dir():
                real = os.path.realpath(entry.path)
                if real not in found:
                    found[real] = entry.path
                    pending.append(entry.path)
    return sorted(found.values(), key=lambda path: os.path.basename(path))


def classify(path: str, name: str, parent_name: str | None, range_uj: int | None) -> Zone:
    """Decide what a zone measures; pure, so every layout is a table test."""
    match = _ZONE_DIR.match(os.path.basename(path))
    if match and match.group("prefix") == "intel-rapl-mmio":
        return Zone(path, name, "", "", range_uj, "mmio duplicate of a package zone")
    if _PACKAGE.match(name):
        return Zone(path, name, name, "cpu", range_uj)
    if name == "dram":
        parent = _PACKAGE.match(parent_name or "")
        if parent:
            socket = parent.group(1)
        else:
            socket = match.group("path").split(":")[0] if match else "0"
        return Zone(path, name, f"dram-{socket}", "dram", range_uj)
    if name == "psys":
        return Zone(path, name, "psys", "platform", range_uj)
    if name in ("core", "uncore"):
        return Zone(path, name, "", "", range_uj, f"{name} is included in its package")
    return Zone(path, name, "", "", range_uj, f"unknown zone name {name!r}")


def _parent_id(zone_id: str) -> str | None:
    """`intel-rapl:0:2` -> `intel-rapl:0`: the same in real sysfs and flat fake trees."""
    head, sep, _ = zone_id.rpartition(":")
    return head if sep and ":" in head else None


def discover(root: str) -> list[Zone]:
    names: dict[str, str] = {}
    paths = []
    for path in _zone_dirs(root):
        try:
            names[os.path.basename(path)] = _read_text(os.path.join(path, "name"))
        except (OSError, ValueError):
            continue
        paths.append(path)
    zones = []
    for path in paths:
        zone_id = os.path.basename(path)
        parent = _parent_id(zone_id)
        range_uj = _read_int(os.path.join(path, "max_energy_range_uj"))
        zone = classify(path, names[zone_id], names.get(parent or ""), range_uj)
        zones.append(dataclasses.replace(zone, max_power_uw=_max_power_uw(path)))
    return zones


def _max_power_uw(path: str) -> int | None:
    limits = []
    for index in range(8):  # constraint_0 long term, _1 short term, _2 peak
        value = _read_int(os.path.join(path, f"constraint_{index}_max_power_uw"))
        if value is None:
            break
        limits.append(value)
    return max(limits, default=None) or None


def _describe_error(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {UNREADABLE_HINT}"
    return exc.strerror or str(exc)


class RaplMeter:
    """Reads package, DRAM and psys zones; survives zones vanishing and appearing."""

    name = "rapl"

    def __init__(self, root: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self._clock = clock
        self._counters: dict[str, EnergyCounter] = {}
        self._counted: list[Zone] = []
        self._zones: list[Zone] = []
        self._discovered_at = -REDISCOVER_SECONDS
        self._up = False
        self.errors_total = 0
        self._rejecting: set[str] = set()  # devices whose last value was impossible
        self._rediscover()

    def _rediscover(self) -> None:
        self._zones = discover(self.root)
        counted = [zone for zone in self._zones if zone.device]
        previous = {zone.device: zone.path for zone in self._counted}
        for zone in counted:
            counter = self._counters.get(zone.device)
            if counter is None:
                self._counters[zone.device] = EnergyCounter(zone.range_uj,
                                                            zone.max_uj_per_second)
            elif previous.get(zone.device) != zone.path:
                counter.restart()  # a different zone took this name: start afresh
                counter.range_units = zone.range_uj
                counter.max_units_per_second = zone.max_uj_per_second
        self._counted = counted
        self._discovered_at = self._clock()

    def read(self) -> MeterReading:
        if self._clock() - self._discovered_at >= REDISCOVER_SECONDS:
            self._rediscover()
        reading = MeterReading()
        vanished = False
        for zone in self._counted:
            try:
                raw = _read_counter(os.path.join(zone.path, "energy_uj"))
            except FileNotFoundError:
                vanished = True
                reading.errors += 1
                continue
            except (OSError, ValueError) as exc:
                reading.errors += 1
                log.debug("rapl zone %s unreadable: %s", zone.path, exc)
                continue
            counter = self._counters[zone.device]
            previous = counter.last_raw
            event = counter.update(raw, self._clock())
            if event == ERROR:
                reading.errors += 1
                self._say_rejected(zone, previous, raw)
                continue
            self._rejecting.discard(zone.device)
            if event == WRAP:
                reading.wraps[zone.device] = 1
            elif event == RESET:
                reading.resets[zone.device] = 1
                log.warning("rapl %s: counter went from %s to %d uJ, more than the zone can "
                            "draw if it had wrapped: counted as a reset", zone.device,
                            previous, raw)
            reading.devices.append(
                DeviceEnergy(zone.device, zone.component, "rapl", counter.total_units / 1e6)
            )
        self.errors_total += reading.errors
        self._up = bool(reading.devices)
        if vanished:
            self._discovered_at = -REDISCOVER_SECONDS
        return reading

    def _say_rejected(self, zone: Zone, previous: int | None, raw: int) -> None:
        """One warning when a device starts giving impossible values, not one per tick."""
        if zone.device in self._rejecting:
            log.debug("rapl %s: impossible value %d uJ again", zone.device, raw)
            return
        self._rejecting.add(zone.device)
        log.warning("rapl %s: energy_uj went from %s to %d uJ, outside 0..%s or more than the "
                    "zone can draw (%.0f W) in the time: an error sample, not energy",
                    zone.device, previous, raw, zone.range_uj or "?",
                    zone.max_uj_per_second / 1e6)

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        """What the counters measure on this host: components of zones that are present and
        have given a reading. A read that fails now and then does not drop a component (the
        next read brings the missed energy), so the model never stands in for it meanwhile."""
        return frozenset(
            zone.component for zone in self._counted
            if self._counters[zone.device].last_raw is not None
        )

    def report(self) -> list[DeviceReport]:
        if not self._zones:
            return [DeviceReport("-", f"no powercap zones under {self.root}", False)]
        lines = []
        for zone in self._zones:
            span = f"max range {zone.range_uj} uJ" if zone.range_uj else "max range unknown"
            label = zone.device or zone.name
            if not zone.device:
                lines.append(DeviceReport(label, f"{zone.path}: not counted ({zone.why_skipped})",
                                          True))
                continue
            where = f"{zone.path} (name {zone.name})"
            try:
                _read_counter(os.path.join(zone.path, "energy_uj"))
                lines.append(DeviceReport(label, f"{where}: readable, {span}", True))
            except OSError as exc:
                lines.append(DeviceReport(label, f"{where}: {_describe_error(exc)}", False))
            except ValueError:
                lines.append(DeviceReport(label, f"{where}: energy_uj is not a number", False))
        return lines

    def close(self) -> None:
        pass
