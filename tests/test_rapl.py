"""RAPL meter against fake powercap trees: classification, wrap, reset, faults."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.meters.base import EnergyCounter
from carbond.meters.rapl import RaplMeter, discover
from tests import powercap


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking:
    """A second passes between any two looks at the clock: the energies these tests feed are
    then powers a zone can draw (a real clock makes 7 J in a millisecond, 7 kW, impossible)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def devices(meter: RaplMeter) -> dict[str, float]:
    return {d.device: d.joules for d in meter.read().devices}


def test_intel_two_socket_counts_packages_dram_and_psys_once(tmp_path):
    powercap.intel_two_socket(str(tmp_path))
    counted = {z.device: z.component for z in discover(str(tmp_path)) if z.device}
    assert counted == {
        "package-0": "cpu", "package-1": "cpu",
        "dram-0": "dram", "dram-1": "dram", "psys": "platform",
    }


def test_dram_takes_its_socket_from_the_parent_package_not_the_index(tmp_path):
    tree = powercap.intel_two_socket(str(tmp_path))
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    tree.zones["intel-rapl:0:2"].advance_uj(7_000_000)  # under intel-rapl:0, which is package-1
    assert devices(meter)["dram-1"] == pytest.approx(7.0)


def test_amd_skips_per_core_zones(tmp_path):
    powercap.amd_epyc(str(tmp_path))
    counted = sorted(z.device for z in discover(str(tmp_path)) if z.device)
    assert counted == ["package-0", "package-1"]


def test_laptop_has_package_and_psys_and_ignores_mmio(tmp_path):
    powercap.laptop(str(tmp_path))
    zones = discover(str(tmp_path))
    assert sorted(z.device for z in zones if z.device) == ["package-0", "psys"]
    assert any("mmio" in z.why_skipped for z in zones)


def test_empty_tree_gives_no_sample_and_says_so(tmp_path):
    powercap.empty(str(tmp_path))
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    assert meter.read().devices == []
    assert not meter.up()
    assert "no powercap zones" in meter.report()[0].detail


def test_missing_root_is_not_an_error(tmp_path):
    meter = RaplMeter(str(tmp_path / "absent"))
    assert meter.read().devices == []


def test_core_uncore_and_mmio_never_add_to_the_package(tmp_path):
    tree = powercap.intel_two_socket(str(tmp_path))
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    for zone_id in ("intel-rapl:1:0", "intel-rapl:1:1", "intel-rapl-mmio:0"):
        tree.zones[zone_id].advance_uj(50_000_000)
    tree.zones["intel-rapl:1"].advance_uj(3_000_000)
    assert devices(meter)["package-0"] == pytest.approx(3.0)


def test_wrap_is_taken_modulo_range_plus_one(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=1_000_000, energy_uj=900_000)
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    zone.advance_uj(300_000)  # 900000 -> 199999 after passing 1000000
    reading = meter.read()
    assert reading.devices[0].joules == pytest.approx(0.3, abs=1e-9)
    assert reading.wraps == {"package-0": 1}


def test_wraps_on_consecutive_ticks(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=999, energy_uj=0)
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    total_wraps = 0
    for _ in range(5):
        zone.advance_uj(900)
        total_wraps += sum(meter.read().wraps.values())
    assert devices(meter)["package-0"] == pytest.approx(4500e-6, abs=1e-12)
    assert total_wraps == 4


def test_missing_range_treats_decrease_as_reset_without_spike(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=None, energy_uj=5_000_000)
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    zone.set_uj(6_000_000)
    assert devices(meter)["package-0"] == pytest.approx(1.0)
    zone.set_uj(250_000)  # reset: counter restarted from 0
    reading = meter.read()
    assert reading.resets == {"package-0": 1} and reading.wraps == {}
    assert reading.devices[0].joules == pytest.approx(1.25)  # energy since the reset, no spike
    zone.set_uj(1_250_000)
    assert devices(meter)["package-0"] == pytest.approx(2.25)


def test_unreadable_zone_gives_no_sample_and_counts_an_error(tmp_path):
    tree = powercap.intel_two_socket(str(tmp_path))
    meter = RaplMeter(str(tmp_path), clock=Ticking())
    meter.read()
    tree.zones["intel-rapl:0"].make_unreadable()
    tree.zones["intel-rapl:1"].advance_uj(2_000_000)
    reading = meter.read()
    found = {d.device: d.joules for d in reading.devices}
    assert "package-1" not in found
    assert found["package-0"] == pytest.approx(2.0)
    assert reading.errors == 1 and meter.errors_total == 1
    assert any(not line.ok and line.device == "package-1" for line in meter.report())
    # readable again: the energy accumulated meanwhile is counted, never lost or negative
    tree.zones["intel-rapl:0"].make_readable()
    tree.zones["intel-rapl:0"].advance_uj(4_000_000)
    assert devices(meter)["package-1"] == pytest.approx(4.0)


