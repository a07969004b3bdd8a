"""A Redfish platform meter in today's in-process Daemon (handed in with the meters, before the
builders and the exporter wire it): the host total is the BMC's while it works; when the BMC
hangs the ticks go on, the meter is down and the host falls back to its parts; what the ledger
recorded, the platform component included, survives a restart.

Issue 22's second "done when". One clock, simulated, drives the daemon, the RAPL meter, the
Redfish meter and the stand-in BMC, so each tick's energy is exact; the BMC's polls are made by
the test (the meter's thread is not started), the one that hangs on a thread of its own.
"""

from __future__ import annotations

import itertools
import math
import shutil
import threading

import pytest

from carbond.carbon.providers.base import Secret
from carbond.commands.build import build_daemon
from carbond.config import Config
from carbond.ledger.ledger import Ledger
from carbond.meters.rapl import RaplMeter
from carbond.meters.redfish import RedfishMeter
from carbond.meters.redfish_client import RedfishClient
from tests.fakes.redfish_server import (
    PASSWORD,
    USERNAME,
    FakeBmc,
    Load,
    make_certificate,
    server_context,
)
from tests.powercap import INTEL_DRAM_RANGE_UJ, FakePowercap

TICK_SECONDS = 5.0
PACKAGE_WATTS, DRAM_WATTS = 400.0, 50.0


class Clock:
    def __init__(self) -> None:
        self.now = 50_000.0

    def __call__(self) -> float:
        return self.now


def consumer_joules(snapshot) -> dict[str, float]:
    """Cumulative joules per component over all consumers."""
    totals: dict[str, float] = {}
    for sample in snapshot.consumers:
        totals[sample.component] = totals.get(sample.component, 0.0) + sample.joules_total
    return totals


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_the_bmc_is_the_host_total_and_a_hanging_one_falls_back_to_the_parts(tmp_path) -> None:
    (tmp_path / "tls").mkdir()
    certificate = make_certificate(tmp_path / "tls")
    tls = server_context(certificate)
    clock = Clock()
    steps = [(clock.now + 2.5 * i, 1000.0 + i % 3) for i in range(400)]  # never still
    bmc = FakeBmc(clock, variant="counter", load=Load(steps)).start(tls)
    try:
        powercap = FakePowercap(str(tmp_path / "powercap"))
        package = powercap.add("intel-rapl:0", "package-0")
        dram = powercap.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
        client = RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD),
                               timeout_seconds=1.0, ca_file=str(certificate[0]))
        redfish = RedfishMeter(client, interval_seconds=5.0, stale_after_seconds=60.0,
                               clock=clock, start_poller=False)
        config = Config(state_dir=str(tmp_path / "state"))
        ledger = Ledger.open(config.state_dir)
        daemon, runner = build_daemon(config, meters=[RaplMeter(powercap.root, clock=clock),
                                                      redfish],
                                      cpu=None, feed=None, ledger=ledger, clock=clock)
        runner.start()

        def tick(poll: bool = True):
            clock.now += TICK_SECONDS
            package.advance_uj(round(PACKAGE_WATTS * TICK_SECONDS * 1e6))
            dram.advance_uj(round(DRAM_WATTS * TICK_SECONDS * 1e6))
            if poll:
                redfish.poll()
            return daemon.tick()

        redfish.poll()
        snapshots = [tick() for _ in range(8)]
        for before, after in itertools.pairwise(snapshots[2:]):
            tick_joules = {c: consumer_joules(after).get(c, 0.0) - consumer_joules(before)
                           .get(c, 0.0) for c in ("cpu", "dram", "platform")}
            host = math.fsum(tick_joules.values())
            bmc_watts = next(d.watts for d in after.devices if d.source == "redfish")
            assert 1000.0 <= bmc_watts <= 1002.5
            assert host == pytest.approx(bmc_watts * TICK_SECONDS, rel=1e-9)
            assert tick_joules["platform"] == pytest.approx(
                (bmc_watts - PACKAGE_WATTS - DRAM_WATTS) * TICK_SECONDS, rel=1e-6)
        assert snapshots[-1].meters_up == {"rapl": True, "redfish": True}

        bmc.mode = "hang"  # the BMC stops answering; the poll waits for its deadline
        hung = threading.Thread(target=redfish.poll, daemon=True)
        hung.start()
        during: list = []

        def unpolled_tick(done: threading.Event) -> None:
            during.append(tick(poll=False))
            done.set()

        for _ in range(8):  # 40 s: past three polling intervals without a good poll
            done = threading.Event()
            threading.Thread(target=unpolled_tick, args=(done,), daemon=True).start()
            assert done.wait(30), "a tick waited on the hanging BMC"
        hung.join(30)
        assert not hung.is_alive() and "did not answer" in redfish.last_error
        last, previous = during[-1], during[-2]
        assert last.meters_up == {"rapl": True, "redfish": False}
        fallback = math.fsum(consumer_joules(last).values()) - math.fsum(
            consumer_joules(previous).values())
        assert fallback == pytest.approx((PACKAGE_WATTS + DRAM_WATTS) * TICK_SECONDS, rel=1e-9)
        assert consumer_joules(last)["platform"] == consumer_joules(previous)["platform"]
        last = tick(poll=False)  # the hung poll has ended: its error is counted
        assert last.meter_errors_total["redfish"] >= 1 and not last.meters_up["redfish"]

        recorded = consumer_joules(last)
        runner.stop()
        restored = Ledger.open(config.state_dir)
        try:
            totals: dict[str, float] = {}
            for parts in restored.restore().consumer_joules.values():
                for component, joules in parts.items():
                    totals[component] = totals.get(component, 0.0) + joules
        finally:
            restored.close()
        assert totals == pytest.approx(recorded, rel=1e-9)  # the platform component too
        assert totals["platform"] > 0
    finally:
        bmc.stop()
