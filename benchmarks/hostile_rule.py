"""The real `carbond run` with issue 21 item 1's hostile rules and names in place: tick interval
and SIGTERM exit time.

A private cgroup v2 subtree holds `rp-` + 40 x `a` + `!` (which `(a+)+$` takes exponential
time to reject with a backtracking engine) and a 1,000-character path ending in `.scope`
(cubic for `^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\\.scope$`), each with a process using a little CPU
every tick, so each is a consumer with energy. With both rules configured, carbond runs at
--interval for --ticks ticks: each tick's own wall-clock stamp
(carbond_last_tick_timestamp_seconds, polled) gives the intervals, printed against the
configured one (target: within 10 %). Then SIGTERM, and the time until the process has exited
(target: 2 s). Needs root and gcc; everything made is removed at the end.
Run:  .venv/bin/python benchmarks/hostile_rule.py [--interval 1s] [--ticks 30] [--no-rules]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import sys
import threading
import time

# The repository root in place of this directory: benchmarks/platform.py must not shadow the
# standard library's `platform` (prometheus_client imports it).
sys.path.remove(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._host import BenchHost, can_run
from benchmarks.overhead import Carbond, metric
from benchmarks.soak import draw
from carbond.config.units import parse_seconds

RULES = [
    {"match": "(a+)+$", "kind": "project", "name": "never"},
    {"match": r"^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\.scope$", "kind": "unit", "name": "{z}"},
]
CATASTROPHIC_NAME = "rp-" + "a" * 40 + "!"


def long_path() -> str:
    """Five nested directories (each name within NAME_MAX), 1,000 characters in all, the
    last with many dashes and ending in `.scope`."""
    parts = ["d" * 199, "e" * 199, "f" * 199, "h" * 199]
    last = "g-" * 60 + "x-y"
    last += "q" * (1000 - sum(len(p) + 1 for p in parts) - len(last) - len(".scope")) + ".scope"
    return "/".join([*parts, last])


def tick_stamps(carbond: Carbond, count: int) -> list[float]:
    """Wall-clock stamps of `count` successive ticks (carbond_last_tick_timestamp_seconds,
    polled five times an interval; a tick missed between two polls shows as a gap in the tick
    count, and the stamps restart after it)."""
    stamps: list[float] = []
    last_count = None
    while len(stamps) < count:
        text = carbond.scrape()
        ticks = metric(text, "carbond_tick_duration_seconds_count")
        stamp = metric(text, "carbond_last_tick_timestamp_seconds")
        if ticks != last_count and stamp:
            if last_count is not None and ticks is not None and ticks > last_count + 1:
                stamps = []  # polled too slowly for once: start the run again
            stamps.append(stamp)
            last_count = ticks
        time.sleep(carbond.interval / 5)
    return stamps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=parse_seconds, default=1.0)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--rules", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-rules: the same names without the rules, for comparison")
    args = parser.parse_args()
    problem = can_run()
    if problem:
        print(f"hostile_rule.py: {problem}", file=sys.stderr)
        return 2
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    with BenchHost() as host:
        for path in (f"{host.root}/{CATASTROPHIC_NAME}", f"{host.root}/{long_path()}"):
            os.makedirs(path)  # removed with the subtree
            host.cgroups.append(path)
        host.spawn([host.spinner()], 2, host.cgroups)
        rules = RULES if args.rules else []
        with Carbond(host, args.interval, {"processes": "off", "rules": rules}) as carbond:
            stop = threading.Event()
            power = threading.Thread(target=draw, args=(carbond, stop), daemon=True)
            power.start()
            stamps = tick_stamps(carbond, args.ticks + 1)
            text = carbond.scrape()
            named = sorted({line.split('consumer="', 1)[1].split('"', 1)[0]
                            for line in text.splitlines()
                            if line.startswith("carbond_consumer_energy_joules_total{")})
            sent = time.monotonic()
            carbond.proc.send_signal(signal.SIGTERM)
            code = carbond.proc.wait(timeout=30)
            exit_seconds = time.monotonic() - sent
            stop.set()
            power.join()
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    worst = max(abs(i - args.interval) for i in intervals) / args.interval
    shown = ', '.join(r['match'] for r in rules) or 'none'
    print(f"rules {shown}; cgroups {CATASTROPHIC_NAME} and a "
          f"{len(long_path())}-character path")
    print("consumers exported: " + ", ".join(n if len(n) < 50 else f"{n[:20]}...{n[-20:]}"
                                             for n in named))
    print(f"{len(intervals)} tick intervals at --interval {args.interval:g}s: min "
          f"{min(intervals):.3f} s, median {statistics.median(intervals):.3f} s, max "
          f"{max(intervals):.3f} s; worst {worst * 100:.1f}% off (target 10%)")
    print(f"SIGTERM to exit: {exit_seconds:.2f} s, exit status {code} (target 2 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
