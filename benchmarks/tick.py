"""CPU time per tick and per scrape on a fake two-socket Intel powercap tree.

Run: .venv/bin/python benchmarks/tick.py [--rounds 100]
Prints medians of thread CPU time (the tick and the scrape each run on one thread).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from carbond.commands.build import build_daemon, build_meters
from carbond.config import Config
from carbond.exporter.collectors import SnapshotCollectors
from tests import powercap


def cpu_seconds(action, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        action()
        samples.append(time.thread_time() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="carbond-bench-")
    try:
        tree = powercap.intel_two_socket(root)
        config = Config(powercap_root=root)
        daemon, runner = build_daemon(config, meters=build_meters(config), cpu=None, feed=None,
                                      ledger=None)
        runner.start()

        ticks = []
        for _ in range(args.rounds):
            for zone in tree.zones.values():
                zone.advance_uj(1_000_000)
            start = time.thread_time()
            daemon.tick()
            ticks.append(time.thread_time() - start)
        registry = CollectorRegistry(auto_describe=False)
        for collector in (SnapshotCollectors(daemon.latest()), ProcessCollector(registry=None),
                          PlatformCollector(registry=None)):
            registry.register(collector)  # what /metrics renders
        scrapes = cpu_seconds(lambda: generate_latest(registry), args.rounds)
        runner.stop()
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"two-socket Intel tree, {len(tree.zones)} zones, {args.rounds} rounds")
        print(f"tick   CPU median {statistics.median(ticks) * 1e3:.3f} ms")
        print(f"scrape CPU median {statistics.median(scrapes) * 1e3:.3f} ms")
        print(f"max RSS {rss_mib:.1f} MiB")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
