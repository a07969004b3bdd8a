"""Shared setup for the benchmarks: a throw-away cgroup v2 subtree with real processes in it.

Everything made here is recorded on the `BenchHost` and undone by `close()` (processes killed
and reaped, cgroups removed deepest first, temp dirs deleted), which leaving a `with BenchHost()`
block calls, so Ctrl-C or a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time

from tests.cgroup_helpers import remove_tree

# The v2 hierarchy: the unified tree on a hybrid host, else /sys/fs/cgroup itself.
UNIFIED = (
    "/sys/fs/cgroup/unified"
    if os.path.isfile("/sys/fs/cgroup/unified/cpu.stat")
    else "/sys/fs/cgroup"
)

SPINNER_C = r"""
#include <time.h>
/* Sleeps, and wakes every 200 ms for a few microseconds of CPU: a consumer with nonzero
   usage every tick, at almost no load. */
int main(void) {
    struct timespec pause = {0, 200000000};
    for (;;) {
        for (volatile unsigned i = 0; i < 20000; i++) {}
        nanosleep(&pause, 0);
    }
}
"""


def read_file(path: str) -> None:
    """One bare read of a small kernel file, the way carbond reads counters."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        pass


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a whole process (all threads, exited ones too) with ns resolution.

    /proc/PID/stat counts in clock ticks (10 ms), coarser than one tick's work, so this reads
    the process's CPU clock (Linux MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)) instead.
    """
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def can_run() -> str | None:
    """Why the benchmarks can't run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it creates cgroups)"
    if not os.path.isfile(f"{UNIFIED}/cgroup.procs") or not os.path.isfile(
        f"{UNIFIED}/cpu.stat"
    ):
        return "needs a cgroup v2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    return None


class BenchHost:
    """A cgroup v2 subtree `root` (under the unified hierarchy) plus processes and temp dirs."""

    def __init__(self, parent: str = UNIFIED) -> None:
        self.root = f"{parent}/carbond-bench-{secrets.token_hex(4)}"
        os.mkdir(self.root)
        self.cgroups: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = tempfile.mkdtemp(prefix="carbond-bench-")

    def make_cgroups(self, count: int, pattern: str = "system.slice/bench-{i}.service") -> None:
        for i in range(count):
            path = f"{self.root}/{pattern.format(i=i)}"
            os.makedirs(path)
            self.cgroups.append(path)

    def spawn(self, argv: list[str], count: int, cgroups: list[str] | None = None) -> None:
        """`count` copies of argv, round-robin over `cgroups` (None: the subtree's root)."""
        targets = cgroups or [self.root]
        for i in range(count):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            self.move(proc.pid, targets[i % len(targets)])

    def spawn_sleepers(self, count: int, cgroups: list[str] | None = None) -> None:
        self.spawn(["sleep", "86400"], count, cgroups)

    def spinner(self) -> str:
        """Path of the compiled low-duty spinner (gcc)."""
        source, binary = f"{self.tmp}/spin.c", f"{self.tmp}/spin"
        if not os.path.exists(binary):
            with open(source, "w") as f:
                f.write(SPINNER_C)
            subprocess.run(["gcc", "-O0", "-o", binary, source], check=True)
        return binary

    @staticmethod
    def move(pid: int, cgroup: str) -> None:
        with open(f"{cgroup}/cgroup.procs", "w") as f:
            f.write(str(pid))

    def counter_files(self) -> list[str]:
        """cpu.stat of every cgroup in the subtree: what a walk must read each tick."""
        return [f"{d}/cpu.stat" for d, _, _ in os.walk(self.root)]

    def kill_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> BenchHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.kill_processes()
        remove_tree(self.root, timeout=10.0)
        shutil.rmtree(self.tmp, ignore_errors=True)
