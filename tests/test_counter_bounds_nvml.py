"""Issue 21 item 2 for NVML: an energy counter increase implying more than twice the GPU's
enforced power limit (5 kW when it has none), or a power sample no GPU can draw, is an error
sample: counted, never energy, and the next good value continues from the last good one.
Through the real pynvml against the stand-in libnvidia-ml.so.1 (tests/fakes/nvml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fakes.nvml import Driver, FakeGpu, Scenario

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to build fake")

START_MJ = 5_000_000


def one_gpu(limit_watts: int = 0, **faults: bool) -> Scenario:
    gpu = FakeGpu(0, "GPU-33333333-cccc", "NVIDIA H100 80GB HBM3", energy_millijoules=START_MJ,
                  power_milliwatts=100_000, power_limit_milliwatts=limit_watts * 1000)
    gpu.faults.update(name for name, on in faults.items() if on)
    return Scenario(gpus=[gpu])


def test_an_energy_jump_beyond_twice_the_power_limit_is_an_error(tmp_path: Path,
                                                                 fake_lib: Path) -> None:
    """300 W enforced: at most 600 W, 600 J in 1 s."""
    path = tmp_path / "scenario.txt"
    sc = one_gpu(limit_watts=300)
    sc.write(path)
    with Driver(fake_lib, path, fake_clock=True) as drv:
        assert drv.call("read")["devices"] == {"gpu-0": 0.0}
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules = START_MJ + 1_000_000  # 1 kJ in 1 s: a glitch
        sc.write(path)
        bad = drv.call("read")
        assert bad["devices"] == {} and bad["errors"] == 1 and bad["resets"] == {}
        assert drv.call("gpus")[0]["status"] == "ok"  # an error sample, not a GPU down
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules = START_MJ + 500_000  # 500 J over 2 s: 250 W
        sc.write(path)
        good = drv.call("read")
        assert good["devices"] == {"gpu-0": pytest.approx(500.0)} and good["errors"] == 0
        assert drv.call("state")["errors"] == 1


def test_without_a_power_limit_a_few_kilowatts_bound_it(tmp_path: Path, fake_lib: Path) -> None:
    path = tmp_path / "scenario.txt"
    sc = one_gpu()  # the enforced limit is not supported: 5 kW
    sc.write(path)
    with Driver(fake_lib, path, fake_clock=True) as drv:
        drv.call("read")
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules += 4_000_000  # 4 kW for a second: possible
        sc.write(path)
        assert drv.call("read")["devices"] == {"gpu-0": pytest.approx(4000.0)}
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules += 6_000_000  # 6 kW: not
        sc.write(path)
        assert drv.call("read")["devices"] == {}


def test_a_driver_reload_to_an_impossible_value_is_an_error_then_picked_up(
        tmp_path: Path, fake_lib: Path) -> None:
    """A decrease is a reset whose new value is the energy since: only if it could have been
    drawn. A counter that goes on plausibly from there is taken as restarted."""
    path = tmp_path / "scenario.txt"
    sc = one_gpu(limit_watts=300)
    sc.gpu(0).energy_millijoules = 900_000_000
    sc.write(path)
    with Driver(fake_lib, path, fake_clock=True) as drv:
        drv.call("read")
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules = 400_000_000  # "400 kJ since a reload", in 1 s
        sc.write(path)
        assert drv.call("read")["devices"] == {}
        drv.call("advance", seconds=1)
        sc.gpu(0).energy_millijoules += 200_000  # 200 W from there
        sc.write(path)
        picked_up = drv.call("read")
        assert picked_up["devices"] == {"gpu-0": pytest.approx(200.0)}
        assert picked_up["resets"] == {"gpu-0": 1}


def test_an_impossible_power_sample_is_not_integrated(tmp_path: Path, fake_lib: Path) -> None:
    path = tmp_path / "scenario.txt"
    sc = one_gpu(limit_watts=350, energy_not_supported=True)
    sc.gpu(0).power_milliwatts = 200_000
    sc.write(path)
    with Driver(fake_lib, path, {"start_sampler": False}, fake_clock=True) as drv:
        assert drv.call("read")["devices"] == {"gpu-0": 0.0}
        drv.call("advance", seconds=1)
        sc.gpu(0).power_milliwatts = 4_294_967_295  # UINT_MAX mW: 4.3 MW
        sc.write(path)
        drv.call("sample_power")
        assert drv.call("state")["errors"] == 1
        drv.call("advance", seconds=1)
        sc.gpu(0).power_milliwatts = 200_000
        sc.write(path)
        reading = drv.call("read")
        # one trapezoid of 2 s at 200 W from the last good sample; the bad one left out
        assert reading["devices"] == {"gpu-0": pytest.approx(400.0)}
        assert drv.call("gpus")[0]["status"] == "ok"
