"""Root-cgroup processes: /proc deltas, exits from taskstats, and a real 2,000-process loop."""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from carbond.attribution import split_energy
from carbond.consumers import Consumer
from carbond.workloads.cgroups import CgroupReader, detect_cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker, parse_stat
from carbond.workloads.taskstats import (
    TaskExit,
    TaskstatsListener,
    parse_taskstats,
    probe_taskstats,
)

HZ = 100


def stat_line(pid, comm, ppid, utime, stime, starttime, cutime=0, cstime=0) -> str:
    rest = [
        "S",
        ppid,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        utime,
        stime,
        cutime,
        cstime,
        20,
        0,
        1,
        0,
        starttime,
        0,
        0,
    ]
    return f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + "\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "stat").write_text("cpu 1 2 3\nbtime 1000\n")

    def set(self, pid, comm, ppid, cpu_ticks, starttime, children_ticks=0) -> None:
        (self.root / str(pid)).mkdir(exist_ok=True)
        (self.root / str(pid) / "stat").write_text(
            stat_line(pid, comm, ppid, cpu_ticks, 0, starttime, children_ticks)
        )

    def gone(self, pid) -> None:
        shutil.rmtree(self.root / str(pid))


def P(name: str) -> Consumer:
    return Consumer("process", name)


def test_parse_stat_odd_comm() -> None:
    got = parse_stat(7, stat_line(7, "a) (b c", 1, 150, 50, 999, 30, 20), HZ)
    assert got is not None
    assert (got.comm, got.ppid, got.cpu_seconds, got.starttime) == ("a) (b c", 1, 2.0, 999)
    assert got.children_seconds == 0.5
    assert parse_stat(7, "garbage", HZ) is None


