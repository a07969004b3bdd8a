"""CPU seconds carbond hands out per tick, against the kernel's own counters (issue 10, item 4).

Runs root-cgroup load (a spawner of short CPU bursts, about `--exits` exits a second, and
`--busy` multi-threaded processes that burn in short bursts and sleep in between) plus
`--cgroups` child cgroups with a bursty process each, and over `--ticks` ticks of `--interval`
seconds compares what `CpuUsageCollector` hands out with:

- v1 `cpuacct.usage` of the cpuacct root: every task's runtime, charged per ns from the
  scheduler's update_curr (system-wide, exact; irq time inside where the kernel has no
  IRQ_TIME_ACCOUNTING; steal outside): the reference;
- v2 root `cpu.stat` usage_usec: on the root cgroup the kernel sums kcpustat (user, nice,
  system, irq, softirq, steal), charged a whole tick at a time to whatever runs at the tick;
- /proc/stat, the same kcpustat figures in USER_HZ.

Each `--variant LABEL=DIR[:sampled]` is a carbond tree (DIR holds its `carbond/` package) run
in its own process on the same ticks, so before/after compare under the same load; `:sampled`
leaves out the v1 cpuacct root, as on a pure v2 host. The collector walks what carbond would
walk here (`--walk v2`: the unified tree of a hybrid host or /sys/fs/cgroup; `--walk v1`: the
cpuacct tree), with process tracking and taskstats. `--quiet` runs no load of its own.
Run as root (needs gcc and a v1 cpuacct hierarchy):
  .venv/bin/python benchmarks/reconcile.py [--ticks 24] [--interval 5] [--walk v2|v1]
      [--variant before=/tmp/base --variant after=. --variant after-sampled=.:sampled]
Everything it starts and creates is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.cgroup_helpers import remove_tree

CPUACCT = "/sys/fs/cgroup/cpuacct"
UNIFIED = (
    "/sys/fs/cgroup/unified"
    if os.path.isfile("/sys/fs/cgroup/unified/cpu.stat")
    else "/sys/fs/cgroup"
)
USER_HZ = os.sysconf("SC_CLK_TCK")

LOAD_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_now(clockid_t id) {
    struct timespec t; clock_gettime(id, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
static void burn(clockid_t id, double seconds) {
    double end = cpu_now(id) + seconds;
    while (cpu_now(id) < end) {}
}
static void nap(double seconds) {
    struct timespec t = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&t, 0);
}
static double uniform(unsigned *seed, double lo, double hi) {
    return lo + (hi - lo) * (rand_r(seed) / (double)RAND_MAX);
}
/* bursts: busy 0.2-3 ms of thread CPU, sleep 1-20 ms, forever */
static void *bursty(void *arg) {
    unsigned seed = (unsigned)(size_t)arg;
    for (;;) {
        burn(CLOCK_THREAD_CPUTIME_ID, uniform(&seed, 0.0002, 0.003));
        nap(uniform(&seed, 0.001, 0.020));
    }
    return 0;
}
int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "busy")) {          /* busy THREADS */
        int n = atoi(argv[2]);
        pthread_t t;
        for (int i = 1; i < n; i++)
            pthread_create(&t, 0, bursty, (void *)(size_t)(i * 7919 + getpid()));
        bursty((void *)(size_t)getpid());
    }
    if (argc >= 3 && !strcmp(argv[1], "once")) {          /* once MICROSECONDS */
        burn(CLOCK_PROCESS_CPUTIME_ID, atoi(argv[2]) / 1e6);
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "spawn")) {         /* spawn PER_SECOND SELF */
        double gap = 1.0 / atof(argv[2]);
        unsigned seed = (unsigned)getpid();
        char us[32];
        for (;;) {
            double started = cpu_now(CLOCK_MONOTONIC);
            snprintf(us, sizeof us, "%d", (int)uniform(&seed, 500, 8000));
            pid_t pid = fork();
            if (pid == 0) { execl(argv[3], "cb-once", "once", us, (char *)0); _exit(127); }
            waitpid(pid, 0, 0);
            double left = gap - (cpu_now(CLOCK_MONOTONIC) - started);
            if (left > 0) nap(left);
        }
    }
    return 2;
}
"""


@dataclass
class Refs:
    v1_root_seconds: float  # cpuacct.usage of the cpuacct root: exact task runtime
    v2_root_seconds: float  # cpu.stat usage_usec of the v2 root: kcpustat, tick-sampled
    procstat_seconds: float  # /proc/stat user+nice+system+irq+softirq+steal
    steal_seconds: float


