"""Done-when check of issue 3, end to end on real cgroups and a fake powercap tree.

Two real cgroups `system.slice/a.service` and `system.slice/b.service` burn CPU at about 3:1;
host power is constant (a fake RAPL package + DRAM zone read by the real RaplMeter). Their
dynamic CPU energy must be in the ratio the kernel counted within 3 %, the consumers must sum to
the host energy within 0.1 %, and both appear as kind="unit" series for the exporter.
"""

from __future__ import annotations

import math
import time

import pytest

from carbond.attribution import Policy, TickInput, attribute
from carbond.exporter.series import ConsumerSeries
from carbond.meters.rapl import RaplMeter
from carbond.pipeline.deltas import DeviceDeltas
from carbond.types import IDLE, Consumer
from carbond.workloads.cgroups import CgroupReader, cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from tests.cgroup_helpers import TestTree
from tests.helpers import wait_for
from tests.powercap import INTEL_DRAM_RANGE_UJ, FakePowercap

PACKAGE_WATTS, DRAM_WATTS, IDLE_WATTS = 45.0, 6.0, 12.0



def test_two_units_three_to_one(tree: TestTree, tmp_path) -> None:
    powercap = FakePowercap(str(tmp_path / "powercap"))
    package = powercap.add("intel-rapl:0", "package-0")
    dram = powercap.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
    meter = RaplMeter(str(tmp_path / "powercap"))

    for rel, duty in (("system.slice/a.service", 0.3), ("system.slice/b.service", 0.1)):
        tree.make(rel)
        tree.burners.start(duty, tree.procs(rel))
    assert wait_for(lambda: all(tree.usage_seconds(f"system.slice/{n}.service") > 0 for n in "ab"))

    collector = CpuUsageCollector(CgroupReader(cgroup_root(tree.root), CgroupNamer()))
    series = ConsumerSeries(max_consumers=10)

    totals = DeviceDeltas()
    totals.deltas(meter.read().devices)
    assert collector.tick().baseline
    k0 = {n: tree.usage_seconds(f"system.slice/{n}.service") for n in "ab"}
    started = time.monotonic()
    time.sleep(4.0)
    dt = time.monotonic() - started
    package.advance_uj(round(PACKAGE_WATTS * dt * 1e6))
    dram.advance_uj(round(DRAM_WATTS * dt * 1e6))
    usage = collector.tick()
    k1 = {n: tree.usage_seconds(f"system.slice/{n}.service") for n in "ab"}
    deltas = totals.deltas(meter.read().devices)

    result = attribute(TickInput(dt, deltas, usage.usage, measured=meter.components(),
                                 cpu_idle_watts=IDLE_WATTS), Policy())
    cpu = {c: parts.get("cpu", 0.0) for c, parts in result.energy.items()}
    mem = {c: parts.get("dram", 0.0) for c, parts in result.energy.items()}
    a, b = Consumer("unit", "a.service"), Consumer("unit", "b.service")

    kernel_ratio = (k1["a"] - k0["a"]) / (k1["b"] - k0["b"])
    assert 2.0 < kernel_ratio < 4.5  # the burners did run at about 3:1
    assert cpu[a] / cpu[b] == pytest.approx(kernel_ratio, rel=0.03)
    assert math.fsum(cpu.values()) == pytest.approx(PACKAGE_WATTS * dt, rel=1e-3)
    assert math.fsum(mem.values()) == pytest.approx(DRAM_WATTS * dt, rel=1e-3)
    assert math.isclose(math.fsum(cpu.values()) + math.fsum(mem.values()), result.host_joules,
                        rel_tol=1e-9)  # in fact exact
    assert cpu[IDLE] == pytest.approx(IDLE_WATTS * dt, rel=1e-9)

    series.update(result.energy, dt)
    exported = {(s.consumer.kind, s.consumer.name, s.component) for s in series.samples()}
    for name in ("a.service", "b.service"):
        assert ("unit", name, "cpu") in exported and ("unit", name, "dram") in exported
