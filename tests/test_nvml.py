"""carbond's NVML meter and GPU usage through the real pynvml against a compiled stand-in
libnvidia-ml.so.1 (tests/fakes/nvml), with real processes in real cgroups."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.nvml import (
    Driver,
    FakeGpu,
    FakeMig,
    FakeProcess,
    FakeSample,
    Scenario,
    samples_for,
)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to build fake")

UNIFIED = Path("/sys/fs/cgroup/unified")
GIB = 1 << 30
T0_US = 1_700_000_000_000_000




@pytest.fixture
def scenario_path(tmp_path: Path) -> Path:
    return tmp_path / "scenario.txt"


@dataclass
class Worker:
    pid: int
    cgroup: str  # as /proc/PID/cgroup shows it, "/carbond-test-…/a"

    @property
    def consumer(self) -> str:
        return "cgroup:" + self.cgroup.strip("/")


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Two sleeping children, each in its own new cgroup v2 group; always cleaned up."""
    if not os.access(UNIFIED, os.W_OK):
        pytest.skip(f"{UNIFIED} not writable")
    parent = UNIFIED / f"carbond-test-gpu-{uuid.uuid4().hex[:8]}"
    children: list[subprocess.Popen[bytes]] = []
    made: list[Path] = []
    try:
        parent.mkdir()
        made.append(parent)
        result = []
        for name in ("a", "b"):
            group = parent / name
            group.mkdir()
            made.append(group)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            children.append(child)
            (group / "cgroup.procs").write_text(str(child.pid))
            result.append(Worker(child.pid, f"/{parent.name}/{name}"))
        yield result
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for group in reversed(made):
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def two_gpus() -> Scenario:
    return Scenario(gpus=[
        FakeGpu(0, "GPU-11111111-aaaa", "NVIDIA H100 80GB HBM3", energy_millijoules=5_000_000,
                power_milliwatts=300_000),
        FakeGpu(1, "GPU-22222222-bbbb", "NVIDIA H100 80GB HBM3", energy_millijoules=9_000_000,
                power_milliwatts=70_000),
    ])


def test_sm_weights_per_interval_idle_gpu_and_exact_host_energy(
        fake_lib: Path, scenario_path: Path, workers: list[Worker]) -> None:
    """The meter and usage inputs of the split; the split itself, through `carbond run`, is
    tests/test_nvml_daemon.py."""
    a, b = workers
    sc = two_gpus()
    # Memory 1:3 points the other way, so 3:1 weights prove the SM samples were used.
    sc.processes = [FakeProcess(0, a.pid, 1 * GIB), FakeProcess(0, b.pid, 3 * GIB)]
    sc.samples = [*samples_for(0, a.pid, 75, T0_US, 6), *samples_for(0, b.pid, 25, T0_US, 6)]
    sc.write(scenario_path)
    # A fake clock: 10 s pass between reads, as the samples say (up to 200 W, a power a GPU
    # can draw; the meter refuses more than its bound in the time, see test_counter_bounds).
    with Driver(fake_lib, scenario_path, fake_clock=True) as drv:
        assert drv.call("read")["devices"] == {"gpu-0": 0.0, "gpu-1": 0.0}
        drv.call("usage")
        increments = [(1_234_567, 55_555), (2_000_001, 60_001), (987_654, 49_999)]
        ts = T0_US + 10_000_000
        for step, (inc0, inc1) in enumerate(increments):
            sc.gpu(0).energy_millijoules += inc0
            sc.gpu(1).energy_millijoules += inc1
            sc.samples += [*samples_for(0, a.pid, 75, ts, 30), *samples_for(0, b.pid, 25, ts, 30)]
            ts += 10_000_000
            sc.write(scenario_path)
            drv.call("advance", seconds=10)
            host = drv.call("read")["devices"]
            usage = drv.call("usage")
            assert usage["gpu-0"]["basis"] == "sm", step
            assert usage["gpu-1"]["basis"] is None
            assert usage["gpu-0"]["weights"] == {str(a.pid): 75 * 30.0, str(b.pid): 25 * 30.0}
            assert usage["gpu-0"]["consumers"] == {a.consumer: 75 * 30.0, b.consumer: 25 * 30.0}
        assert host["gpu-0"] == pytest.approx(sum(i for i, _ in increments) / 1000, rel=1e-6)
        assert host["gpu-1"] == pytest.approx(sum(i for _, i in increments) / 1000, rel=1e-6)

        gpus = drv.call("gpus")
        assert [(g["device"], g["uuid"], g["name"], g["status"]) for g in gpus] == [
            ("gpu-0", "GPU-11111111-aaaa", "NVIDIA H100 80GB HBM3", "ok"),
            ("gpu-1", "GPU-22222222-bbbb", "NVIDIA H100 80GB HBM3", "ok"),
        ]
        report = drv.call("report")
        assert all(ok for _device, _detail, ok in report)
        assert "550.54.15" in report[0][1]
        assert drv.call("read")["sources"] == [["gpu", "nvml"]]


