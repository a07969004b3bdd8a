"""CPU cost of one attribution tick, against the floor of just reading the same files.

Scenario 1: 1,000 sleeping processes in 100 cgroups (v2 unified tree, system.slice/NAME.service).
Scenario 2: 1,000 sleeping processes in the root cgroup (process mode: /proc/PID/stat each).
For each: median CPU time (thread time) per tick of carbond's collector over N ticks, and of a
bare loop that only reads the same cpu.stat / cgroup.procs / /proc/PID/stat files; their ratio.
Run as root:  .venv/bin/python benchmarks/attribution.py [--ticks 30]
Everything it creates (processes, cgroups) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._host import UNIFIED, BenchHost, can_run, read_file
from carbond.workloads.cgroups import CgroupReader, cgroup_root, detect_cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker, read_pids


def cpu_ms(fn, ticks: int) -> float:
    samples = []
    for _ in range(ticks):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples)


def report(name: str, ours: float, floor: float) -> None:
    print(f"{name:44s} carbond {ours:8.3f} ms  floor {floor:8.3f} ms  ratio {ours / floor:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--cgroups", type=int, default=100)
    args = parser.parse_args()
    problem = can_run()
    if problem:
        print(problem, file=sys.stderr)
        return 2

    with BenchHost() as host:
        # 1: processes spread over cgroups
        host.make_cgroups(args.cgroups)
        host.spawn_sleepers(args.processes, host.cgroups)
        root = cgroup_root(host.root)
        reader = CgroupReader(root, CgroupNamer())
        reader.tick()
        files = host.counter_files()
        ours = cpu_ms(reader.tick, args.ticks)
        floor = cpu_ms(lambda: [read_file(p) for p in files], args.ticks)
        reader.close()
        report(f"{args.processes} procs in {args.cgroups} cgroups", ours, floor)

        # 2: the same processes in the root cgroup, tracked per process
        for proc in host.procs:
            host.move(proc.pid, UNIFIED)
        system = detect_cgroup_root()
        collector = CpuUsageCollector(
            CgroupReader(system, CgroupNamer(), track_short_lived=False), ProcessTracker()
        )
        collector.tick()
        pids = read_pids(system.procs_file)
        cg_files = [f"{dirpath}/cpu.stat" for dirpath, _, _ in os.walk(system.path)]

        def bare() -> None:
            for path in cg_files:
                read_file(path)
            for pid in read_pids(system.procs_file):
                read_file(f"/proc/{pid}/stat")

        ours = cpu_ms(collector.tick, args.ticks)
        floor = cpu_ms(bare, args.ticks)
        collector.close()
        report(f"{len(pids)} procs in the root cgroup ({len(cg_files)} cgroups)", ours, floor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
