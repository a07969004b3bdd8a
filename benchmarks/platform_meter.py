"""What a Redfish platform meter costs on the tick path (issue 22: at most 5 % of tick CPU).

Run: .venv/bin/python benchmarks/platform_meter.py [--rounds 300] [--interval 1] [--cgroups 100]

Two in-process daemons tick alternately on the same fake two-socket Intel powercap tree: one
with the RAPL meter only, one with RAPL and a Redfish meter polling a stand-in BMC over TLS on
127.0.0.1 (tests/fakes/redfish_server.py) on its own thread every `--interval` seconds. The
tick reads the Redfish meter's last integrated value (no network) and attributes the rest of
the node as component `platform`. With `--cgroups N` (root, cgroup v2) both daemons also
read a throw-away subtree of N cgroups, each with a process that uses a little CPU every
tick, so the rest is split over N consumers as on a real host. Prints medians of the tick
thread's CPU time for both, the difference and its ratio; then what one poll costs on the
poller's thread (TLS, HTTP, JSON: off the tick path) and the tick's read() while the BMC
hangs. Needs the openssl CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._host import BenchHost, can_run
from carbond.carbon.providers.base import Secret
from carbond.commands.build import build_daemon, build_meters
from carbond.config import Config
from carbond.daemon import Daemon
from carbond.meters.base import DeviceReport, MeterReading
from carbond.meters.redfish import RedfishMeter
from carbond.meters.redfish_client import RedfishClient
from carbond.workloads.cgroups import CgroupReader, cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from tests import powercap
from tests.fakes.redfish_server import PASSWORD, USERNAME, FakeBmc, Load


def certificate(directory: str) -> tuple[str, str]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=bmc",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


class Unattributed:
    """A Redfish meter whose device carries another source, so attribution leaves it out
    (exported only): the meter's own cost on the tick, without attributing the rest."""

    name = "redfish-unattributed"

    def __init__(self, meter: RedfishMeter) -> None:
        self.meter = meter

    @property
    def errors_total(self) -> int:
        return self.meter.errors_total

    def read(self) -> MeterReading:
        reading = self.meter.read()
        reading.devices = [dataclasses.replace(d, source="bench") for d in reading.devices]
        return reading

    def up(self) -> bool:
        return self.meter.up()

    def components(self) -> frozenset[str]:
        return frozenset()  # its device is exported only

    def report(self) -> list[DeviceReport]:
        return self.meter.report()

    def close(self) -> None:
        self.meter.close()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--interval", type=float, default=1.0, help="Redfish poll seconds")
    parser.add_argument("--cgroups", type=int, default=0, help="consumers (needs root)")
    args = parser.parse_args()
    if args.cgroups and can_run():
        print(can_run(), file=sys.stderr)
        sys.exit(2)
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(BenchHost()) if args.cgroups else None
        if host is not None:
            host.make_cgroups(args.cgroups)
            host.spawn([host.spinner()], args.cgroups, host.cgroups)
        run(args, host)


def usage(host: BenchHost | None) -> CpuUsageCollector | None:
    if host is None:
        return None
    return CpuUsageCollector(CgroupReader(cgroup_root(host.root), CgroupNamer()))


