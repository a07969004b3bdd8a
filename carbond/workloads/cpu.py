"""CPU seconds per consumer for one tick: cgroups, root-cgroup processes and their exits.

The cgroup walk (`cgroups.py`) covers every non-root cgroup exactly; where user tasks live in
the root cgroup, `processes.py` splits the root's own time per process and `taskstats.py`
brings the final time of tasks that exited between ticks.

How much the root's own time is (issue 10; figures in docs/cpu-accounting.md). Per-process
times (/proc/PID/stat, taskstats), v1 `cpuacct.usage` of any cgroup and v2 `cpu.stat` of every
non-root cgroup all follow the scheduler's runtime, charged per ns in update_curr. The v2 ROOT's
`usage_usec` does not: the kernel sums kcpustat there (root_cgroup_cputime: user, nice,
system, irq, softirq, steal), which charges a whole tick to whatever runs when the tick fires.
It misses bursts shorter than a tick on CPUs that are otherwise idle (the tick is stopped),
counts steal, and the root's own time derived from it (root total minus the exact children)
carries the whole machine's sampling error. Measured on a 2-vCPU VM against the v1 cpuacct root
(exact): the v2 root was up to 2.4 % low over 2-minute runs and down to 54 % low in a quiet
5 s tick, while the per-process side stacked on it (with faults since fixed in taskstats.py and
processes.py) handed out 0.1-6.5 % more than the kernel ran over a run and up to 22 % (2.2 s)
more in one tick, diluting every other consumer's share.

So the root's share comes from an exact count wherever the host has one: walking v1, the
root's own cpuacct time; walking a v2 sub-tree, its rstat counter; walking the whole v2 tree on a
hybrid host, the v1 cpuacct root (every task, exact) minus the v2 children. Where the kernel
keeps irq time out of task runtime (IRQ_TIME_ACCOUNTING), /proc/stat's irq and softirq time is
added for a system-wide root. Against an exact count the root's share sums to exactly that count
(`split_root`). Only a pure v2 host has just the sampled counter; there the per-process times
are the more exact side and are never scaled down to it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from carbond.types import Consumer
from carbond.workloads.cgroups import V1, CgroupReader
from carbond.workloads.kernfiles import mount_fstype, read_head, read_mountinfo
from carbond.workloads.naming import ROOT_CONSUMER
from carbond.workloads.processes import ProcessTracker, read_pids
from carbond.workloads.taskstats import TaskExit

# The v2 root's own CPU time is tick-sampled; exact task times can exceed it over a short
# interval (seen: 15 % with a hundred exits a second elsewhere) without anything being counted
# twice. Against it, the cap on guessed exits only has to stop gross double counts.
ROOT_SAMPLING_TOLERANCE = 0.25

AUTO = "auto"


@dataclass(frozen=True)
class RootSplit:
    """How one tick's root-cgroup own time is handed out."""

    certain_scale: float  # for the per-process times that surely ran in the root
    guessed_scale: float  # for exits that are root-cgroup tasks only by a guess
    left_cpu_seconds: float  # the rest: the root's vanished children, else cgroup "/"


def split_root(root_own: float, certain: float, guessed: float, exact: bool) -> RootSplit:
    """Share the root's own CPU seconds between processes, guessed exits and the rest.

    Exact count: the shares sum to it. Certain times come first (scaled down together only
    when their clock-tick rounding and exit estimates exceed it), then guesses, capped by what
    is left, then the rest. Sampled count: certain times are never scaled (they are the exact
    side), guesses may reach `ROOT_SAMPLING_TOLERANCE` above it, and the rest is what the
    counter has beyond the claims.
    """
    root_own, certain, guessed = max(0.0, root_own), max(0.0, certain), max(0.0, guessed)
    if exact and certain > root_own:
        return RootSplit(root_own / certain, 0.0, 0.0)
    ceiling = root_own if exact else root_own * (1.0 + ROOT_SAMPLING_TOLERANCE)
    room = max(0.0, ceiling - certain)
    guessed_scale = min(1.0, room / guessed) if guessed > 0 else 0.0
    left = max(0.0, root_own - certain - guessed * guessed_scale)
    return RootSplit(1.0, guessed_scale, left)


