"""The real `carbond run` with issue 21 item 1's hostile rules and names in place: tick interval
and SIGTERM exit time.

A private cgroup v2 subtree holds `rp-` + 40 x `a` + `!` (which `(a+)+$` takes exponential
time to reject with a backtracking engine) and a 1,000-character path ending in `.scope`
(cubic for `^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\\.scope$`), each with a process using a little CPU
every tick, so each is a consumer with energy. With both rules configured, carbond runs at
--interval for --ticks ticks: the start of every tick is found from its main thread's CPU
clock (it only runs to tick), and the intervals between them are printed against the
configured one (target: within 10 %). Then SIGTERM, and the time until the process has exited
(target: 2 s). Needs root and gcc; everything made is removed at the end.
Run:  .venv/bin/python benchmarks/hostile_rule.py [--interval 1s] [--ticks 30]
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
from benchmarks.overhead import Carbond
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=parse_seconds, default=1.0)
    parser.add_argument("--ticks", type=int, default=30)
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
        with Carbond(host, args.interval, {"processes": "off", "rules": RULES}) as carbond:
            stop = threading.Event()
            power = threading.Thread(target=draw, args=(carbond, stop), daemon=True)
            power.start()
            starts = [carbond.next_tick()]
            while len(starts) <= args.ticks:
                time.sleep(args.interval * 0.5)  # well inside the idle part of the interval
                starts.append(carbond.next_tick())
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
    intervals = [b - a for a, b in itertools.pairwise(starts)]
    worst = max(abs(i - args.interval) for i in intervals) / args.interval
    print(f"rules {', '.join(r['match'] for r in RULES)}; cgroups {CATASTROPHIC_NAME} and a "
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