def run(args: argparse.Namespace, host: BenchHost | None) -> None:
    root = tempfile.mkdtemp(prefix="carbond-bench-platform-")
    bmc = None
    try:
        cert, key = certificate(root)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        steps = [(time.monotonic() + 0.5 * i, 900.0 + (i * 37) % 200) for i in range(20000)]
        bmc = FakeBmc(time.monotonic, variant="counter", load=Load(steps)).start(tls)
        tree = powercap.intel_two_socket(os.path.join(root, "powercap"))
        config = Config(powercap_root=tree.root)
        runners = []

        def daemon_of(meters: list, cpu: CpuUsageCollector | None) -> Daemon:
            daemon, runner = build_daemon(config, meters=meters, cpu=cpu, feed=None, ledger=None)
            runner.start()
            runners.append(runner)
            return daemon

        plain = daemon_of(build_meters(config), usage(host))
        client = RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD), ca_file=cert)
        redfish = RedfishMeter(client, interval_seconds=args.interval,
                               stale_after_seconds=max(60.0, 6 * args.interval))
        with_platform = daemon_of([*build_meters(config), redfish], usage(host))
        shadow = RedfishMeter(RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD),
                                            ca_file=cert), interval_seconds=args.interval,
                              stale_after_seconds=max(60.0, 6 * args.interval))
        read_only = daemon_of([*build_meters(config), Unattributed(shadow)], usage(host))
        deadline = time.monotonic() + 30
        while not (redfish.read().devices and shadow.read().devices) and (
                time.monotonic() < deadline):
            time.sleep(0.05)

        ticks: dict[str, list[float]] = {"rapl": [], "rapl+redfish": [], "read only": []}
        platform_ticks = 0
        daemons = [("rapl", plain), ("rapl+redfish", with_platform), ("read only", read_only)]
        for round_number in range(args.rounds):
            for zone in tree.zones.values():
                zone.advance_uj(1_000_000)
            # rotate which daemon ticks first: the first after the files changed pays for
            # what the others then find warm
            shift = round_number % len(daemons)
            for name, daemon in daemons[shift:] + daemons[:shift]:
                start = time.thread_time()
                snapshot = daemon.tick()
                ticks[name].append(time.thread_time() - start)
                if name == "rapl+redfish" and any(d.source == "redfish" and d.watts > 0
                                          for d in snapshot.devices):
                    platform_ticks += 1
            time.sleep(0.01)  # let the poller run now and then, as between real ticks
        base, extra = median_ms(ticks["rapl"]), median_ms(ticks["rapl+redfish"])
        meter_only = median_ms(ticks["read only"])
        consumers = len({s.consumer for s in snapshot.consumers})
        print(f"{args.rounds} ticks each, {consumers} consumers, Redfish polled every "
              f"{args.interval:g} s over TLS ({redfish.polls_total} polls, {platform_ticks} "
              "ticks with platform energy)")
        print(f"tick CPU median, RAPL only       {base:.3f} ms")
        print(f"tick CPU median, RAPL + Redfish  {extra:.3f} ms")
        print(f"added by the Redfish meter        {extra - base:+.3f} ms "
              f"({(extra - base) / base * 100:+.1f} % of the tick)")
        print(f"  of which the meter alone (read, hand-off, one more device series, rest not "
              f"attributed) {meter_only - base:+.3f} ms ({(meter_only - base) / base * 100:+.1f} "
              f"%), attributing the rest to every consumer {extra - meter_only:+.3f} ms")

        reads = []
        for _ in range(2000):
            start = time.thread_time()
            redfish.read()
            reads.append(time.thread_time() - start)
        print(f"RedfishMeter.read() CPU median    {median_ms(reads) * 1e3:.1f} us")

        probe = RedfishMeter(RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD),
                                           ca_file=cert), start_poller=False)
        polls, walls = [], []
        for _ in range(50):
            start, wall = time.thread_time(), time.monotonic()
            probe.poll()
            polls.append(time.thread_time() - start)
            walls.append(time.monotonic() - wall)
        print(f"one poll (poller thread, off the tick path): CPU median {median_ms(polls):.2f} "
              f"ms, wall median {median_ms(walls):.2f} ms (session reused)")

        bmc.mode = "hang"
        hung = threading.Thread(target=probe.poll, daemon=True)
        hung.start()
        time.sleep(0.2)
        hung_reads = []
        for _ in range(2000):
            start = time.thread_time()
            probe.read()
            hung_reads.append(time.thread_time() - start)
        print(f"read() while the BMC hangs: CPU median {median_ms(hung_reads) * 1e3:.1f} us")
        hung.join(10)
        for runner in runners:
            runner.stop()  # closes the meters
        probe.close()
    finally:
        if bmc is not None:
            bmc.stop()
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