def test_memory_share_when_no_samples(fake_lib: Path, scenario_path: Path,
                                      workers: list[Worker]) -> None:
    a, b = workers
    sc = two_gpus()
    sc.processes = [FakeProcess(0, a.pid, 1 * GIB), FakeProcess(0, b.pid, 3 * GIB, "graphics")]
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path) as drv:
        usage = drv.call("usage")
        assert usage["gpu-0"]["basis"] == "memory"
        assert usage["gpu-0"]["consumers"] == {a.consumer: 1.0 * GIB, b.consumer: 3.0 * GIB}
        # samples that all show 0 % SM also fall back to memory
        sc.samples = list(samples_for(0, a.pid, 0, T0_US, 3))
        sc.write(scenario_path)
        assert drv.call("usage")["gpu-0"]["basis"] == "memory"


def test_samples_counted_once_per_interval(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.processes = [FakeProcess(0, 3_999_999_001, GIB)]
    sc.samples = list(samples_for(0, 3_999_999_001, 50, T0_US, 4))
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path) as drv:
        assert drv.call("usage")["gpu-0"]["weights"] == {"3999999001": 200.0}
        # nothing new: no samples (NotFound) -> memory share of the running process
        assert drv.call("usage")["gpu-0"] == {
            "basis": "memory", "weights": {"3999999001": float(GIB)}, "gpu_instances": {},
            "consumers": {"other:other": float(GIB)}, "error": ""}
        sc.samples.append(FakeSample(0, 3_999_999_001, T0_US + 9_000_000, 10))
        sc.write(scenario_path)
        assert drv.call("usage")["gpu-0"]["weights"] == {"3999999001": 10.0}


def test_gpu_lost_mid_run_and_back(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"retry_interval_s": 0.0}, fake_clock=True) as drv:
        drv.call("read")
        sc.gpu(0).energy_millijoules += 100_000
        sc.gpu(1).energy_millijoules += 200_000
        sc.write(scenario_path)
        drv.call("advance", seconds=1)
        assert drv.call("read")["devices"] == {"gpu-0": 100.0, "gpu-1": 200.0}

        sc.gpu(1).faults.add("lost")
        for step in range(3):
            sc.gpu(0).energy_millijoules += 10_000
            sc.gpu(1).energy_millijoules += 50_000_000  # spent while lost: unknown to carbond
            sc.write(scenario_path)
            drv.call("advance", seconds=1)
            reading = drv.call("read")
            assert reading["devices"] == {"gpu-0": 100.0 + 10.0 * (step + 1)}
            assert reading["errors"] >= 1
            assert reading["up"] is True
        lost = drv.call("gpus")[1]
        assert (lost["status"], lost["uuid"]) == ("lost", "GPU-22222222-bbbb")
        line = next(r for r in drv.call("report") if r[0] == "gpu-1")
        assert not line[2]
        assert "index 1" in line[1] and "GPU-22222222-bbbb" in line[1] and "lost" in line[1]
        assert drv.call("state")["errors"] >= 3
        assert drv.call("usage").keys() == {"gpu-0"}

        sc.gpu(1).faults.clear()
        sc.write(scenario_path)
        back = drv.call("read")["devices"]
        assert back == {"gpu-0": 130.0, "gpu-1": 200.0}  # continues, no spike
        sc.gpu(1).energy_millijoules += 7_000
        sc.write(scenario_path)
        drv.call("advance", seconds=1)
        assert drv.call("read")["devices"]["gpu-1"] == pytest.approx(207.0)
        assert drv.call("gpus")[1]["status"] == "ok"
        assert all(ok for _d, _detail, ok in drv.call("report"))


