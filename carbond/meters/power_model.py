"""Modelled power where no hardware counter exists (cloud VMs, hosts without RAPL).

P_cpu = n_vcpu x (W_min + u x (W_max - W_min)), P_memory = GB x W/GB, with Cloud Carbon
Footprint's per-vCPU coefficients by default. Utilisation comes from /proc/stat deltas, so the
model integrates the same interval the tick measures. Everything carries source="model".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from carbond.meters.base import DeviceEnergy, DeviceReport, MeterReading


@dataclass(frozen=True)
class CpuTimes:
    busy_ticks: int
    total_ticks: int


def parse_proc_stat(text: str) -> tuple[CpuTimes, int]:
    """Aggregate busy/total jiffies and the number of vCPUs from /proc/stat."""
    times = CpuTimes(0, 0)
    vcpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = [int(value) for value in line.split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            total = sum(fields[:8])  # guest time is already inside user/nice
            times = CpuTimes(total - idle, total)
        elif line.startswith("cpu") and line[3:4].isdigit():
            vcpus += 1
    return times, vcpus


def parse_meminfo_gb(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def utilisation(previous: CpuTimes, current: CpuTimes) -> float:
    total = current.total_ticks - previous.total_ticks
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, (current.busy_ticks - previous.busy_ticks) / total))


def cpu_watts(vcpus: int, utilisation_ratio: float, watts_min: float, watts_max: float) -> float:
    return vcpus * (watts_min + utilisation_ratio * (watts_max - watts_min))


class ModelMeter:
    name = "model"

    def __init__(
        self,
        proc_root: str = "/proc",
        cpu_watts_min: float = 0.74,
        cpu_watts_max: float = 3.5,
        memory_watts_per_gb: float = 0.392,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self.cpu_watts_min = cpu_watts_min
        self.cpu_watts_max = cpu_watts_max
        self.memory_watts_per_gb = memory_watts_per_gb
        self._clock = clock
        self.errors_total = 0
        self._cpu_joules = 0.0
        self._memory_joules = 0.0
        self._vcpus = 0
        self._memory_gb = 0.0
        self._last: tuple[float, CpuTimes] | None = None
        self._up = False
        self._reason = ""
        try:
            with open(os.path.join(proc_root, "meminfo"), encoding="ascii") as handle:
                self._memory_gb = parse_meminfo_gb(handle.read())
        except OSError as exc:
            self._reason = f"cannot read meminfo: {exc.strerror}"
        self._sample()

    def _sample(self) -> CpuTimes | None:
        try:
            with open(os.path.join(self.proc_root, "stat"), encoding="ascii") as handle:
                times, self._vcpus = parse_proc_stat(handle.read())
        except OSError as exc:
            self._reason = f"cannot read {self.proc_root}/stat: {exc.strerror}"
            return None
        now = self._clock()
        if self._last is not None:
            seconds = now - self._last[0]
            ratio = utilisation(self._last[1], times)
            watts = cpu_watts(self._vcpus, ratio, self.cpu_watts_min, self.cpu_watts_max)
            self._cpu_joules += watts * seconds
            self._memory_joules += self._memory_gb * self.memory_watts_per_gb * seconds
        self._last = (now, times)
        return times

    def read(self) -> MeterReading:
        reading = MeterReading()
        if self._sample() is None:
            reading.errors = 1
            self.errors_total += 1
            self._up = False
            return reading
        self._up = True
        reading.devices.append(DeviceEnergy("cpu", "cpu", "model", self._cpu_joules))
        if self._memory_gb > 0:
            reading.devices.append(DeviceEnergy("dram", "dram", "model", self._memory_joules))
        return reading

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        return frozenset()  # an estimate, never a counter

    def report(self) -> list[DeviceReport]:
        if self._last is None:
            return [DeviceReport("cpu", self._reason or "no /proc/stat", False)]
        return [
            DeviceReport(
                "cpu",
                f"{self._vcpus} vCPUs x {self.cpu_watts_min:g}..{self.cpu_watts_max:g} W "
                f"from {self.proc_root}/stat utilisation",
                True,
            ),
            DeviceReport(
                "dram",
                f"{self._memory_gb:.1f} GB x {self.memory_watts_per_gb:g} W/GB",
                self._memory_gb > 0,
            ),
        ]

    def close(self) -> None:
        pass
