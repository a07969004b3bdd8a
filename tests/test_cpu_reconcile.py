"""The root cgroup's share of CPU time sums to the kernel's exact count (issue 10, item 4).

`split_root` is the rule; the real-tree test checks that the collector the daemon builds
hands out, per tick, exactly what the v1 cpuacct root counted (every task's runtime, per ns),
with root-cgroup load, exits and a busy child cgroup running.
"""

from __future__ import annotations

import gzip
import math
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.types import Consumer
from carbond.workloads.cgroups import CgroupReader, cgroup_root
from carbond.workloads.cpu import (
    ROOT_SAMPLING_TOLERANCE,
    CpuUsageCollector,
    host_cpuacct_root,
    irq_time_apart,
    split_root,
)
from carbond.workloads.naming import ROOT_CONSUMER, CgroupNamer
from carbond.workloads.processes import ProcessTracker
from carbond.workloads.taskstats import TaskstatsListener, probe_taskstats
from tests.cgroup_helpers import CPUACCT, available, hierarchy_path

seconds = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)


@given(seconds, seconds, seconds)
def test_exact_count_is_handed_out_exactly(root_own: float, certain: float, guessed: float):
    split = split_root(root_own, certain, guessed, exact=True)
    assert 0.0 <= split.certain_scale <= 1.0 and 0.0 <= split.guessed_scale <= 1.0
    assert split.left_cpu_seconds >= 0.0
    handed = certain * split.certain_scale + guessed * split.guessed_scale
    assert math.isclose(handed + split.left_cpu_seconds, root_own, rel_tol=1e-9, abs_tol=1e-9)
    if certain <= root_own:
        assert split.certain_scale == 1.0  # exact per-process times are never cut to fit
    # guesses get what the certain times left, up to all of them
    room = max(0.0, root_own - certain)
    assert math.isclose(guessed * split.guessed_scale, min(guessed, room), abs_tol=1e-9)


@given(seconds, seconds, seconds)
def test_sampled_count_never_cuts_exact_times(root_own: float, certain: float, guessed: float):
    split = split_root(root_own, certain, guessed, exact=False)
    assert split.certain_scale == 1.0
    claimed = certain + guessed * split.guessed_scale
    ceiling = max(certain, root_own * (1.0 + ROOT_SAMPLING_TOLERANCE))
    assert claimed <= ceiling * (1 + 1e-9) + 1e-9
    assert math.isclose(split.left_cpu_seconds, max(0.0, root_own - claimed), abs_tol=1e-9)


def test_split_examples() -> None:
    # 10 s counted exactly; processes claim 12 s (tick rounding, exit estimates): cut to 10
    over = split_root(10.0, 12.0, 3.0, exact=True)
    assert (over.certain_scale, over.guessed_scale, over.left_cpu_seconds) == (10 / 12, 0.0, 0.0)
    # 2 s unexplained: the 3 s of guesses get 2 s, nothing is left for cgroup "/"
    under = split_root(10.0, 8.0, 3.0, exact=True)
    assert under.guessed_scale == pytest.approx(2 / 3) and under.left_cpu_seconds == 0.0
    # sampled 10 s, processes 12 s: they keep 12 s; guesses get up to 12.5 - 12
    sampled = split_root(10.0, 12.0, 3.0, exact=False)
    assert sampled.certain_scale == 1.0 and sampled.guessed_scale == pytest.approx(0.5 / 3)


def test_irq_time_apart_reads_the_kernel_config(tmp_path: Path) -> None:
    proc, boot = tmp_path / "proc", tmp_path / "boot"
    proc.mkdir()
    boot.mkdir()
    assert not irq_time_apart(str(proc), str(boot))  # no config: irq is inside task time
    (boot / f"config-{os.uname().release}").write_text("CONFIG_IRQ_TIME_ACCOUNTING=y\n")
    assert irq_time_apart(str(proc), str(boot))
    with gzip.open(proc / "config.gz", "wt") as f:  # /proc/config.gz wins over /boot
        f.write("CONFIG_HZ=250\n# CONFIG_IRQ_TIME_ACCOUNTING is not set\n")
    assert not irq_time_apart(str(proc), str(boot))
    with gzip.open(proc / "config.gz", "wt") as f:
        f.write("CONFIG_HZ=250\nCONFIG_IRQ_TIME_ACCOUNTING=y\n")
    (proc / "cmdline").write_text("quiet tsc=noirqtime\n")
    assert not irq_time_apart(str(proc), str(boot))
    (proc / "cmdline").write_text("quiet\n")
    assert irq_time_apart(str(proc), str(boot))
    (proc / "config.gz").write_bytes(b"\x1f\x8b\x08\x00garbage\xff\xfe")  # corrupt: /boot
    assert irq_time_apart(str(proc), str(boot))
    (boot / f"config-{os.uname().release}").write_bytes(b"\xff\xfe\x00CONFIG_HZ=1000\n")
    assert not irq_time_apart(str(proc), str(boot))


