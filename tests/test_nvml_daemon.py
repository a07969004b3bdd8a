"""Issue 4's "Done when", end to end: the real `carbond run` over the real pynvml, loaded with
the compiled stand-in libnvidia-ml.so.1 (LD_LIBRARY_PATH), with sleeping processes in real
cgroup v2 groups named like a systemd host, scraped over HTTP.

The fake re-reads its scenario file on every NVML call. Each change is written right after a
tick was seen, about one interval before the next, so a tick never reads the new energy counter
and the old utilisation samples (that would split that tick by memory instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cgroup_helpers import TestTree
from tests.fakes.nvml import FakeGpu, FakeProcess, Scenario, samples_for
from tests.helpers import Carbond, Samples, carbond_run, select, total

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to build fake")

HOST = "carbond_host_energy_joules_total"
CONSUMER = "carbond_consumer_energy_joules_total"
ERRORS = "carbond_meter_errors_total"
GIB = 1 << 30
T0_US = 1_700_000_000_000_000
UNITS = ("gpu-a.service", "gpu-b.service")
PLAIN = "batch/job-7"  # no naming rule matches: kind "cgroup", named below the cgroup root




@dataclass
class Host:
    """A private cgroup subtree with one sleeping process in each of some of its groups."""

    tree: TestTree
    pids: dict[str, int] = field(default_factory=dict)  # unit name, PLAIN or "" (root) -> pid


@contextlib.contextmanager
def sleepers(groups: dict[str, str]) -> Iterator[Host]:
    """One `sleep` per group (name -> path below a fresh test root, "" for the root itself);
    every process and cgroup is removed on the way out, also after a failure."""
    tree = TestTree("v2")
    children: list[subprocess.Popen[bytes]] = []
    result = Host(tree)
    try:
        for name, rel in groups.items():
            tree.make(rel)
            child = subprocess.Popen(["sleep", "600"])
            children.append(child)
            Path(tree.procs(rel)).write_text(str(child.pid))
            result.pids[name] = child.pid
        yield result
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait()
        tree.cleanup()


@pytest.fixture
def host() -> Iterator[Host]:
    """`system.slice/gpu-{a,b}.service` and `batch/job-7` under a private prefix."""
    with sleepers({**{unit: f"system.slice/{unit}" for unit in UNITS}, PLAIN: PLAIN}) as made:
        yield made


def two_gpus() -> Scenario:
    return Scenario(gpus=[
        FakeGpu(0, "GPU-11111111-aaaa-4000-8000-000000000000", "NVIDIA H100 80GB HBM3",
                energy_millijoules=5_000_000, power_milliwatts=300_000),
        FakeGpu(1, "GPU-22222222-bbbb-4000-8000-000000000000", "NVIDIA A100-SXM4-40GB",
                energy_millijoules=9_000_000, power_milliwatts=60_000),
    ])


@dataclass
class Setup:
    """The command line and environment shared by `carbond run` and `carbond check`."""

    args: list[str]
    env: dict[str, str]


def setup(tmp_path: Path, lib: Path, scenario: Path, tree: TestTree | None = None) -> Setup:
    powercap = tmp_path / "powercap"
    powercap.mkdir(exist_ok=True)
    args = ["--powercap-root", str(powercap), "--state-dir", str(tmp_path / "state"),
            "--interval", "1s"]
    if tree is not None:
        args += ["--cgroup-root", tree.root]
    return Setup(args, {"LD_LIBRARY_PATH": str(lib), "FAKE_NVML_SCENARIO": str(scenario)})


def write_after_tick(daemon: Carbond, scenario: Scenario, path: Path) -> None:
    """Wait for a tick to finish, then change the fake machine well before the next one."""
    daemon.wait_ticks(1)
    scenario.write(path)


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def gpu_host(samples: Samples, device: str) -> dict[tuple[tuple[str, str], ...], float]:
    return select(samples, HOST, component="gpu", device=device, source="nvml")


def unit_gpu(before: Samples, after: Samples, unit: str) -> float:
    return grew(before, after, CONSUMER, component="gpu", consumer=unit, kind="unit")


def test_two_units_split_three_to_one_idle_gpu_and_exact_host_energy(
        tmp_path: Path, fake_lib: Path, host: Host) -> None:
    a, b = (host.pids[unit] for unit in UNITS)
    path = tmp_path / "scenario.txt"
    sc = two_gpus()
    # Memory 1:3 points the other way, so 3:1 shows the SM samples decided the split.
    sc.processes = [FakeProcess(0, a, 1 * GIB), FakeProcess(0, b, 3 * GIB)]
    sc.write(path)
    run = setup(tmp_path, fake_lib, path, host.tree)
    increments = [(1_234_567, 55_555), (2_000_001, 60_001), (987_654, 49_999)]
    with carbond_run(*run.args, env=run.env) as daemon:
        before = daemon.wait_ticks(1)
        ts = T0_US
        for inc0, inc1 in increments:
            sc.gpu(0).energy_millijoules += inc0
            sc.gpu(1).energy_millijoules += inc1
            sc.samples += [*samples_for(0, a, 75, ts, 6), *samples_for(0, b, 25, ts, 6)]
            ts += 10_000_000
            write_after_tick(daemon, sc, path)
        after = daemon.wait_ticks(2)

    total0 = sum(i for i, _ in increments) / 1000
    total1 = sum(i for _, i in increments) / 1000
    assert grew(before, after, HOST, component="gpu", device="gpu-0", source="nvml") == \
        pytest.approx(total0, rel=1e-6)
    assert grew(before, after, HOST, component="gpu", device="gpu-1", source="nvml") == \
        pytest.approx(total1, rel=1e-6)
    joules_a, joules_b = unit_gpu(before, after, UNITS[0]), unit_gpu(before, after, UNITS[1])
    assert joules_a / (joules_a + joules_b) == pytest.approx(0.75, rel=0.02)
    assert joules_a + joules_b == pytest.approx(total0, rel=1e-6)
    idle = grew(before, after, CONSUMER, component="gpu", consumer="idle", kind="idle")
    assert idle == pytest.approx(total1, rel=1e-6)
    assert grew(before, after, CONSUMER, component="gpu") == \
        pytest.approx(total0 + total1, rel=1e-6)

    info = {(dict(k)["device"], dict(k)["uuid"], dict(k)["name"]): v
            for k, v in select(after, "carbond_gpu_info").items()}
    assert info == {(f"gpu-{g.index}", g.uuid, g.name): 1.0 for g in sc.gpus}
    assert total(after, "carbond_meter_up", meter="nvml") == 1
    assert total(after, ERRORS, meter="nvml") == 0


def run_check(run: Setup) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", "check", *run.args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **run.env})


def test_gpu_lost_mid_run_stops_its_series_only_and_check_names_it(
        tmp_path: Path, fake_lib: Path) -> None:
    path = tmp_path / "scenario.txt"
    sc = two_gpus()
    sc.write(path)
    run = setup(tmp_path, fake_lib, path)
    with carbond_run(*run.args, env=run.env) as daemon:
        sc.gpu(0).energy_millijoules += 1_000_000
        sc.gpu(1).energy_millijoules += 2_000_000
        write_after_tick(daemon, sc, path)
        healthy = daemon.wait_ticks(2)
        assert total(healthy, ERRORS, meter="nvml") == 0

        sc.gpu(1).faults.add("lost")
        sc.gpu(0).energy_millijoules += 3_000_000
        sc.gpu(1).energy_millijoules += 4_000_000  # spent while lost: never counted
        write_after_tick(daemon, sc, path)
        lost = daemon.wait_ticks(2)
        sc.gpu(0).energy_millijoules += 2_500_000  # in a 1 s tick: within the 5 kW bound
        sc.gpu(1).energy_millijoules += 6_000_000
        write_after_tick(daemon, sc, path)
        later = daemon.wait_ticks(2)
        check = run_check(run)
        assert daemon.process.poll() is None

    assert gpu_host(lost, "gpu-1") == gpu_host(healthy, "gpu-1") == gpu_host(later, "gpu-1")
    assert grew(healthy, later, HOST, device="gpu-0") == pytest.approx(5_500.0, rel=1e-9)
    assert grew(lost, later, HOST, device="gpu-0") == pytest.approx(2_500.0, rel=1e-9)
    assert grew(lost, later, CONSUMER, component="gpu") == pytest.approx(2_500.0, rel=1e-9)
    assert total(lost, ERRORS, meter="nvml") >= 1
    assert total(later, "carbond_meter_up", meter="nvml") == 1  # gpu-0 still read
    assert len(select(later, "carbond_gpu_info")) == 2  # the lost GPU is still known

    assert check.returncode == 0, check.stdout + check.stderr
    lost_lines = [line for line in check.stdout.splitlines() if "gpu-1:" in line]
    assert len(lost_lines) == 1, check.stdout
    assert "!!" in lost_lines[0] and "index 1" in lost_lines[0], lost_lines
    assert "lost" in lost_lines[0] and "GPU is lost" in lost_lines[0], lost_lines
    assert f"{sc.gpu(0).name} (index 0, {sc.gpu(0).uuid}): energy counter" in check.stdout


def test_library_without_v3_symbols_still_attributes_per_process(
        tmp_path: Path, fake_lib_no_v3: Path, host: Host) -> None:
    a, b = (host.pids[unit] for unit in UNITS)
    path = tmp_path / "scenario.txt"
    sc = two_gpus()
    job = host.pids[PLAIN]
    # No utilisation samples: only the running-process query (the _v2 fallback) sees them.
    sc.processes = [FakeProcess(0, a, 3 * GIB), FakeProcess(0, b, 1 * GIB),
                    FakeProcess(0, job, 4 * GIB)]
    sc.write(path)
    run = setup(tmp_path, fake_lib_no_v3, path, host.tree)
    with carbond_run(*run.args, env=run.env) as daemon:
        before = daemon.wait_ticks(1)
        sc.gpu(0).energy_millijoules += 800_000  # in one tick: 8 kJ would be over 5 kW
        write_after_tick(daemon, sc, path)
        after = daemon.wait_ticks(2)

    joules_a, joules_b = unit_gpu(before, after, UNITS[0]), unit_gpu(before, after, UNITS[1])
    assert joules_a == pytest.approx(300.0, rel=1e-9)
    assert joules_b == pytest.approx(100.0, rel=1e-9)
    assert grew(before, after, CONSUMER, component="gpu", consumer=PLAIN, kind="cgroup") == \
        pytest.approx(400.0, rel=1e-9)
    assert total(after, ERRORS, meter="nvml") == 0


def test_root_cgroup_process_is_named_like_the_cpu_side(tmp_path: Path, fake_lib: Path) -> None:
    """A task in the root cgroup (no systemd) is a kind="process" consumer for its GPU energy
    too, as DESIGN's naming table and the CPU side have it, not cgroup "/"."""
    with sleepers({"": ""}) as made:
        path = tmp_path / "scenario.txt"
        sc = two_gpus()
        sc.processes = [FakeProcess(0, made.pids[""], 1 * GIB)]
        sc.write(path)
        run = setup(tmp_path, fake_lib, path, made.tree)
        with carbond_run(*run.args, env=run.env) as daemon:
            before = daemon.wait_ticks(1)
            sc.gpu(0).energy_millijoules += 2_000_000
            write_after_tick(daemon, sc, path)
            after = daemon.wait_ticks(2)

    gpu = {(dict(k)["kind"], dict(k)["consumer"]): v
           for k, v in select(after, CONSUMER, component="gpu").items() if v > 0}
    assert grew(before, after, CONSUMER, component="gpu", consumer="sleep", kind="process") == \
        pytest.approx(2_000.0, rel=1e-9), gpu