def host_cpuacct_root(proc_root: str = "/proc") -> str | None:
    """The host's v1 cpuacct hierarchy root, if mounted (only a true root has
    `release_agent`: a cgroup-namespaced mount shows a sub-tree as ``/``)."""
    for mount in read_mountinfo(proc_root):
        if mount.fstype != "cgroup" or mount.root != "/" or "cpuacct" not in mount.super_options:
            continue
        point = mount.mount_point
        if os.path.isfile(f"{point}/cpuacct.usage") and os.path.isfile(f"{point}/release_agent"):
            return point
    return None


def irq_time_apart(proc_root: str = "/proc", boot_dir: str = "/boot") -> bool:
    """Whether task runtime leaves irq time out (CONFIG_IRQ_TIME_ACCOUNTING, not disabled with
    tsc=noirqtime); False when the kernel's config can't be read."""
    try:
        with gzip.open(os.path.join(proc_root, "config.gz"), "rt", errors="replace") as f:
            text = f.read()
    except (OSError, EOFError, zlib.error):
        try:
            boot_config = os.path.join(boot_dir, f"config-{os.uname().release}")
            with open(boot_config, errors="replace") as f:
                text = f.read()
        except OSError:
            return False
    if "\nCONFIG_IRQ_TIME_ACCOUNTING=y" not in "\n" + text:
        return False
    try:
        with open(os.path.join(proc_root, "cmdline"), errors="replace") as f:
            return "noirqtime" not in f.read()
    except OSError:
        return True


