"""deploy/systemd/carbond.service and the sd_notify protocol (issue 13, item 1).

The real `carbond run` talks to a NOTIFY_SOCKET this test owns; `systemd-analyze` verifies the
unit and scores its sandbox; and carbond runs as an unprivileged user holding exactly the
unit's capabilities (setpriv), to show that set works and that neither capability can go.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fnmatch
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.carbon.intensity import Intensity
from carbond.commands.build import build_daemon
from carbond.config import Config
from carbond.daemon import Daemon
from carbond.exporter.series import SeriesSample
from carbond.exporter.snapshot import DeviceSeries, Snapshot, status_line
from carbond.meters.base import DeviceEnergy, DeviceReport, MeterReading
from carbond.runtime.systemd import notify, watchdog_seconds
from carbond.types import Consumer
from tests.helpers import carbond_run, free_port, scrape, total
from tests.powercap import ConstantPower, FakePowercap

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "carbond.service"
MAX_EXPOSURE = 3.0


def unit_settings() -> dict[str, list[str]]:
    """Every Key=value of the unit (keys repeat: DeviceAllow, SystemCallFilter)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


# ---- the notify protocol, pure parts ----------------------------------------------------------


def snapshot(consumers: list[str], watts: list[tuple[str, float]], zone: str = "DE",
             provider: str | None = "static") -> Snapshot:
    intensity = None if provider is None else Intensity(380.0, zone, provider, 0.0, 0.0)
    return Snapshot(
        devices=tuple(DeviceSeries(c, f"{c}-0", "rapl", 0.0, w) for c, w in watts),
        consumers=tuple(SeriesSample(Consumer(name, "unit"), "cpu", 0.0, 0.0)
                        for name in consumers),
        intensity=intensity, zone=zone)


def test_status_line_counts_consumers_and_adds_power_without_psys():
    snap = snapshot(["a.service", "b.service", "a.service"],
                    [("cpu", 40.0), ("dram", 5.5), ("platform", 60.0)])
    assert status_line(snap) == "2 consumers, host 45.5 W, 380 g/kWh from static (DE)"
    assert status_line(Snapshot()) == "0 consumers, host 0.0 W, no grid intensity yet"


def test_status_line_takes_the_platform_meter_where_it_measured():
    parts = [("cpu", 400.0), ("dram", 50.0), ("gpu", 250.0), ("platform", 600.0)]  # + psys
    bmc = DeviceSeries("platform", "platform", "redfish", 0.0, 1000.0)
    snap = snapshot(["a.service"], parts)
    with_bmc = dataclasses.replace(snap, devices=(*snap.devices, bmc))
    assert "host 1000.0 W" in status_line(with_bmc)
    down = dataclasses.replace(bmc, watts=0.0)  # its meter missed the tick: the parts
    assert "host 700.0 W" in status_line(dataclasses.replace(snap, devices=(*snap.devices, down)))


@given(st.lists(st.text(), max_size=5), st.text(min_size=1), st.text(min_size=1))
def test_status_line_is_always_one_line(names, zone, provider):
    """Hostile consumer names or zones must never split the datagram's STATUS= line."""
    line = status_line(snapshot(names, [("cpu", 1.0)], zone, provider))
    assert "\n" not in line and "\r" not in line