def test_irq_time_is_added_where_the_kernel_keeps_it_apart(tmp_path: Path) -> None:
    """With IRQ_TIME_ACCOUNTING task runtime (so cpuacct) leaves irq time out; /proc/stat's
    irq + softirq is added to the root's own time, and reaches cgroup "/"."""
    tree, proc = tmp_path / "cpuacct", tmp_path / "proc"
    (tree / "job").mkdir(parents=True)
    proc.mkdir()
    hz = os.sysconf("SC_CLK_TCK")

    def state(root_ns: int, job_ns: int, irq_ticks: int, softirq_ticks: int) -> None:
        (tree / "cpuacct.usage").write_text(f"{root_ns}\n")
        (tree / "job" / "cpuacct.usage").write_text(f"{job_ns}\n")
        (proc / "stat").write_text(
            f"cpu  100 0 50 900 0 {irq_ticks} {softirq_ticks} 0 0 0\nbtime 1000\n"
        )

    state(10_000_000_000, 4_000_000_000, 7, 30)
    root = cgroup_root(str(tree))
    made = CpuUsageCollector(
        CgroupReader(root, CgroupNamer(), track_short_lived=False), irq_apart=True,
        proc_root=str(proc),
    )
    assert made.exact and made.tick().baseline
    state(13_000_000_000, 5_000_000_000, 7 + hz // 10, 30 + hz // 5)  # +3 s, job +1 s
    usage = made.tick().usage
    made.close()
    assert usage[Consumer("cgroup", "job")] == pytest.approx(1.0)
    assert usage[ROOT_CONSUMER] == pytest.approx(2.0 + 0.3)  # own 2 s, irq 0.1 s, softirq 0.2 s


def _cpuacct_root_seconds() -> float:
    with open(f"{CPUACCT}/cpuacct.usage") as f:
        return int(f.read()) / 1e9


def _in_root(hierarchy: str) -> bool:
    with open("/proc/self/cgroup") as f:
        for number, controllers, path in (line.rstrip("\n").split(":", 2) for line in f):
            if (hierarchy == "v2" and number == "0" and not controllers) or (
                hierarchy == "v1" and "cpuacct" in controllers.split(",")
            ):
                return path == "/"
    return False


def test_total_handed_out_matches_the_exact_count_per_tick(tree, tmp_path: Path) -> None:
    """Whole-hierarchy walk with process tracking, as the daemon runs on a host whose tasks
    sit in the root cgroup: each tick hands out exactly the cpuacct root's growth."""
    if available("v1"):
        pytest.skip(f"the exact count is the v1 cpuacct root: {available('v1')}")
    if not _in_root(tree.hierarchy):
        pytest.skip(f"the test process must sit in the {tree.hierarchy} root cgroup")
    ok, why = probe_taskstats()
    if not ok:
        pytest.skip(why)
    if tree.hierarchy == "v2":
        assert host_cpuacct_root() == CPUACCT  # found in mountinfo, a true hierarchy root
    root = cgroup_root(hierarchy_path(tree.hierarchy))
    listener = TaskstatsListener(hierarchy=root.hierarchy)
    assert listener.start()
    collector = CpuUsageCollector(CgroupReader(root, CgroupNamer()), ProcessTracker(), listener)
    busy = tree.make("busy.service")
    tree.burners.start(0.5, tree.procs("busy.service"))  # a busy child cgroup
    tree.burners.start(0.1, period_ms=3.0)  # bursty root-cgroup work, idle in between
    spin = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done"  # a few ms of CPU
    loop = subprocess.Popen(  # short-lived root-cgroup processes, some 40 a second
        ["/bin/sh", "-c", f"while :; do /bin/sh -c {shlex.quote(spin)}; sleep 0.05; done"],
        stdin=subprocess.DEVNULL,
    )
    try:
        assert os.path.isdir(busy)
        # The collector reads the counter inside tick(): bracket that moment by reading it
        # just before and just after, so each tick's growth is bounded both ways.
        before_lo = _cpuacct_root_seconds()
        assert collector.tick().baseline
        before_hi = _cpuacct_root_seconds()
        ticks = []
        for _ in range(6):
            time.sleep(1.0)
            lo = _cpuacct_root_seconds()
            usage = collector.tick()
            hi = _cpuacct_root_seconds()
            ticks.append((math.fsum(usage.usage.values()), lo - before_hi, hi - before_lo, usage))
            before_lo, before_hi = lo, hi
    finally:
        loop.kill()
        loop.wait()
        collector.close()
    for handed, least, most, usage in ticks:
        assert usage.details["root_exact"] == 1.0
        assert usage.exited_tasks > 0
        assert least - 1e-6 <= handed <= most + 1e-6, (least, handed, most)
        assert most - least < 0.25 * least  # the bracket itself is tight enough to mean it
