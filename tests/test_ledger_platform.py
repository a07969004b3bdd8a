"""The platform component (the node beyond cpu + dram + gpu, from a platform meter) through
the ledger: stored in the consumers' hourly rows and the host's, priced into the grams budgets
count, shown by `carbond report`, and kept across a restart. One simulated clock drives the
in-process daemon, a fake RAPL tree and a fake ACPI power meter, so every figure is exact."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from carbond import config
from carbond.commands.build import build_daemon
from carbond.ledger.ledger import Ledger, aggregate, connect_readonly
from carbond.meters.acpi import AcpiMeter
from carbond.meters.rapl import RaplMeter
from tests.hwmon import FakeHwmon
from tests.powercap import INTEL_DRAM_RANGE_UJ, FakePowercap

TICK_SECONDS = 5.0
PLATFORM_WATTS, PACKAGE_WATTS, DRAM_WATTS = 1000.0, 400.0, 50.0
GRAMS_PER_KWH = 500.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_platform_energy_is_stored_budgeted_reported_and_restored(tmp_path) -> None:
    path = tmp_path / "carbond.yaml"
    intensity = f"{{providers: [{{constant: {{grams_per_kwh: {GRAMS_PER_KWH}}}}}]}}"
    path.write_text(f"intensity: {intensity}\n"
                    "budgets: [{name: node, period: month, limit: 1t}]\n")
    cfg = dataclasses.replace(config.load(str(path), {}), state_dir=str(tmp_path / "state"))
    hwmon = FakeHwmon(str(tmp_path / "hwmon"))
    hwmon.add(1, "power_meter", watts=PLATFORM_WATTS)
    powercap = FakePowercap(str(tmp_path / "powercap"))
    package = powercap.add("intel-rapl:0", "package-0")
    dram = powercap.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
    clock = Clock(50_000.0)
    wall = Clock(float(int(time.time() // 3600 * 3600) - 3600))  # the previous full hour
    acpi = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    daemon, runner = build_daemon(cfg, meters=[RaplMeter(powercap.root, clock=clock), acpi],
                                  cpu=None, clock=clock, wall_clock=wall)
    runner.start()
    ticks = 12
    try:
        acpi.sample()
        daemon.tick()  # the first tick primes the counters: no energy yet
        for _ in range(ticks):
            for _ in range(round(TICK_SECONDS)):  # the ACPI meter samples each second
                clock.now += 1.0
                acpi.sample()
            wall.now += TICK_SECONDS
            package.advance_uj(round(PACKAGE_WATTS * TICK_SECONDS * 1e6))
            dram.advance_uj(round(DRAM_WATTS * TICK_SECONDS * 1e6))
            snapshot = daemon.tick()
    finally:
        runner.stop()  # flushes the ledger
    seconds = ticks * TICK_SECONDS
    platform_joules = (PLATFORM_WATTS - PACKAGE_WATTS - DRAM_WATTS) * seconds
    node_joules = PLATFORM_WATTS * seconds

    conn = connect_readonly(cfg.state_dir)
    try:
        (_, usage), = aggregate(conn, wall.now - 2 * 3600, wall.now + 1, "kind")
        host = dict(conn.execute("SELECT component, SUM(joules) FROM host_hours"
                                 " GROUP BY component").fetchall())
    finally:
        conn.close()
    assert usage.platform_joules == pytest.approx(platform_joules, rel=1e-6)
    assert usage.joules == pytest.approx(node_joules, rel=1e-6)
    assert usage.grams == pytest.approx(node_joules / 3.6e6 * GRAMS_PER_KWH, rel=1e-6)
    assert host["platform"] == pytest.approx(node_joules, rel=1e-6)  # the meter's own series

    (budget,) = snapshot.budgets  # the budget counts the node's grams, the rest included
    assert budget.used_grams == pytest.approx(usage.grams, rel=1e-6)

    result = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir",
                             cfg.state_dir, "--since", "1d", "--by", "kind", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["total"]
    assert total["platform_joules"] == pytest.approx(platform_joules, rel=1e-6)
    assert total["joules"] == pytest.approx(node_joules, rel=1e-6)
    table = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir",
                            cfg.state_dir, "--since", "1d"], capture_output=True, text=True,
                           timeout=60)
    assert "PLATFORM" in table.stdout.splitlines()[1].split()  # the header's column
    page = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir",
                           cfg.state_dir, "--since", "1d", "--format", "html"],
                          capture_output=True, text=True, timeout=60)
    assert page.returncode == 0, page.stderr
    assert '<th class="wide" scope="col">Platform ' in page.stdout

    with Ledger.open(cfg.state_dir) as ledger:
        restored = ledger.restore()
    platform = sum(parts.get("platform", 0.0) for parts in restored.consumer_joules.values())
    assert platform == pytest.approx(platform_joules, rel=1e-6)