def irq_seconds(stat_file: str) -> float | None:
    """/proc/stat's irq + softirq time, all CPUs, in seconds."""
    data = read_head(stat_file, 256)
    if data is None:
        return None
    try:
        fields = data.split(b"\n", 1)[0].split()
        return (int(fields[6]) + int(fields[7])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


class _Delta:
    """Growth of one cumulative counter between reads (None: unreadable, or the first read)."""

    def __init__(self, read: Callable[[], float | None]) -> None:
        self.read = read
        self.last: float | None = None

    def __call__(self) -> float | None:
        now = self.read()
        last, self.last = self.last, now
        return None if now is None or last is None else max(0.0, now - last)


class ExitSource(Protocol):
    """Where exit records come from: a `TaskstatsListener`."""

    def drain(self) -> list[TaskExit]: ...

    def stop(self) -> None: ...


@dataclass
class CpuUsage:
    """What the daemon feeds `attribution.split_energy` each tick."""

    usage: dict[Consumer, float]  # CPU seconds this tick, every consumer (root time included)
    exited_tasks: int = 0  # process exits seen by taskstats this tick (all cgroups)
    baseline: bool = False  # first tick: counters primed, usage all zero
    cgroups: int = 0
    processes: int = 0
    details: dict[str, float] = field(default_factory=dict)


class CpuUsageCollector:
    """Cgroups + root-cgroup processes + exited tasks -> CPU seconds per consumer, per tick.

    Root-cgroup time is split across processes (by comm) when a `ProcessTracker` is given;
    what no process claims (kernel, irq, lost exits) goes to ``cgroup "/"``. Exits whose
    cgroup could only be guessed are capped to the root's unexplained time, so a wrong guess
    can't inflate the total beyond what the kernel counted.

    `host_cpuacct`: the v1 cpuacct root used as the exact count when the whole v2 tree is
    walked (AUTO: found in mountinfo; None: use the v2 root's sampled counter). `irq_apart`:
    whether to add /proc/stat's irq time to a system-wide root (None: from the kernel config).
    """

    def __init__(
        self,
        reader: CgroupReader,
        processes: ProcessTracker | None = None,
        exits: ExitSource | None = None,
        host_cpuacct: str | None = AUTO,
        irq_apart: bool | None = None,
        proc_root: str = "/proc",
    ) -> None:
        self.reader = reader
        self.processes = processes
        self.exits = exits
        root = reader.root
        kernel_root = _is_kernel_root(root.path, root.hierarchy)
        self.exact = root.hierarchy == V1 or not kernel_root
        # Host-wide counters only describe a real hierarchy's root (not a test's fake tree).
        system_wide = (
            root.rel == "/"
            and kernel_root
            and mount_fstype(root.path, proc_root) in ("cgroup", "cgroup2")
        )
        self._host: _Delta | None = None
        if not self.exact and system_wide:
            path = host_cpuacct_root(proc_root) if host_cpuacct == AUTO else host_cpuacct
            if path:
                self._host = _Delta(lambda: _read_ns(f"{path}/cpuacct.usage"))
        self._irq: _Delta | None = None
        if irq_apart is None:
            irq_apart = system_wide and irq_time_apart(proc_root)
        if irq_apart and (self.exact or self._host is not None):
            self._irq = _Delta(lambda: irq_seconds(os.path.join(proc_root, "stat")))

    def _root_own(self, cg_usage: dict[Consumer, float], sampled: float) -> tuple[float, bool]:
        """(the root's own CPU seconds this tick, whether that count is exact)."""
        exact, own = self.exact, sampled
        if self._host is not None:
            host = self._host()  # right after the walk: the children were read just before
            if host is not None:
                exact, own = True, max(0.0, host - math.fsum(cg_usage.values()))
        if self._irq is not None:
            irq = self._irq()
            own += irq or 0.0
        return own, exact

    def tick(self) -> CpuUsage:
        exits = self.exits.drain() if self.exits is not None else []
        cg = self.reader.tick()
        usage = dict(cg.usage)
        root_own, exact = self._root_own(cg.usage, cg.root_own_cpu_seconds)
        details = {
            "root_own_cpu_seconds": root_own,
            "root_sampled_cpu_seconds": cg.root_own_cpu_seconds,
            "root_exact": float(exact),
        }
        n_procs = 0
        claimed = 0.0
        if self.processes is not None:
            pids = read_pids(self.reader.root.procs_file)
            pt = self.processes.tick(pids, exits, self.reader.root.rel)
            n_procs = len(pids)
            certain = math.fsum(pt.usage.values())
            guessed = math.fsum(pt.guessed.values())
            split = split_root(root_own, certain, guessed, exact)
            for consumer, seconds in pt.usage.items():
                usage[consumer] = usage.get(consumer, 0.0) + seconds * split.certain_scale
            for consumer, seconds in pt.guessed.items():
                usage[consumer] = usage.get(consumer, 0.0) + seconds * split.guessed_scale
            claimed = certain * split.certain_scale + guessed * split.guessed_scale
            details.update(
                process_cpu_seconds=certain * split.certain_scale,
                guessed_cpu_seconds=guessed * split.guessed_scale,
                process_scale=split.certain_scale,
            )
        if not cg.baseline:
            left = max(0.0, root_own - claimed)
            owners = cg.root_vanished or (ROOT_CONSUMER,)
            for owner in owners:
                usage[owner] = usage.get(owner, 0.0) + left / len(owners)
        return CpuUsage(usage, len(exits), cg.baseline, cg.cgroups, n_procs, details)

    def close(self) -> None:
        self.reader.close()
        if self.processes is not None:
            self.processes.close()
        if self.exits is not None:
            self.exits.stop()


def _read_ns(path: str) -> float | None:
    data = read_head(path, 64)
    try:
        return None if data is None else int(data) / 1e9
    except ValueError:
        return None


def _is_kernel_root(path: str, hierarchy: str) -> bool:
    """Whether a cgroup directory is its hierarchy's true root, not a sub-tree (a cgroup
    namespace's root included): only a v1 root has release_agent, only a v2 root lacks
    cgroup.events. The v2 root's cpu.stat is kcpustat, sampled; every other counter is exact."""
    if hierarchy == V1:
        return os.path.isfile(os.path.join(path, "release_agent"))
    return not os.path.exists(os.path.join(path, "cgroup.events"))
