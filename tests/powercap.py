"""Fake Linux powercap trees laid out like sysfs: nested zone directories under
devices/virtual/powercap plus the flat `intel-rapl:N` links of /sys/class/powercap."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carbond.workloads.cpu import host_cpuacct_root

INTEL_PACKAGE_RANGE_UJ = 262_143_328_850
INTEL_DRAM_RANGE_UJ = 65_712_999_613


@dataclass
class FakeZone:
    path: str
    range_uj: int | None
    energy_uj: int = 0

    def _write(self) -> None:
        target = os.path.join(self.path, "energy_uj")
        if os.path.isdir(target):
            return
        temporary = target + ".new"  # replaced whole: a reader never sees half a number
        with open(temporary, "w") as handle:
            handle.write(f"{self.energy_uj}\n")
        os.replace(temporary, target)

    def set_uj(self, value: int) -> None:
        self.energy_uj = value
        self._write()

    def advance_uj(self, delta: int) -> None:
        """Advance like hardware: past the range the counter wraps to 0."""
        value = self.energy_uj + delta
        if self.range_uj is not None:
            value %= self.range_uj + 1
        self.set_uj(value)

    def write_raw(self, text: bytes) -> None:
        """Exactly these bytes in energy_uj (a driver or firmware gone wrong); the zone's own
        value is kept, so set_uj/advance_uj go on from it."""
        target = os.path.join(self.path, "energy_uj")
        with open(target + ".new", "wb") as handle:
            handle.write(text)
        os.replace(target + ".new", target)

    def set_constraint_uw(self, microwatts: int, index: int = 0) -> None:
        with open(os.path.join(self.path, f"constraint_{index}_max_power_uw"), "w") as handle:
            handle.write(f"{microwatts}\n")

    def make_unreadable(self) -> None:
        """A read fails (EISDIR) even for root, who ignores file modes."""
        os.remove(os.path.join(self.path, "energy_uj"))
        os.mkdir(os.path.join(self.path, "energy_uj"))

    def make_readable(self) -> None:
        os.rmdir(os.path.join(self.path, "energy_uj"))
        self._write()

    def remove_range(self) -> None:
        os.remove(os.path.join(self.path, "max_energy_range_uj"))
        self.range_uj = None


class FakePowercap:
    def __init__(self, root: str) -> None:
        self.root = root
        self.devices = os.path.join(root, "devices", "virtual", "powercap")
        os.makedirs(self.devices, exist_ok=True)
        self.zones: dict[str, FakeZone] = {}

    def add(self, zone_id: str, name: str, range_uj: int | None = INTEL_PACKAGE_RANGE_UJ,
            energy_uj: int = 0) -> FakeZone:
        prefix, *indices = zone_id.split(":")
        parent = os.path.join(self.devices, prefix)
        for depth in range(1, len(indices)):
            parent = os.path.join(parent, ":".join([prefix, *indices[:depth]]))
        path = os.path.join(parent, zone_id)
        os.makedirs(path)
        with open(os.path.join(path, "name"), "w") as handle:
            handle.write(name + "\n")
        if range_uj is not None:
            with open(os.path.join(path, "max_energy_range_uj"), "w") as handle:
                handle.write(f"{range_uj}\n")
        with open(os.path.join(path, "enabled"), "w") as handle:
            handle.write("1\n")
        os.symlink(os.path.relpath(path, self.root), os.path.join(self.root, zone_id))
        zone = FakeZone(path, range_uj, energy_uj)
        zone._write()
        self.zones[zone_id] = zone
        return zone

    def remove(self, zone_id: str) -> None:
        zone = self.zones.pop(zone_id)
        os.remove(os.path.join(self.root, zone_id))
        shutil.rmtree(zone.path)

    def by_name(self, name: str) -> list[FakeZone]:
        found = []
        for zone in self.zones.values():
            with open(os.path.join(zone.path, "name")) as handle:
                if handle.read().strip() == name:
                    found.append(zone)
        return found


def intel_two_socket(root: str) -> FakePowercap:
    """Two sockets whose zone indices are not in socket order, plus psys and an mmio copy."""
    tree = FakePowercap(root)
    for index, socket in ((0, 1), (1, 0)):
        tree.add(f"intel-rapl:{index}", f"package-{socket}")
        tree.add(f"intel-rapl:{index}:0", "core")
        tree.add(f"intel-rapl:{index}:1", "uncore")
        tree.add(f"intel-rapl:{index}:2", "dram", INTEL_DRAM_RANGE_UJ)
    tree.add("intel-rapl:2", "psys")
    tree.add("intel-rapl-mmio:0", "package-0")
    return tree


def amd_epyc(root: str, cores_per_package: int = 4) -> FakePowercap:
    tree = FakePowercap(root)
    for socket in range(2):
        tree.add(f"intel-rapl:{socket}", f"package-{socket}")
        for core in range(cores_per_package):
            tree.add(f"intel-rapl:{socket}:{core}", "core")
    return tree


def laptop(root: str) -> FakePowercap:
    tree = FakePowercap(root)
    tree.add("intel-rapl:0", "package-0")
    tree.add("intel-rapl:0:0", "core")
    tree.add("intel-rapl:0:1", "uncore")
    tree.add("intel-rapl:1", "psys")
    tree.add("intel-rapl-mmio:0", "package-0")
    return tree


def empty(root: str) -> FakePowercap:
    return FakePowercap(root)


class ConstantPower:
    """Advances a package and a DRAM zone in real time, like hardware at constant power."""

    def __init__(self, root: str, package_watts: float = 40.0, dram_watts: float = 5.0) -> None:
        tree = FakePowercap(root)
        self.package_watts, self.dram_watts = package_watts, dram_watts
        self.package = tree.add("intel-rapl:0", "package-0")
        self.dram = tree.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            self.package.advance_uj(round(self.package_watts * (now - last) * 1e6))
            self.dram.advance_uj(round(self.dram_watts * (now - last) * 1e6))
            last = now

    def __enter__(self) -> ConstantPower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def busy_cpu_seconds(proc_stat: str = "/proc/stat") -> float:
    """The host's CPU seconds spent working (user, nice, system, irq, softirq), all CPUs, as
    /proc/stat samples them (10 ms steps, a whole tick to whatever runs when it fires)."""
    with open(proc_stat) as handle:
        fields = handle.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def host_cpu_seconds_reader() -> Callable[[], float]:
    """The host's working CPU seconds from the exactest count it has: the v1 cpuacct root
    (every task, per ns, as the scheduler charges it, which is what carbond splits by), else
    /proc/stat. RAPL's energy is physical: it has no sampling error of its own, so a stand-in
    whose draw followed /proc/stat's ticks would add noise carbond's side does not have."""
    root = host_cpuacct_root()
    if root is None:
        return busy_cpu_seconds
    usage = f"{root}/cpuacct.usage"
    return lambda: int(Path(usage).read_text()) / 1e9


class LoadPower:
    """A package and a DRAM zone whose power follows the host's CPU use, as RAPL's does:
    package `idle_watts + watts_per_core x busy cores`, DRAM `dram_share` of that. With
    `attribution.idle_watts.cpu` set to `idle_watts`, every dynamic joule was drawn by some CPU
    second (and DRAM, which follows the CPU split, idle included, splits the same way), so a
    consumer's energy does not depend on where the ticks fall. ConstantPower's draw, the same
    whatever runs, is split by the shares of each tick instead."""

    def __init__(self, root: str, idle_watts: float = 10.0, watts_per_core: float = 15.0,
                 dram_share: float = 0.125) -> None:
        tree = FakePowercap(root)
        self.idle_watts, self.watts_per_core = idle_watts, watts_per_core
        self.dram_share = dram_share
        self.package = tree.add("intel-rapl:0", "package-0")
        self.dram = tree.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        busy_cpu_seconds = host_cpu_seconds_reader()
        last, busy = time.monotonic(), busy_cpu_seconds()
        while not self._stop.wait(0.02):
            now, busy_now = time.monotonic(), busy_cpu_seconds()
            joules = self.idle_watts * (now - last) + self.watts_per_core * max(0.0,
                                                                                busy_now - busy)
            self.package.advance_uj(round(joules * 1e6))
            self.dram.advance_uj(round(self.dram_share * joules * 1e6))
            last, busy = now, busy_now

    def __enter__(self) -> LoadPower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