def test_nvml_hanging_at_start_leaves_the_gpus_out_until_it_answers(
        tmp_path: Path, fake_lib: Path) -> None:
    """The GPU's energy call blocks from the start (the stand-in's `hang`, as a wedged driver
    does): the daemon starts within its start deadline and ticks with the CPU, `nvml` down
    with its reason; once NVML answers, the GPU joins and is counted from then on."""
    path = tmp_path / "scenario.txt"
    sc = two_gpus()
    sc.gpu(0).faults.add("hang")
    sc.write(path)
    run = setup(tmp_path, fake_lib, path)
    with carbond_run(*run.args, env=run.env) as daemon:
        hung = daemon.wait_ticks(2)
        assert total(hung, "carbond_meter_up", meter="nvml") == 0
        assert not select(hung, HOST, component="gpu")
        sc.gpu(0).faults.clear()  # the driver answers again
        sc.write(path)
        for _ in range(40):
            joined = daemon.wait_ticks(1)
            if total(joined, "carbond_meter_up", meter="nvml") == 1:
                break
        assert total(joined, "carbond_meter_up", meter="nvml") == 1
        sc.gpu(0).energy_millijoules += 1_000_000
        sc.gpu(1).energy_millijoules += 2_000_000
        write_after_tick(daemon, sc, path)
        later = daemon.wait_ticks(2)
    assert daemon.process.returncode == 0
    assert grew(joined, later, HOST, device="gpu-0") == pytest.approx(1_000.0, rel=1e-9)
    assert grew(joined, later, HOST, device="gpu-1") == pytest.approx(2_000.0, rel=1e-9)