def test_lost_gpu_retried_only_every_retry_interval(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.gpu(1).faults.add("lost")  # lost before carbond started: no UUID known yet
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"retry_interval_s": 30.0, "start_sampler": False},
                fake_clock=True) as drv:
        assert drv.call("read")["devices"].keys() == {"gpu-0"}
        line = next(r for r in drv.call("report") if r[0] == "gpu-1")
        assert "index 1" in line[1] and "lost" in line[1]
        sc.gpu(1).faults.clear()
        sc.write(scenario_path)
        drv.call("advance", seconds=10)
        assert drv.call("read")["devices"].keys() == {"gpu-0"}
        drv.call("advance", seconds=25)
        assert drv.call("read")["devices"] == {"gpu-0": 0.0, "gpu-1": 0.0}
        assert drv.call("gpus")[1]["uuid"] == "GPU-22222222-bbbb"


def test_counter_reset_is_not_negative(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.write(scenario_path)
    # A second passes before each read: 3 J in the fraction of a millisecond a real clock
    # would show is beyond any GPU (an error sample, tests/test_counter_bounds_nvml.py).
    with Driver(fake_lib, scenario_path, fake_clock=True) as drv:
        drv.call("read")
        sc.gpu(0).energy_millijoules += 3_000
        sc.write(scenario_path)
        drv.call("advance", seconds=1)
        assert drv.call("read")["devices"]["gpu-0"] == 3.0
        sc.gpu(0).energy_millijoules = 1_000  # driver reloaded: 1 J since it restarted from 0
        sc.write(scenario_path)
        drv.call("advance", seconds=1)
        reading = drv.call("read")
        assert reading["devices"]["gpu-0"] == 4.0
        assert reading["resets"] == {"gpu-0": 1} and reading["wraps"] == {}
        sc.gpu(0).energy_millijoules = 1_500
        sc.write(scenario_path)
        drv.call("advance", seconds=1)
        assert drv.call("read")["devices"]["gpu-0"] == 4.5


def test_energy_not_supported_integrates_power(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.gpu(0).faults.add("energy_not_supported")
    sc.gpu(0).power_milliwatts = 200_000
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"start_sampler": False}, fake_clock=True) as drv:
        assert drv.call("read")["devices"]["gpu-0"] == 0.0
        for watts in (200, 200, 300, 100):  # one sample per second
            drv.call("advance", seconds=1.0)
            sc.gpu(0).power_milliwatts = watts * 1000
            sc.write(scenario_path)
            drv.call("sample_power")
        # trapezoids: 200, 200, 250, 200
        assert drv.call("read")["devices"]["gpu-0"] == pytest.approx(850.0)
        line = next(r for r in drv.call("report") if r[0] == "gpu-0")
        assert "power integration" in line[1] and line[2]
        assert drv.call("gpus")[0]["method"] == "power integration"


def test_power_sampler_thread_runs_between_reads_and_stops(fake_lib: Path,
                                                           scenario_path: Path) -> None:
    sc = two_gpus()
    sc.gpu(0).faults.add("energy_not_supported")
    sc.gpu(0).power_milliwatts = 100_000
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"power_interval_s": 0.05}) as drv:
        assert "carbond-nvml-power" in drv.call("state")["threads"]
        start = time.monotonic()
        drv.call("read")
        time.sleep(0.3)
        sc.gpu(0).power_milliwatts = 400_000
        sc.write(scenario_path)
        switched = time.monotonic()
        time.sleep(1.2)
        joules = drv.call("read")["devices"]["gpu-0"]
        end = time.monotonic()
        # Sampling at reads only would give (100 + 400) / 2 W x 1.5 s = 375 J.
        expected = 100 * (switched - start) + 400 * (end - switched)
        assert joules == pytest.approx(expected, abs=60)
        closed = drv.call("close")
        assert closed["seconds"] < 2.0
        assert "carbond-nvml-power" not in closed["threads"]


