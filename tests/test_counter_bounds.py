"""Issue 21 item 2: impossible counter values are error samples, never energy.

One read of `energy_uj` = 2**64 added 1.8e13 J to package-0 for good; `1_000_000_000` parsed as
a number. A raw value outside 0..max_energy_range_uj, one that is not the kernel's plain
decimal, or one implying more energy than the zone can draw since the last good reading is
counted in the meter's errors, and the next good reading continues from the last good one.
RAPL through fake powercap trees; the pure counter through hypothesis.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.meters.base import ERROR, EnergyCounter, parse_counter
from carbond.meters.rapl import CEILING_WATTS, RaplMeter
from tests import powercap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def one_zone(tmp_path, energy_uj: int = 5_000_000, range_uj: int | None =
             powercap.INTEL_PACKAGE_RANGE_UJ, max_watts: int | None = None):
    tree = powercap.FakePowercap(str(tmp_path))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=range_uj, energy_uj=energy_uj)
    if max_watts is not None:
        zone.set_constraint_uw(max_watts * 1_000_000)
    clock = Clock()
    meter = RaplMeter(str(tmp_path), clock=clock)
    assert meter.read().devices[0].joules == 0.0  # the baseline
    return zone, meter, clock


def package(reading) -> float | None:
    found = {d.device: d.joules for d in reading.devices}
    return found.get("package-0")


def test_a_value_beyond_max_energy_range_is_an_error_never_energy(tmp_path) -> None:
    zone, meter, clock = one_zone(tmp_path)
    clock.now += 1
    zone.write_raw(b"18446744073709551616\n")
    bad = meter.read()
    assert package(bad) is None and bad.errors == 1 and meter.errors_total == 1
    clock.now += 1
    zone.advance_uj(40_000_000)  # the counter's true value goes on from 5 J
    good = meter.read()
    assert package(good) == pytest.approx(40.0) and good.errors == 0
    assert meter.up()


@pytest.mark.parametrize("raw", [
    b"1_000_000_000\n", b"+5000001\n", b" 5000001\n", b"5000001 \n", b"0x10\n",
    b"-1000000000000\n", b"5000001\n\n", b"", b"\n", b"\xd9\xa3\n", b"5e6\n", b"5000001\x00",
    b"9" * 40 + b"\n",
])
def test_a_value_that_is_not_plain_decimal_is_an_error(tmp_path, raw: bytes) -> None:
    zone, meter, clock = one_zone(tmp_path)
    clock.now += 1
    zone.write_raw(raw)
    bad = meter.read()
    assert package(bad) is None and bad.errors == 1
    clock.now += 1
    zone.advance_uj(3_000_000)
    assert package(meter.read()) == pytest.approx(3.0)


def test_an_increase_beyond_what_the_zone_can_draw_is_an_error(tmp_path) -> None:
    """100 W constraint: at most 200 W. 300 J in 1 s is a glitch; the baseline stays."""
    zone, meter, clock = one_zone(tmp_path, max_watts=100)
    clock.now += 1
    zone.write_raw(b"305000000\n")
    bad = meter.read()
    assert package(bad) is None and bad.errors == 1
    clock.now += 1
    zone.advance_uj(50_000_000)  # 50 J over the 2 s since the last good reading
    good = meter.read()
    assert package(good) == pytest.approx(50.0) and good.resets == {} and good.wraps == {}


def test_without_a_constraint_the_ceiling_bounds_an_increase(tmp_path) -> None:
    zone, meter, clock = one_zone(tmp_path)
    clock.now += 2
    zone.advance_uj(int(CEILING_WATTS * 2 * 1e6))  # exactly the ceiling: possible
    assert package(meter.read()) == pytest.approx(2 * CEILING_WATTS)
    clock.now += 2
    zone.advance_uj(int(CEILING_WATTS * 2 * 1e6) + 1_000_000)  # above it: not
    assert package(meter.read()) is None and meter.errors_total == 1


def test_a_reset_to_more_than_the_zone_could_have_drawn_is_an_error(tmp_path) -> None:
    """A drop that is no plausible wrap was a reset adding the whole new value (150 kJ here,
    in 1 s); now the value must itself be drawable since the last good reading."""
    zone, meter, clock = one_zone(tmp_path, energy_uj=200_000_000_000)
    clock.now += 1
    zone.set_uj(150_000_000_000)
    bad = meter.read()
    assert package(bad) is None and bad.errors == 1 and bad.resets == {}
    clock.now += 1
    zone.advance_uj(30_000_000)  # it goes on from there: a counter restarted elsewhere
    picked_up = meter.read()
    assert picked_up.resets == {"package-0": 1}
    assert package(picked_up) == pytest.approx(30.0)  # only what was drawn since the restart
    clock.now += 1
    zone.advance_uj(10_000_000)
    assert package(meter.read()) == pytest.approx(40.0)


def test_a_plausible_reset_still_counts_the_energy_since(tmp_path) -> None:
    zone, meter, clock = one_zone(tmp_path, energy_uj=200_000_000_000)
    clock.now += 5
    zone.set_uj(2_000_000)  # re-created, 2 J since
    reading = meter.read()
    assert reading.resets == {"package-0": 1} and package(reading) == pytest.approx(2.0)


def test_one_warning_per_run_of_impossible_values(tmp_path, caplog) -> None:
    zone, meter, clock = one_zone(tmp_path)
    for _ in range(3):
        clock.now += 1
        zone.write_raw(b"18446744073709551616\n")
        meter.read()
    assert meter.errors_total == 3
    warnings = [r for r in caplog.records if "error sample" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(("raw", "value"), [(b"0", 0), (b"0\n", 0), (b"123\n", 123),
                                            (b"18446744073709551615\n", 2**64 - 1)])
def test_plain_decimal_parses(raw: bytes, value: int) -> None:
    assert parse_counter(raw) == value


# -- hypothesis: whatever the file says, the total never goes back or jumps past the bound -----

RANGE = 1_000_000_000
WATTS = 200.0
UNITS_PER_SECOND = WATTS * 1e6

_RAW = st.one_of(
    st.integers(-2**70, 2**70).map(lambda n: f"{n}\n".encode()),
    st.integers(0, RANGE).map(lambda n: f"{n}\n".encode()),
    st.integers(0, RANGE).map(lambda n: f"{n}".encode()),
    st.binary(max_size=24),
    st.sampled_from([b"1_000\n", b"+5\n", b" 5\n", b"0x10\n", b"5\n\n", b"\xd9\xa3\n"]),
)
_STEPS = st.lists(st.tuples(_RAW, st.floats(0.001, 30.0)), max_size=40)


def _check_steps(samples: list[tuple[float, float | None]]) -> None:
    """(time, total or None for no sample): totals never decrease, and between two samples
    grow by at most the bound times the time between them."""
    last: tuple[float, float] | None = None
    for now, total in samples:
        if total is None:
            continue
        if last is not None:
            assert total >= last[1]
            assert total - last[1] <= WATTS * (now - last[0]) + 1e-6
        last = (now, total)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, RANGE), _STEPS)
def test_fuzz_counter_never_backwards_never_beyond_the_bound(start, steps) -> None:
    counter = EnergyCounter(RANGE, UNITS_PER_SECOND)
    now = 0.0
    counter.update(start, now)
    samples: list[tuple[float, float | None]] = [(now, 0.0)]
    for raw, elapsed in steps:
        now += elapsed
        try:
            value = parse_counter(raw)
        except ValueError:
            samples.append((now, None))
            continue
        event = counter.update(value, now)
        samples.append((now, None if event == ERROR else counter.total_units / 1e6))
    _check_steps(samples)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, RANGE), _STEPS)
def test_fuzz_meter_through_real_files(tmp_path_factory, start, steps) -> None:
    root = tmp_path_factory.mktemp("powercap")
    tree = powercap.FakePowercap(str(root))
    zone = tree.add("intel-rapl:0", "package-0", range_uj=RANGE, energy_uj=start)
    zone.set_constraint_uw(int(WATTS / 2 * 1e6))
    clock = Clock()
    meter = RaplMeter(str(root), clock=clock)
    samples = [(clock.now, package(meter.read()))]
    for raw, elapsed in steps:
        clock.now += elapsed
        zone.write_raw(raw)
        samples.append((clock.now, package(meter.read())))
    _check_steps(samples)
    assert meter.errors_total >= sum(1 for _, total in samples if total is None)