def read_refs() -> Refs:
    with open(f"{CPUACCT}/cpuacct.usage") as f:
        v1 = int(f.read()) / 1e9
    with open(f"{UNIFIED}/cpu.stat") as f:
        v2 = int(f.readline().split()[1]) / 1e6
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return Refs(v1, v2, (user + nice + system + irq + softirq + steal) / USER_HZ,
                steal / USER_HZ)


def proc_times() -> dict[tuple[int, int], float]:
    """utime+stime of every process, keyed by (pid, starttime)."""
    out: dict[tuple[int, int], float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        out[(int(name), int(rest[19]))] = (int(rest[11]) + int(rest[12])) / USER_HZ
    return out


class Load:
    """The processes and cgroups of one run; `close()` kills, reaps and removes all of it."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="carbond-reconcile-")
        self.binary = os.path.join(self.tmp, "cb-load")
        with open(self.binary + ".c", "w") as f:
            f.write(LOAD_C)
        subprocess.run(["gcc", "-O1", "-pthread", "-o", self.binary, self.binary + ".c"],
                       check=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tops: list[str] = []

    def start(self, argv0: str, *args: str, cgroups: tuple[str, ...] = ()) -> None:
        proc = subprocess.Popen([argv0, *args], executable=self.binary,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        for cgroup in cgroups:
            with open(f"{cgroup}/cgroup.procs", "w") as f:
                f.write(str(proc.pid))

    def cgroup_pair(self, name: str) -> tuple[str, ...]:
        """The same child cgroup in the v2 tree and the v1 cpuacct tree."""
        if not self.tops:
            tag = f"carbond-reconcile-{secrets.token_hex(4)}"
            self.tops = [f"{UNIFIED}/{tag}", f"{CPUACCT}/{tag}"]
            for top in self.tops:
                os.mkdir(top)
        pair = tuple(f"{top}/{name}" for top in self.tops)
        for path in pair:
            os.mkdir(path)
        return pair

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        for top in self.tops:
            if os.path.isdir(top):
                remove_tree(top, timeout=10.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


def pct(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference if reference > 0 else math.nan


def measure(label: str, tree: str, mode: str, walk: str, ticks: int, interval: float,
            start_at: float) -> None:
    """One collector, from the carbond package in `tree`, ticking at start_at + k * interval;
    prints one JSON line per tick."""
    sys.path.insert(0, os.path.abspath(tree))
    for name in [m for m in sys.modules if m == "carbond" or m.startswith("carbond.")]:
        del sys.modules[name]
    cgroups = importlib.import_module("carbond.workloads.cgroups")
    cpu = importlib.import_module("carbond.workloads.cpu")
    naming = importlib.import_module("carbond.workloads.naming")
    processes = importlib.import_module("carbond.workloads.processes")
    taskstats = importlib.import_module("carbond.workloads.taskstats")
    if walk == "v2":
        root = cgroups.detect_cgroup_root()
    else:
        root = cgroups.CgroupRoot(CPUACCT, "v1", "v1", "/")
    listener = taskstats.TaskstatsListener(hierarchy=root.hierarchy)
    if not listener.start():
        raise SystemExit(listener.reason)
    extra = {"host_cpuacct": None} if mode == "sampled" else {}
    collector = cpu.CpuUsageCollector(cgroups.CgroupReader(root, naming.CgroupNamer()),
                                      processes.ProcessTracker(), listener, **extra)
    slash = naming.ROOT_CONSUMER
    try:
        time.sleep(max(0.0, start_at - time.monotonic()))
        # The counters are read just before each tick: the collector reads its own right
        # after its cgroup walk, a millisecond later, before it reads every /proc/PID/stat.
        refs = read_refs()
        collector.tick()
        procs = proc_times()
        for k in range(1, ticks + 1):
            time.sleep(max(0.0, start_at + k * interval - time.monotonic()))
            now = read_refs()
            usage = collector.tick()
            now_procs = proc_times()
            row = {
                "label": label,
                "carbond": math.fsum(usage.usage.values()),
                "v1": now.v1_root_seconds - refs.v1_root_seconds,
                "v2": now.v2_root_seconds - refs.v2_root_seconds,
                "procstat": now.procstat_seconds - refs.procstat_seconds,
                "steal": now.steal_seconds - refs.steal_seconds,
                "live": math.fsum(t - procs[p] for p, t in now_procs.items() if p in procs),
                "children": math.fsum(s for c, s in usage.usage.items()
                                      if c.kind != "process" and c != slash),
                "processes": usage.details.get("process_cpu_seconds", 0.0),
                "guessed": usage.details.get("guessed_cpu_seconds", 0.0),
                "slash": usage.usage.get(slash, 0.0),
                "exits": usage.exited_tasks,
            }
            refs, procs = now, now_procs
            print(json.dumps(row), flush=True)
    finally:
        collector.close()


def summary(label: str, rows: list[dict], key: str = "carbond") -> str:
    diffs = [pct(r[key], r["v1"]) for r in rows]
    over_run = pct(math.fsum(r[key] for r in rows), math.fsum(r["v1"] for r in rows))
    worst = max(diffs, key=abs)
    abs_worst = max(abs(r[key] - r["v1"]) for r in rows)
    return (f"{label:16s} {over_run:+7.2f}%   mean {statistics.fmean(diffs):+7.2f}%  mean|.| "
            f"{statistics.fmean(abs(d) for d in diffs):6.2f}%  worst {worst:+7.2f}% "
            f"({abs_worst * 1e3:5.0f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=24)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--walk", choices=("v2", "v1"), default="v2")
    parser.add_argument("--exits", type=float, default=35.0, help="root exits per second")
    parser.add_argument("--busy", type=int, default=2, help="multi-threaded root processes")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--cgroups", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no load of our own")
    parser.add_argument("--per-tick", action="store_true")
    parser.add_argument(
        "--variant", action="append", metavar="LABEL=DIR[:sampled]",
        help="a carbond tree to measure, all at once on the same ticks (default: this tree); "
        "':sampled' leaves out the v1 cpuacct root (as on a pure v2 host)")
    parser.add_argument("--measure", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        label, tree, mode, walk, ticks, interval, start_at = args.measure
        measure(label, tree, mode, walk, int(ticks), float(interval), float(start_at))
        return 0
    if os.geteuid() != 0 or not os.path.isfile(f"{CPUACCT}/cpuacct.usage"):
        print("needs root and a v1 cpuacct hierarchy at " + CPUACCT, file=sys.stderr)
        return 2

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    variants = []
    for spec in args.variant or [f"carbond={here}"]:
        label, _, rest = spec.partition("=")
        tree, _, mode = rest.partition(":")
        variants.append((label, tree, mode or "auto"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = Load()
    children: list[subprocess.Popen[str]] = []
    rows: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    try:
        if not args.quiet:
            for i in range(args.cgroups):
                load.start("cb-child", "busy", "2", cgroups=load.cgroup_pair(f"child-{i}"))
            for _ in range(args.busy):
                load.start("cb-busy", "busy", str(args.threads))
            if args.exits > 0:
                load.start("cb-spawn", "spawn", str(args.exits), load.binary)
        start_at = time.monotonic() + 3.0  # imports and the load settle first
        for i, (label, tree, mode) in enumerate(variants):
            children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--measure", label, tree, mode,
                 args.walk, str(args.ticks), str(args.interval), str(start_at + 0.01 * i)],
                stdout=subprocess.PIPE, text=True))
        for child in children:
            for line in child.stdout:  # type: ignore[union-attr]
                row = json.loads(line)
                rows[row["label"]].append(row)
                if args.per_tick:
                    r = row
                    print(f"{r['label']:14s} carbond {r['carbond']:7.3f}  v1 {r['v1']:7.3f} "
                          f"({pct(r['carbond'], r['v1']):+6.2f}%)  v2 {r['v2']:7.3f} "
                          f"({pct(r['v2'], r['v1']):+6.2f}%)  procs {r['processes']:6.3f}  "
                          f"guessed {r['guessed']:6.3f}  / {r['slash']:6.3f}  exits {r['exits']}")
            if child.wait() != 0:
                return 1
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        load.close()

    first = next(iter(rows.values()))
    v1_total = math.fsum(r["v1"] for r in first)
    print(f"walk {args.walk}, {args.ticks} ticks of {args.interval:g} s, "
          f"{'no load of its own' if args.quiet else 'loaded'}: {v1_total / len(first):.3f} "
          f"CPU s per tick (v1 cpuacct root, exact), "
          f"{sum(r['exits'] for r in first) / (args.ticks * args.interval):.1f} exits/s")
    print("total handed out vs v1 cpuacct: over the run, per tick mean, mean |diff|, worst")
    for label, got in rows.items():
        print(summary(label, got))
    print(summary("v2 root counter", first, "v2"))
    print(summary("/proc/stat", first, "procstat"))
    print(summary("sum /proc/PID", first, "live") + "  (processes alive at both ends only)")
    steal = math.fsum(r["steal"] for r in first)
    print(f"steal {steal:.3f} s ({100 * steal / v1_total:.2f}% of v1)")
    for label, got in rows.items():
        print(f"{label:16s} processes {math.fsum(r['processes'] for r in got):8.2f} s  guessed "
              f"{math.fsum(r['guessed'] for r in got):6.2f} s  cgroup / "
              f"{math.fsum(r['slash'] for r in got):6.2f} s  children "
              f"{math.fsum(r['children'] for r in got):7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
