"""Issue 22's first "done when", up to the daemon: a fake 1,000 W platform (ACPI power meter in
a fake hwmon tree) over a fake RAPL tree and the stand-in NVML library summing to 700 W, read by
carbond's real meters, turned into deltas by DeviceDeltas and attributed: every tick the
consumers sum to the platform energy within 1e-9, the 300 W rest is split in proportion to
each consumer's measured energy (within 1 % per consumer), and the coverage is 0.70.

The daemon's own tick (interval timer, exporter) is wired by the lead: this test drives the
same meters and the same pure attribution with a simulated clock, tick by tick.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from carbond.attribution import GpuWeights, Policy, TickInput, attribute
from carbond.meters.acpi import AcpiMeter
from carbond.meters.base import DeviceEnergy
from carbond.meters.rapl import RaplMeter
from carbond.pipeline.deltas import DeviceDeltas
from carbond.types import IDLE, Consumer
from tests.fakes.nvml import Driver, FakeGpu, Scenario
from tests.hwmon import FakeHwmon
from tests.powercap import INTEL_DRAM_RANGE_UJ, FakePowercap

PLATFORM_WATTS, PACKAGE_WATTS, DRAM_WATTS, GPU_WATTS = 1000.0, 400.0, 50.0, 250.0
TICK_SECONDS = 5.0
A, B = Consumer("unit", "a.service"), Consumer("unit", "b.service")
JOB = Consumer("job", "slurm/7")


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("policy", ["proportional", "idle"])
def test_thousand_watt_node_with_seven_hundred_watts_of_parts(tmp_path: Path, fake_lib,
                                                             policy) -> None:
    clock = Clock()
    hwmon = FakeHwmon(str(tmp_path / "hwmon"))
    hwmon.add(0, "power_meter", watts=PLATFORM_WATTS, interval_ms=1000)
    powercap = FakePowercap(str(tmp_path / "powercap"))
    package = powercap.add("intel-rapl:0", "package-0")
    dram = powercap.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
    scenario = Scenario(gpus=[FakeGpu(0, "GPU-0000", energy_millijoules=1_000_000)])
    scenario_file = tmp_path / "nvml.scenario"
    scenario.write(scenario_file)

    acpi = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    rapl = RaplMeter(powercap.root, clock=clock)
    totals = DeviceDeltas()
    counted: set[tuple[str, str, str]] = set()  # every host series the exporter would show
    usage = {A: 3.0, B: 1.0}  # CPU seconds per tick
    gpus = {"gpu-0": GpuWeights(sm={JOB: 400.0})}
    ticks = []
    with Driver(fake_lib, scenario_file, {"start_sampler": False}, fake_clock=True) as nvml:
        acpi.sample()
        for tick in range(13):
            if tick:  # the hardware draws for one tick; the ACPI meter is sampled each second
                for _ in range(int(TICK_SECONDS)):
                    clock.now += 1.0
                    acpi.sample()
                package.advance_uj(round(PACKAGE_WATTS * TICK_SECONDS * 1e6))
                dram.advance_uj(round(DRAM_WATTS * TICK_SECONDS * 1e6))
                scenario.gpus[0].energy_millijoules += round(GPU_WATTS * TICK_SECONDS * 1e3)
                scenario.write(scenario_file)
                nvml.call("advance", seconds=TICK_SECONDS)  # the GPU drew it over a tick
            readings = [*rapl.read().devices, *acpi.read().devices]
            gpu = nvml.call("read")
            readings += [DeviceEnergy(device, "gpu", "nvml", joules)
                         for device, joules in gpu["devices"].items()]
            deltas = totals.deltas(readings)
            result = attribute(TickInput(TICK_SECONDS, deltas, usage, gpus,
                                         frozenset({"cpu", "dram"}), cpu_idle_watts=80.0),
                               Policy(platform=policy))
            counted |= {(d.component, d.device, d.source) for d in result.counted}
            ticks.append(result)
    acpi.close()

    measured = ticks[2:]  # tick 0 is every meter's baseline, tick 1 the NVML one's
    assert len(measured) == 11
    for result in measured:
        consumers = math.fsum(j for parts in result.energy.values() for j in parts.values())
        assert result.platform_joules == pytest.approx(PLATFORM_WATTS * TICK_SECONDS)
        assert abs(consumers - result.platform_joules) <= 1e-9 * result.platform_joules
        assert result.coverage_ratio == pytest.approx(0.70, abs=1e-6)
        assert result.platform_excess_joules == 0.0
        rest = result.platform_joules - result.parts_joules
        assert rest == pytest.approx(300.0 * TICK_SECONDS)
        for consumer, parts in result.energy.items():
            own = math.fsum(j for c, j in parts.items() if c != "platform")
            if policy == "proportional":
                expected = rest * own / result.parts_joules
            else:
                expected = rest if consumer == IDLE else 0.0
            assert parts.get("platform", 0.0) == pytest.approx(expected, rel=0.01, abs=1e-6)
    job = measured[-1].energy[JOB]
    assert job["gpu"] == pytest.approx(GPU_WATTS * TICK_SECONDS)
    if policy == "proportional":  # 250 W of 700 W measured: 250/700 of the 300 W rest
        assert job["platform"] == pytest.approx(300.0 * 250 / 700 * TICK_SECONDS, rel=0.01)
    # the platform series and the parts are all exported as host series
    exported = counted
    assert ("platform", "platform", "acpi") in exported
    assert {("cpu", "package-0", "rapl"), ("dram", "dram-0", "rapl"),
            ("gpu", "gpu-0", "nvml")} <= exported