@pytest.mark.parametrize(("fault", "status"), [
    ("power_not_supported energy_not_supported", "not supported"),
    ("energy_no_permission power_not_supported", "no permission"),
])
def test_gpu_without_any_energy_source_is_down(fake_lib: Path, scenario_path: Path, fault: str,
                                               status: str) -> None:
    sc = two_gpus()
    sc.gpu(1).faults.update(fault.split())
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"start_sampler": False}) as drv:
        reading = drv.call("read")
        assert reading["devices"].keys() == {"gpu-0"}
        assert reading["up"] is True
        info = drv.call("gpus")[1]
        assert info["status"] == status and info["reason"]
        assert drv.call("state")["errors"] >= 1


def test_no_v3_symbols_still_attribute_per_process(fake_lib_no_v3: Path, scenario_path: Path,
                                                   workers: list[Worker]) -> None:
    a, b = workers
    sc = two_gpus()
    sc.processes = [FakeProcess(0, a.pid, 1 * GIB), FakeProcess(0, b.pid, 3 * GIB)]
    sc.write(scenario_path)
    with Driver(fake_lib_no_v3, scenario_path) as drv:
        usage = drv.call("usage")["gpu-0"]
        assert usage["basis"] == "memory"
        assert usage["error"] == ""
        assert usage["consumers"] == {a.consumer: 1.0 * GIB, b.consumer: 3.0 * GIB}
        assert drv.call("state")["usage_errors"] == 0


def test_mig_instances_share_parent_energy(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.gpu(0).mig = True
    sc.migs = [FakeMig(0, 0, "MIG-aaaa", 1), FakeMig(0, 2, "MIG-bbbb", 2)]
    sc.processes = [FakeProcess(0, 5001, 2 * GIB, gpu_instance=1, compute_instance=0),
                    FakeProcess(0, 5002, 6 * GIB, gpu_instance=2, compute_instance=0)]
    sc.samples = list(samples_for(0, 5001, 90, T0_US, 3))  # not reported in MIG mode
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path) as drv:
        info = drv.call("gpus")[0]
        assert info["mig_enabled"] is True
        assert [(m["slot"], m["uuid"], m["gpu_instance_id"]) for m in info["mig_instances"]] == [
            (0, "MIG-aaaa", 1), (2, "MIG-bbbb", 2)]
        usage = drv.call("usage")["gpu-0"]
        assert usage["basis"] == "memory"
        assert usage["weights"] == {"5001": 2.0 * GIB, "5002": 6.0 * GIB}
        assert usage["gpu_instances"] == {"5001": 1, "5002": 2}
        assert "MIG enabled (2 instance(s))" in drv.call("report")[1][1]


def test_missing_library_leaves_meter_down(scenario_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("a real libnvidia-ml is installed here")
    two_gpus().write(scenario_path)
    with Driver(None, scenario_path) as drv:
        reading = drv.call("read")
        assert reading == {"devices": {}, "sources": [], "errors": 0, "wraps": {},
                           "resets": {}, "up": False}
        (line,) = drv.call("report")
        assert line[0] == "nvml" and not line[2]
        assert "libnvidia-ml.so.1 not found" in line[1]
        assert drv.call("gpus") == []
        assert drv.call("usage") == {}


def test_driver_not_loaded_then_loaded(fake_lib: Path, scenario_path: Path) -> None:
    sc = two_gpus()
    sc.driver_not_loaded = True
    sc.write(scenario_path)
    with Driver(fake_lib, scenario_path, {"retry_interval_s": 0.0}) as drv:
        state = drv.call("state")
        assert state["reason"] == "NVIDIA driver not loaded" and state["up"] is False
        assert drv.call("report") == [["nvml", "NVIDIA driver not loaded", False]]
        sc.driver_not_loaded = False
        sc.write(scenario_path)
        assert drv.call("read")["devices"] == {"gpu-0": 0.0, "gpu-1": 0.0}
