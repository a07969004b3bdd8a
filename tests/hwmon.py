"""Fake hwmon trees laid out like /sys/class/hwmon, with ACPI power meters that tests drive."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class FakePowerMeter:
    directory: str  # where the attribute files are (hwmonN or hwmonN/device)
    power_file: str = "power1_average"

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.power_file)

    def write(self, text: str) -> None:
        """Replace the power file whole: a reader never sees half a number."""
        temporary = self.path + ".new"
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, self.path)

    def set_watts(self, watts: float) -> None:
        self.write(f"{round(watts * 1e6)}\n")

    def vanish(self) -> None:
        os.remove(self.path)


class FakeHwmon:
    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def add(self, index: int, name: str, *, legacy: bool = False,
            power_file: str | None = "power1_average", watts: float = 100.0,
            interval_ms: int | None = 1000) -> FakePowerMeter:
        """hwmonN named `name`; `legacy` puts the files under hwmonN/device as kernels before
        the acpi_power_meter hwmon_info conversion did."""
        base = os.path.join(self.root, f"hwmon{index}")
        directory = os.path.join(base, "device") if legacy else base
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "name"), "w") as handle:
            handle.write(name + "\n")
        if interval_ms is not None:
            with open(os.path.join(directory, "power1_average_interval"), "w") as handle:
                handle.write(f"{interval_ms}\n")
        meter = FakePowerMeter(directory, power_file or "power1_average")
        if power_file is not None:
            meter.set_watts(watts)
        return meter
