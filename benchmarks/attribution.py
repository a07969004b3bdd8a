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
import secrets
import statistics
import subprocess
import sys
import time

from carbond.workloads.cgroups import (
    CgroupReader,
    CpuUsageCollector,
    cgroup_root,
    detect_cgroup_root,
)
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker, read_pids

UNIFIED = "/sys/fs/cgroup/unified"


def read_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        pass


def cpu_ms(fn, ticks: int) -> float:
    samples = []
    for _ in range(ticks):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples)


def spawn_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "3600"]) for _ in range(count)]


def report(name: str, ours: float, floor: float) -> None:
    print(f"{name:44s} carbond {ours:8.3f} ms  floor {floor:8.3f} ms  ratio {ours / floor:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--cgroups", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.isfile(f"{UNIFIED}/cpu.stat"):
        print("needs root and the cgroup v2 tree at", UNIFIED, file=sys.stderr)
        return 2

    bench = f"{UNIFIED}/carbond-bench-{secrets.token_hex(4)}"
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        # 1: processes spread over cgroups
        for i in range(args.cgroups):
            path = f"{bench}/system.slice/bench-{i}.service"
            os.makedirs(path)
            made.append(path)
        procs = spawn_sleepers(args.processes)
        for i, proc in enumerate(procs):
            with open(f"{made[i % len(made)]}/cgroup.procs", "w") as f:
                f.write(str(proc.pid))
        root = cgroup_root(bench)
        reader = CgroupReader(root, CgroupNamer())
        reader.tick()
        files = [f"{d}/cpu.stat" for d in (bench, f"{bench}/system.slice", *made)]
        ours = cpu_ms(reader.tick, args.ticks)
        floor = cpu_ms(lambda: [read_file(p) for p in files], args.ticks)
        reader.close()
        report(f"{args.processes} procs in {args.cgroups} cgroups", ours, floor)

        # 2: the same processes in the root cgroup, tracked per process
        for proc in procs:
            with open(f"{UNIFIED}/cgroup.procs", "w") as f:
                f.write(str(proc.pid))
        host = detect_cgroup_root()
        collector = CpuUsageCollector(
            CgroupReader(host, CgroupNamer(), track_short_lived=False), ProcessTracker()
        )
        collector.tick()
        pids = read_pids(host.procs_file)
        cg_files = [f"{dirpath}/cpu.stat" for dirpath, _, _ in os.walk(host.path)]

        def bare() -> None:
            for path in cg_files:
                read_file(path)
            for pid in read_pids(host.procs_file):
                read_file(f"/proc/{pid}/stat")

        ours = cpu_ms(collector.tick, args.ticks)
        floor = cpu_ms(bare, args.ticks)
        collector.close()
        report(f"{len(pids)} procs in the root cgroup ({len(cg_files)} cgroups)", ours, floor)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        for directory, _, _ in sorted(os.walk(bench), key=lambda t: len(t[0]), reverse=True):
            os.rmdir(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