def test_zones_vanishing_and_appearing_cause_no_crash(tmp_path):
    clock = FakeClock()
    tree = powercap.intel_two_socket(str(tmp_path))
    meter = RaplMeter(str(tmp_path), clock=clock)
    meter.read()
    tree.zones["intel-rapl:0"].advance_uj(1_000_000)
    tree.remove("intel-rapl:2")  # psys gone
    first = devices(meter)
    assert "psys" not in first and first["package-1"] == pytest.approx(1.0)
    clock.now += 1
    assert "psys" not in devices(meter)
    tree.add("intel-rapl:2", "psys", energy_uj=123_000_000)  # back, with a new counter
    clock.now += 120
    meter.read()  # rediscovered: baseline, no spike
    tree.zones["intel-rapl:2"].advance_uj(2_000_000)
    assert devices(meter)["psys"] == pytest.approx(2.0)


def test_report_names_range_and_readability(tmp_path):
    powercap.intel_two_socket(str(tmp_path))
    lines = {line.device: line for line in RaplMeter(str(tmp_path)).report()}
    assert lines["package-0"].ok
    assert str(powercap.INTEL_PACKAGE_RANGE_UJ) in lines["package-0"].detail
    assert "included in its package" in lines["core"].detail


@settings(max_examples=200, deadline=None)
@given(
    range_uj=st.integers(min_value=1_000, max_value=2**40),
    start_fraction=st.floats(min_value=0, max_value=1),
    fractions=st.lists(st.floats(min_value=0, max_value=0.999), max_size=60),
)
def test_counter_total_equals_true_increments(range_uj, start_fraction, fractions):
    """For any increments below the range, the cumulative total is exact (1 uJ)."""
    counter = EnergyCounter(range_uj)
    raw = int(start_fraction * range_uj)
    counter.update(raw)
    true_total = 0
    for fraction in fractions:
        increment = int(fraction * range_uj)
        true_total += increment
        raw = (raw + increment) % (range_uj + 1)
        before = counter.total_units
        counter.update(raw)
        assert counter.total_units >= before  # never backwards
    assert abs(counter.total_units - true_total) <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=50))
def test_counter_without_range_never_goes_backwards(raws):
    counter = EnergyCounter(None)
    previous = 0
    for raw in raws:
        counter.update(raw)
        assert counter.total_units >= previous
        previous = counter.total_units


def test_meter_through_real_files_matches_increments_with_wraps(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=10_000_000, energy_uj=9_500_000)
    clock = Clock()
    meter = RaplMeter(str(tmp_path), clock=clock)
    meter.read()
    increments = [600_000, 9_999_999, 1, 5_000_000, 9_000_000]
    for increment in increments:
        clock.now += 5.0  # one tick: each increment is a plausible power
        zone.advance_uj(increment)
        meter.read()
    assert os.path.exists(zone.path)
    assert devices(meter)["package-0"] == pytest.approx(sum(increments) / 1e6, abs=1e-6)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_drop_to_zero_is_a_reset_not_a_71_wh_wrap(tmp_path):
    """Issue 14: a package counter re-created at 0 with max_energy_range_uj present was taken
    for a wrap: +257 kJ in one 2 s tick at 40 W."""
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", energy_uj=5_000_000)
    clock = Clock()
    meter = RaplMeter(str(tmp_path), clock=clock)
    meter.read()
    clock.now += 2.0
    zone.advance_uj(80_000_000)  # 40 W for 2 s
    assert devices(meter)["package-0"] == pytest.approx(80.0)
    clock.now += 2.0
    zone.set_uj(60_000_000)  # re-created: 60 J since, 20 J lost before it; never 257 kJ
    reading = meter.read()
    assert reading.resets == {"package-0": 1} and reading.wraps == {}
    assert reading.devices[0].joules == pytest.approx(140.0)


def test_a_plausible_wrap_stays_a_wrap_and_constraints_bound_it(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=1_000_000_000,
                    energy_uj=999_000_000)
    with open(os.path.join(zone.path, "constraint_0_max_power_uw"), "w") as handle:
        handle.write("100000000\n")  # 100 W: a wrap may imply at most 200 W
    clock = Clock()
    meter = RaplMeter(str(tmp_path), clock=clock)
    meter.read()
    clock.now += 1.0
    zone.advance_uj(150_000_000)  # 150 W over 1 s, through the wrap
    reading = meter.read()
    assert reading.wraps == {"package-0": 1}
    assert reading.devices[0].joules == pytest.approx(150.0)
    clock.now += 1.0
    zone.set_uj(10_000_000)  # would be a 990 J wrap in 1 s: over 200 W, so a reset
    reading = meter.read()
    assert reading.resets == {"package-0": 1}
    assert reading.devices[0].joules == pytest.approx(160.0)


@given(st.lists(st.tuples(st.integers(0, 2**32), st.floats(0.001, 100)), max_size=40))
def test_counter_with_a_power_bound_never_goes_backwards(steps):
    counter = EnergyCounter(2**32 - 1, max_units_per_second=1e9)
    now, previous = 0.0, 0
    for raw, elapsed in steps:
        now += elapsed
        counter.update(raw, now)
        assert counter.total_units >= previous
        previous = counter.total_units