def test_deltas_grouped_by_comm_and_pid_reuse(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    tracker = ProcessTracker(str(tmp_path), clock_ticks=HZ)
    proc.set(10, "nginx", 1, 100, 500)
    proc.set(11, "nginx", 1, 200, 500)
    proc.set(12, "cron", 1, 50, 500)
    first = tracker.tick([10, 11, 12], now_boottime=100.0)
    assert sum(first.usage.values()) == 0.0
    proc.set(10, "nginx", 1, 150, 500)
    proc.set(11, "nginx", 1, 260, 500)
    proc.set(12, "cron", 1, 500, 12_000)  # pid reused by a process born after the last tick
    proc.set(13, "moved", 1, 900, 200)  # old, not seen last tick: moved in, not new work
    second = tracker.tick([10, 11, 12, 13], now_boottime=125.0)
    assert second.usage[P("nginx")] == pytest.approx(1.1)
    assert second.usage[P("cron")] == pytest.approx(5.0)
    assert second.usage[P("moved")] == 0.0


def test_exit_adds_only_time_after_last_reading(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    tracker = ProcessTracker(str(tmp_path), clock_ticks=HZ, boottime=1000.0)
    proc.set(20, "make", 1, 100, 500)
    tracker.tick([20], now_boottime=100.0)
    proc.set(20, "make", 1, 100, 500)
    tracker.tick([20], now_boottime=105.0)
    proc.gone(20)
    exit_ = TaskExit(20, 1, "make", 1.3, 1005.0, None)
    tick = tracker.tick([], [exit_], now_boottime=110.0)
    assert tick.usage[P("make")] == pytest.approx(0.3)
    # the record can come one tick late; it must still count once, and only once
    proc.set(21, "late", 1, 100, 500)
    tracker.tick([21], now_boottime=115.0)
    proc.gone(21)
    assert tracker.tick([], now_boottime=120.0).usage == {}
    late = tracker.tick([], [TaskExit(21, 1, "late", 1.5, 1005.0, None)], now_boottime=125.0)
    assert late.usage[P("late")] == pytest.approx(0.5)
    again = tracker.tick([], [TaskExit(21, 1, "late", 1.5, 1005.0, None)], now_boottime=130.0)
    assert P("late") not in again.usage and P("late") not in again.guessed


def test_short_lived_exits_classified_by_cgroup_and_parent(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    tracker = ProcessTracker(str(tmp_path), clock_ticks=HZ)
    proc.set(30, "sh", 1, 10, 500)
    tracker.tick([30], now_boottime=100.0)
    exits = [
        TaskExit(40, 30, "rootcg", 0.2, None, "/"),  # /proc still showed the root cgroup
        TaskExit(41, 30, "elsewhere", 0.4, None, "/system.slice/x.service"),
        TaskExit(42, 30, "child", 0.1, None, None),  # parent is a root process: guessed root
        TaskExit(43, 42, "grandchild", 0.1, None, None),  # through a parent that also died
        TaskExit(44, 999, "stranger", 0.5, None, None),  # parent unknown: not ours
    ]
    tick = tracker.tick([30], exits, root_cgroup="/", now_boottime=105.0)
    assert tick.usage[P("rootcg")] == pytest.approx(0.2)
    assert P("elsewhere") not in tick.usage and P("elsewhere") not in tick.guessed
    assert tick.guessed == {P("child"): pytest.approx(0.1), P("grandchild"): pytest.approx(0.1)}
    assert P("stranger") not in tick.usage and P("stranger") not in tick.guessed


def test_exits_rescaled_to_the_reapers_exact_cutime(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    tracker = ProcessTracker(str(tmp_path), clock_ticks=HZ)
    proc.set(50, "bash", 1, 10, 500, children_ticks=1000)
    tracker.tick([50], now_boottime=100.0)
    proc.set(50, "bash", 1, 10, 500, children_ticks=1300)  # reaped 3.0 s of children
    exits = [TaskExit(60 + i, 50, "cc1", 0.1, None, None) for i in range(15)]  # 1.5 s estimated
    tick = tracker.tick([50], exits, now_boottime=105.0)
    assert tick.guessed[P("cc1")] == pytest.approx(3.0)


def test_parse_taskstats_layouts() -> None:
    v16 = bytearray(432)
    struct.pack_into("=H", v16, 0, 16)
    struct.pack_into("=Q", v16, 72, 2_500_000_000)
    v16[80:84] = b"dash"
    struct.pack_into("=III", v16, 128, 77, 5, 1_700_000_000)
    struct.pack_into("=QQ", v16, 152, 1_000_000, 500_000)
    struct.pack_into("=I", v16, 368, 77)
    got = parse_taskstats(bytes(v16))
    assert (got.pid, got.ppid, got.tgid, got.comm, got.btime) == (77, 5, 77, "dash", 1_700_000_000)
    assert got.cpu_seconds == 2.5  # sum_exec_runtime beats the tick samples here
    struct.pack_into("=Q", v16, 72, 1000)
    assert parse_taskstats(bytes(v16)).cpu_seconds == 1.5  # stale runtime: tick samples win
    v15 = bytearray(520)
    struct.pack_into("=H", v15, 0, 15)
    struct.pack_into("=Q", v15, 120, 3_000_000_000)
    struct.pack_into("=III", v15, 176, 88, 6, 1)
    struct.pack_into("=I", v15, 464, 88)
    got = parse_taskstats(bytes(v15))
    assert (got.pid, got.ppid, got.tgid, got.cpu_seconds) == (88, 6, 88, 3.0)
    assert parse_taskstats(b"\x10\x00") is None


def test_taskstats_without_cap_net_admin_degrades() -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop the capability")
    code = "from carbond.workloads.taskstats import probe_taskstats as p; print(p())"
    out = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
            os.sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "False" in out and "CAP_NET_ADMIN" in out


def _in_v2_root() -> bool:
    with open("/proc/self/cgroup") as f:
        return any(line.strip() == "0::/" for line in f)


@pytest.fixture
def listener():
    if os.geteuid() != 0:
        pytest.skip("taskstats needs CAP_NET_ADMIN")
    ok, why = probe_taskstats()
    if not ok:
        pytest.skip(why)
    listener = TaskstatsListener(hierarchy="v2")
    assert listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def test_shell_loop_of_2000_processes_in_root_cgroup(listener, tmp_path: Path) -> None:
    """Short-lived root-cgroup work gets its CPU energy within 5 % of the kernel's count."""
    root = detect_cgroup_root()
    if root.hierarchy != "v2" or not _in_v2_root():
        pytest.skip("the test process must sit in the v2 root cgroup")
    tag = os.urandom(3).hex()
    shell, true = tmp_path / f"cbsh{tag}", tmp_path / f"cbtrue{tag}"
    shutil.copy("/bin/sh", shell)
    shutil.copy("/bin/true", true)
    collector = CpuUsageCollector(CgroupReader(root, CgroupNamer()), ProcessTracker(), listener)
    assert collector.tick().baseline
    started = time.monotonic()
    loop = subprocess.Popen([str(shell), "-c", f"for i in $(seq 2000); do {true}; done"])
    _, status, rusage = os.wait4(loop.pid, 0)
    assert status == 0
    time.sleep(0.3)  # let the last exit records arrive
    usage = collector.tick()
    dt = time.monotonic() - started
    kernel = rusage.ru_utime + rusage.ru_stime  # the shell and every reaped child, exact
    ours = usage.usage.get(P(shell.name), 0.0) + usage.usage.get(P(true.name), 0.0)
    assert usage.exited_tasks >= 2001
    assert ours == pytest.approx(kernel, rel=0.05)
    # as energy: the same share of the host's CPU energy
    host = 30.0 * dt
    split = split_energy(host, dt, 0.0, "separate", usage.usage)
    total_cpu = math.fsum(usage.usage.values())
    loop_joules = split[P(shell.name)] + split[P(true.name)]
    assert loop_joules == pytest.approx(host * kernel / total_cpu, rel=0.05)
    assert math.isclose(math.fsum(split.values()), host, rel_tol=1e-9)