def test_watchdog_seconds_only_for_this_process():
    pid = str(os.getpid())
    assert watchdog_seconds({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": pid}) == 120.0
    assert watchdog_seconds({"WATCHDOG_USEC": "120000000"}) == 120.0
    assert watchdog_seconds({"WATCHDOG_USEC": "120000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_seconds({}) is None


@contextlib.contextmanager
def notify_socket(abstract: bool = False) -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket like systemd's; yields it and the NOTIFY_SOCKET value."""
    directory = tempfile.mkdtemp(prefix="carbond-notify-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if abstract:
            name = f"carbond-test-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind("\0" + name)
            yield sock, "@" + name
        else:
            path = os.path.join(directory, "notify")
            sock.bind(path)
            yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def drain(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(sock.recv(4096).decode())
    return messages


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_path_and_abstract_sockets(abstract):
    with notify_socket(abstract) as (sock, address):
        assert notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": address})
        assert drain(sock) == ["READY=1\nSTATUS=x"]
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"})


def test_a_full_notify_queue_drops_the_message_instead_of_blocking_the_tick():
    with notify_socket() as (sock, address):
        sent = [notify(f"WATCHDOG=1\nSTATUS={i}", {"NOTIFY_SOCKET": address})
                for i in range(200)]  # nobody reads: the queue fills within a few dozen
        assert sent[0] and not sent[-1]
        received = drain(sock)
    assert received == [f"WATCHDOG=1\nSTATUS={i}" for i in range(len(received))]


# ---- the real daemon ----------------------------------------------------------------------------


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


STATUS = re.compile(r"^(\d+) consumers, host [0-9.]+ W, 300 g/kWh from constant \(DE\)$")


def test_daemon_notifies_ready_after_a_tick_then_watchdog_status_and_stopping(tmp_path):
    config = tmp_path / "carbond.yaml"
    config.write_text("intensity: {zone: DE, providers: [{constant: {grams_per_kwh: 300}}]}\n")
    with notify_socket() as (sock, address), ConstantPower(str(tmp_path / "powercap")):
        with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                         "--interval", "1s", env={"NOTIFY_SOCKET": address}) as daemon:
            samples = daemon.wait_ticks(5)
            ticks = total(samples, "carbond_tick_duration_seconds_count")
            before_stop = drain(sock)
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=10) == 0
        messages = before_stop + drain(sock)

    parsed = [fields(m) for m in messages]
    # READY=1 comes first and only once, and it already reports a completed tick: consumers
    # exist only after one (before it the snapshot is empty: "0 consumers").
    assert parsed[0].get("READY") == "1"
    assert sum("READY" in p for p in parsed) == 1
    ready_status = STATUS.match(parsed[0]["STATUS"])
    assert ready_status and int(ready_status.group(1)) >= 1, parsed[0]
    # Every good tick in the loop sends WATCHDOG=1 with a fresh STATUS; the first tick
    # (before READY) does not.
    watchdogs = [p for p in parsed[1:-1] if p.get("WATCHDOG") == "1"]
    assert len(watchdogs) == len(parsed) - 2
    assert len(watchdogs) >= ticks - 1 >= 4
    assert all(STATUS.match(p["STATUS"]) for p in watchdogs)
    # Last: STOPPING=1.
    assert parsed[-1].get("STOPPING") == "1"


class RaisingMeter:
    """A meter (the `Meter` interface) over a constant 100 W package; from its `fail_from`-th
    read on, for `failures` reads, either `read()` raises (isolated: down alone) or `up()`
    does, which the tick itself calls, so that tick raises."""

    name = "flaky"
    errors_total = 0

    def __init__(self, fail_from: int, failures: int, where: str) -> None:
        self.reads = 0
        self.fail_from, self.failures, self.where = fail_from, failures, where
        self.failing = False

    def read(self) -> MeterReading:
        self.reads += 1
        self.failing = self.fail_from <= self.reads < self.fail_from + self.failures
        if self.failing and self.where == "read":
            raise RuntimeError("meter bug in read")
        return MeterReading([DeviceEnergy("package-0", "cpu", "rapl", 100.0 * self.reads)])

    def up(self) -> bool:
        if self.failing and self.where == "up":
            raise RuntimeError("meter bug in up")
        return True

    def components(self) -> frozenset[str]:
        return frozenset({"cpu"})

    def report(self) -> list[DeviceReport]:
        return []

    def close(self) -> None:
        pass


def run_daemon_until(meter: RaisingMeter, reads: int, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[Daemon, list[dict[str, str]]]:
    """The real Daemon.run loop at 0.1 s ticks with our meter, until it has been read
    `reads` times; returns the daemon and every notification, in order."""
    config = Config(interval_seconds=0.1, state_dir=str(tmp_path / "state"))
    with notify_socket() as (sock, address):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        daemon, runner = build_daemon(config, meters=[meter], cpu=None, feed=None, ledger=None)
        runner.start()
        stop = threading.Event()
        loop = threading.Thread(target=daemon.run, args=(stop,), name="test-daemon-loop")
        loop.start()
        messages: list[str] = []
        try:
            deadline = time.monotonic() + 30
            while meter.reads < reads and time.monotonic() < deadline:
                messages += drain(sock)  # the kernel queues only a few datagrams
                time.sleep(0.02)
        finally:
            stop.set()
            loop.join(timeout=10)
            runner.stop()
        assert not loop.is_alive()
        assert meter.reads >= reads, f"only {meter.reads} reads in 30 s"
        return daemon, [fields(m) for m in messages + drain(sock)]


def test_a_tick_that_raises_stops_watchdog_pings_and_is_counted(tmp_path, monkeypatch):
    meter = RaisingMeter(fail_from=5, failures=3, where="up")
    daemon, parsed = run_daemon_until(meter, 12, tmp_path, monkeypatch)
    assert parsed[0].get("READY") == "1" and parsed[-1].get("STOPPING") == "1"
    loop = ["W" if p.get("WATCHDOG") == "1" else "F" for p in parsed[1:-1]]
    failed = [p for p in parsed[1:-1] if "WATCHDOG" not in p]
    # Three failing ticks in a row: no WATCHDOG=1 for any of them, pings before and after.
    assert re.fullmatch(r"W+FFFW+", "".join(loop)), loop
    assert all(p["STATUS"].startswith("tick failed (RuntimeError)") for p in failed), failed
    snapshot = daemon.latest()
    assert snapshot.tick_failures_total == 3
    assert snapshot.meters_up == {"flaky": True}  # a good tick followed and published


def test_a_meter_whose_read_raises_is_down_alone_and_pings_continue(tmp_path, monkeypatch):
    meter = RaisingMeter(fail_from=5, failures=1_000, where="read")
    daemon, parsed = run_daemon_until(meter, 10, tmp_path, monkeypatch)
    loop = parsed[1:-1]
    assert loop and all(p.get("WATCHDOG") == "1" for p in loop), loop
    snapshot = daemon.latest()
    assert snapshot.tick_failures_total == 0
    assert snapshot.meters_up == {"flaky": False}


# ---- the unit -------------------------------------------------------------------------------


def test_unit_has_what_the_issue_asks_for():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["carbond"] and s["ConfigurationDirectory"] == ["carbond"]
    assert s["WatchdogSec"] and s["ProtectSystem"] == ["strict"]
    assert s["ProtectHome"] == ["yes"] and s["NoNewPrivileges"] == ["yes"]
    assert s["PrivateTmp"] == ["yes"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert "PrivateDevices" not in s
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_DAC_READ_SEARCH"]
    assert s["ExecStart"][0].startswith("/opt/carbond/bin/carbond run")
    # Validates, signals, and waits until the file is in force (tests/test_reload.py).
    assert s["ExecReload"] == [
        "/opt/carbond/bin/carbond reload --pid $MAINPID --config /etc/carbond/carbond.yaml"]


# /proc/devices (character part) of an H100 with driver 580 (open kernel module), and of an
# older proprietary driver. NVML needs major 195 (/dev/nvidiactl, /dev/nvidiaN) read-write.
H100_DRIVER_580 = """Character devices:
  1 mem
195 nvidia
195 nvidiactl
238 nvidia-uvm
239 nvidia-nvswitch
240 nvidia-nvlink
241 nvidia-caps
242 nvidia-caps-imex-channels
"""
OLDER_DRIVER = "Character devices:\n  1 mem\n195 nvidia-frontend\n241 nvidia-caps\n"


def allowed_majors(proc_devices: str) -> dict[int, str]:
    """Which character majors the unit's DeviceAllow= "char-GROUP" entries open, and how:
    systemd matches GROUP against /proc/devices names with shell globbing."""
    allowed: dict[int, str] = {}
    for entry in unit_settings()["DeviceAllow"]:
        pattern, access = entry.split()
        assert pattern.startswith("char-"), entry
        for line in proc_devices.split("Block devices:")[0].splitlines()[1:]:
            major, name = line.split()
            if fnmatch.fnmatchcase(name, pattern.removeprefix("char-")):
                both = set(allowed.get(int(major), "")) | set(access)
                allowed[int(major)] = "".join(sorted(both))
    return allowed


def test_device_allow_opens_the_nvidia_control_and_gpu_nodes_only():
    assert unit_settings()["DevicePolicy"] == ["closed"]
    for proc_devices in (H100_DRIVER_580, OLDER_DRIVER):
        allowed = allowed_majors(proc_devices)
        assert allowed[195] == "rw" and allowed[241] == "r"
        assert set(allowed) == {195, 241}  # not nvidia-uvm, nvswitch, nvlink, imex
    here = Path("/proc/devices").read_text()
    if re.search(r"^\s*195 ", here, re.M):  # this machine has the NVIDIA driver
        assert allowed_majors(here)[195] == "rw"


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze missing (scripts/test-deps.sh installs the systemd package)")
    return binary


def installed_root(tmp_path: Path) -> Path:
    """`make install DESTDIR=root INSTALL_VENV=no`, a carbond launcher where the venv would
    be, and the distribution's own units (sysinit.target …) that the unit depends on."""
    root = tmp_path / "root"
    subprocess.run(["make", "-s", "install", f"DESTDIR={root}", "INSTALL_VENV=no"],
                   cwd=ROOT, check=True, capture_output=True)
    launcher = root / "opt" / "carbond" / "bin" / "carbond"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -m carbond \"$@\"\n")
    launcher.chmod(0o755)
    units = Path("/usr/lib/systemd/system")
    if not (units / "sysinit.target").exists():
        pytest.skip("no systemd units in /usr/lib/systemd/system")
    shutil.copytree(units, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    # ExecReload's /bin/kill, on a merged-/usr root like Debian's.
    (root / "usr" / "bin").mkdir()
    shutil.copy2(Path("/bin/kill").resolve(), root / "usr" / "bin" / "kill")
    (root / "bin").symlink_to("usr/bin")
    return root


def test_systemd_analyze_verify_is_clean(tmp_path):
    binary = systemd_analyze()
    root = installed_root(tmp_path)
    result = subprocess.run([binary, "verify", f"--root={root}", "carbond.service"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""

    # It does check: a unit whose program is missing fails.
    (root / "opt" / "carbond" / "bin" / "carbond").unlink()
    broken = subprocess.run([binary, "verify", f"--root={root}", "carbond.service"],
                            capture_output=True, text=True)
    assert broken.returncode != 0 and "not executable" in broken.stderr


def exposure(binary: str, unit: Path) -> float:
    result = subprocess.run([binary, "security", "--offline=true", str(unit)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_security_exposure_at_most_three_and_as_documented(tmp_path):
    binary = systemd_analyze()
    score = exposure(binary, UNIT)
    assert score <= MAX_EXPOSURE
    documented = re.search(r"rates this unit ([0-9.]+)", UNIT.read_text())
    assert documented and float(documented.group(1)) == score

    # The score reacts to the sandbox: without it the same unit is far more exposed.
    loose = tmp_path / "carbond.service"
    loose.write_text("\n".join(
        line for line in UNIT.read_text().splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability",
                                "DynamicUser", "NoNewPrivileges", "MemoryDeny"))))
    assert exposure(binary, loose) > MAX_EXPOSURE + 3


# ---- the unit's capabilities, applied for real --------------------------------------------------

NOBODY = 65534
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes enforces, through prctl (Linux 6.3+); inherited by
    the carbond that setpriv executes. Runs in the child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(97)


def mdwe_supported() -> bool:
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=deny_write_execute)
    return probe.returncode == 0


# Installs a seccomp filter the way SystemCallFilter= + SystemCallErrorNumber=EPERM do (an
# allow-list, everything else fails with EPERM), then executes the rest of its arguments.
# Runs as the unprivileged user after setpriv set no_new_privs, as systemd applies it last.
SECCOMP_EXEC = """
import ctypes, errno, os, sys
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x00050000 | errno.EPERM)
for name in os.environ.pop("CARBOND_TEST_SYSCALLS").split():
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:
        assert lib.seccomp_rule_add(ctx, 0x7FFF0000, number, 0) == 0, name
assert lib.seccomp_load(ctx) == 0
os.execv(sys.argv[1], sys.argv[1:])
"""


def syscall_groups(binary: str) -> dict[str, list[str]]:
    """systemd's syscall groups as `systemd-analyze syscall-filter` lists them."""
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in subprocess.run([binary, "syscall-filter"], capture_output=True,
                               text=True).stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith("    "):
            current.append(line.strip())
    return groups


def unit_syscall_allow_list(binary: str) -> list[str]:
    """What the unit's SystemCallFilter= lines allow: the first is an allow-list, `~` lines
    take groups away."""
    groups = syscall_groups(binary)

    def expand(names: list[str]) -> set[str]:
        calls: set[str] = set()
        for name in names:
            calls |= expand(groups[name]) if name.startswith("@") else {name}
        return calls

    allowed: set[str] = set()
    for value in unit_settings()["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    assert unit_settings()["SystemCallErrorNumber"] == ["EPERM"]
    return sorted(allowed)


def unit_capabilities() -> list[str]:
    caps = unit_settings()["AmbientCapabilities"][0].split()
    assert caps == unit_settings()["CapabilityBoundingSet"][0].split()
    return [cap.removeprefix("CAP_").lower() for cap in caps]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="carbond-caps-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(caps: list[str], shared: Path, mdwe: bool, others: tuple[str, Path],
                  syscalls: list[str] | None = None) -> dict[str, float]:
    """`carbond run` as uid 65534 with only `caps` (bounding, inheritable and ambient, as the
    unit sets them), no new privileges and, given `syscalls`, only those system calls; its
    rapl meter state and exited-task count. `others`: the Python and the copy of carbond
    that user can read (tests/unprivileged.py), so the clone's place does not matter."""
    python, site = others
    state = shared / f"state-{'-'.join(caps) or 'none'}"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    port = free_port()
    listed = ",".join(f"+{cap}" for cap in caps)
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--no-new-privs", f"--bounding-set=-all{',' + listed if caps else ''}",
               f"--inh-caps=-all{',' + listed if caps else ''}"]
    if caps:
        setpriv.append(f"--ambient-caps={listed}")
    config = shared / "carbond.yaml"
    env = {**os.environ, "PYTHONPATH": str(site)}
    if syscalls is not None:
        setpriv += [python, "-c", SECCOMP_EXEC]
        env["CARBOND_TEST_SYSCALLS"] = " ".join(syscalls)
    process = subprocess.Popen(
        [*setpriv, python, "-m", "carbond", "run", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--interval", "1s", "--state-dir", str(state),
         "--powercap-root", str(shared / "powercap")],
        cwd=shared, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=deny_write_execute if mdwe else None)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"carbond exited: {process.stderr.read()}")
            with contextlib.suppress(OSError):
                first = scrape(port)
                break
            assert time.monotonic() < deadline, "carbond did not serve /metrics"
            time.sleep(0.05)
        # Short-lived processes exit while it runs: taskstats exit records count them.
        # Without taskstats none are ever counted: 5 ticks of trying settle that.
        start_ticks = total(first, "carbond_tick_duration_seconds_count")
        deadline = time.monotonic() + 60
        while True:
            for _ in range(5):
                subprocess.run(["true"], check=True)
            samples = scrape(port)
            exited = (total(samples, "carbond_exited_tasks_total")
                      - total(first, "carbond_exited_tasks_total"))
            ticks = total(samples, "carbond_tick_duration_seconds_count") - start_ticks
            if exited > 0 or ticks >= 5:
                break
            assert time.monotonic() < deadline, "carbond stopped ticking"
            time.sleep(0.1)
        return {"rapl_up": total(samples, "carbond_meter_up", meter="rapl"),
                "exited": exited}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user and capabilities")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_the_units_capabilities_are_needed_and_enough(shared_dir, for_others):
    """As the dynamic user would: RAPL counters readable by root only (0400, as the kernel
    ships them) and taskstats exit records both work with exactly CAP_DAC_READ_SEARCH and
    CAP_NET_ADMIN; without either, its part stops working. The full run also has the unit's
    system call filter (libseccomp) and write-xor-execute memory (MemoryDenyWriteExecute=yes,
    where the kernel can enforce it)."""
    (shared_dir / "carbond.yaml").write_text("attribution: {processes: on}\n")
    tree = FakePowercap(str(shared_dir / "powercap"))
    zone = tree.add("intel-rapl:0", "package-0", energy_uj=1_000_000)
    os.chmod(os.path.join(zone.path, "energy_uj"), 0o400)
    caps = unit_capabilities()
    assert sorted(caps) == ["dac_read_search", "net_admin"]
    mdwe = mdwe_supported()
    binary = shutil.which("systemd-analyze")
    syscalls = unit_syscall_allow_list(binary) if binary else None
    if syscalls is not None:
        assert "setuid" not in syscalls and "setrlimit" not in syscalls
        assert "execve" in syscalls and "socket" in syscalls

    full = run_as_nobody(caps, shared_dir, mdwe, for_others, syscalls)
    assert full["rapl_up"] == 1 and full["exited"] > 0, full
    no_dac = run_as_nobody(["net_admin"], shared_dir, mdwe, for_others)
    assert no_dac["rapl_up"] == 0 and no_dac["exited"] > 0, no_dac
    no_net = run_as_nobody(["dac_read_search"], shared_dir, mdwe, for_others)
    assert no_net["rapl_up"] == 1 and no_net["exited"] == 0, no_net
