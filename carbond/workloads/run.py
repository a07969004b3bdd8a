"""CPU seconds of one run (`carbond exec`'s cgroup) against everything else on the host: the
CPU source of the pipeline when exec measures on its own, with two consumers.

The host's total is counted as the daemon counts the sum of its consumers: the cgroup root's
counter, the exact v1 cpuacct root instead of the sampled v2 root where a hybrid host has both,
and /proc/stat's irq time added for a system-wide root where the kernel keeps it out of task
time (`cpu.CpuUsageCollector`, docs/cpu-accounting.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from carbond.types import OTHER, Consumer
from carbond.workloads.cgroups import V1, V2, CgroupRoot, read_counter
from carbond.workloads.cpu import CpuUsage, host_cpuacct_root, irq_seconds, irq_time_apart
from carbond.workloads.kernfiles import mount_fstype


def _is_kernel_root(root: CgroupRoot) -> bool:
    """A hierarchy's true root, not a sub-tree: only a v1 root has release_agent, only a v2
    root lacks cgroup.events."""
    if root.hierarchy == V1:
        return os.path.isfile(os.path.join(root.path, "release_agent"))
    return not os.path.exists(os.path.join(root.path, "cgroup.events"))


class HostCpu:
    """The host's cumulative CPU seconds, counted as the daemon counts its consumers' sum."""

    def __init__(self, root: CgroupRoot, proc_root: str = "/proc") -> None:
        kernel_root = _is_kernel_root(root)
        system_wide = (root.rel == "/" and kernel_root
                       and mount_fstype(root.path, proc_root) in ("cgroup", "cgroup2"))
        exact = root.hierarchy == V1 or not kernel_root
        self._read: Callable[[], float | None]
        path = os.path.join(root.path, root.usage_file)
        cpuacct = host_cpuacct_root(proc_root) if (not exact and system_wide) else None
        if cpuacct:
            self._read = lambda: read_counter(f"{cpuacct}/cpuacct.usage", False)
            exact = True
        else:
            self._read = lambda: read_counter(path, root.hierarchy == V2)
        stat_file = os.path.join(proc_root, "stat")
        irq = system_wide and exact and irq_time_apart(proc_root)
        self._irq_read: Callable[[], float | None] = (
            (lambda: irq_seconds(stat_file)) if irq else (lambda: 0.0))

    def read(self) -> float | None:
        value = self._read()
        if value is None:
            return None
        return value + (self._irq_read() or 0.0)


class _Delta:
    """Growth of a cumulative reading between calls; None when unreadable or first."""

    def __init__(self, read: Callable[[], float | None]) -> None:
        self._read = read
        self._last: float | None = None

    def __call__(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now if now is not None else self._last
        return None if now is None or last is None else max(0.0, now - last)


class RunUsage:
    """Per tick: the run's CPU seconds, and the host's others as `other`."""

    def __init__(self, run: Consumer, run_cpu_seconds: Callable[[], float | None],
                 root: CgroupRoot, proc_root: str = "/proc") -> None:
        self.run = run
        self._run = _Delta(run_cpu_seconds)
        self._host = _Delta(HostCpu(root, proc_root).read)

    def tick(self) -> CpuUsage:
        run_cpu = self._run()
        host_cpu = self._host()
        baseline = run_cpu is None and host_cpu is None
        usage = {self.run: run_cpu or 0.0}
        if host_cpu is not None:
            usage[OTHER] = max(0.0, host_cpu - (run_cpu or 0.0))
        return CpuUsage(usage, baseline=baseline)

    def close(self) -> None:
        pass
