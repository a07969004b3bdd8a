"""The ACPI power meter in hwmon, on fake hwmon trees: discovery in both sysfs layouts, power
that changes, integration with gaps made visible, a file that vanishes, garbage."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.meters.acpi import AcpiMeter, discover, parse_microwatts
from carbond.meters.integrate import ReadingError
from tests.helpers import wait_for
from tests.hwmon import FakeHwmon


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def joules(meter: AcpiMeter) -> float | None:
    devices = meter.read().devices
    assert len(devices) <= 1
    if not devices:
        return None
    (device,) = devices
    assert (device.device, device.component, device.source) == ("platform", "platform", "acpi")
    return device.joules


@pytest.fixture
def hwmon(tmp_path) -> FakeHwmon:
    fake = FakeHwmon(str(tmp_path / "hwmon"))
    fake.add(0, "acpitz", power_file=None, interval_ms=None)  # a thermal zone, not a meter
    fake.add(1, "coretemp", power_file=None, interval_ms=None)
    return fake


def stepped(meter: AcpiMeter, clock: Clock, seconds: float, step: float = 1.0) -> None:
    for _ in range(round(seconds / step)):
        clock.now += step
        meter.sample()


@pytest.mark.parametrize("legacy", [False, True])
def test_found_in_either_sysfs_layout(hwmon, legacy) -> None:
    hwmon.add(2, "power_meter", legacy=legacy, interval_ms=500)
    (found,) = discover(hwmon.root)
    assert found.hwmon == "hwmon2"
    assert found.directory.endswith("device") == legacy
    assert found.power_file == "power1_average" and found.interval_ms == 500
    assert found.sample_seconds == 0.5


def test_power1_input_is_integrated_as_instantaneous_samples(hwmon) -> None:
    power = hwmon.add(2, "power_meter", power_file="power1_input", watts=100.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    clock.now += 1.0
    power.set_watts(300.0)
    meter.sample()
    assert joules(meter) == pytest.approx(200.0)  # trapezoid: (100 + 300) / 2 x 1 s


def test_changing_power_integrates_to_the_energy_drawn(hwmon) -> None:
    power = hwmon.add(2, "power_meter", watts=1000.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    assert joules(meter) == 0.0 and meter.up()  # the first sample is the baseline
    stepped(meter, clock, 10)
    assert joules(meter) == pytest.approx(10_000.0)
    power.set_watts(400.0)  # each power1_average is the mean of the second before it
    stepped(meter, clock, 5)
    assert joules(meter) == pytest.approx(12_000.0)
    # between samples the tick gets the energy up to now, at the last power
    clock.now += 0.5
    assert joules(meter) == pytest.approx(12_200.0)
    meter.close()


def test_a_vanished_file_is_an_error_then_a_visible_gap(hwmon) -> None:
    power = hwmon.add(2, "power_meter", watts=500.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    stepped(meter, clock, 4)
    before = joules(meter)
    assert before == pytest.approx(2000.0)
    power.vanish()
    stepped(meter, clock, 10)  # ten failed samples, 10 s without power
    reading = meter.read()
    assert reading.devices == [] and not meter.up()  # no fresh sample: down, never zero
    assert reading.errors == 10 and meter.errors_total == 10
    assert "vanished" in meter.last_error
    power.set_watts(500.0)
    stepped(meter, clock, 1)  # the next sample comes 11 s after the last good one
    stepped(meter, clock, 2)
    after = joules(meter)
    assert after == pytest.approx(before + 1000.0)  # the gap is not integrated across
    (line,) = meter.report()
    assert line.ok and "1 sampling gaps (11.0 s" in line.detail
    assert "10 failed samples" in line.detail


def test_a_short_failed_read_is_bridged_and_counted(hwmon) -> None:
    power = hwmon.add(2, "power_meter", watts=200.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    stepped(meter, clock, 1)
    power.write("garbage\n")
    stepped(meter, clock, 1)
    power.set_watts(200.0)
    stepped(meter, clock, 1)
    assert joules(meter) == pytest.approx(600.0)  # 2 s within the gap bound: bridged
    assert meter.errors_total == 1 and "not a number" in meter.last_error


@pytest.mark.parametrize("text", ["", "abc", "12.5", "-3000000", "nan", "\xff\xfe",
                                  "1" * 30, "0", "200000000000"])
def test_garbage_is_an_error_sample_never_power(hwmon, text) -> None:
    power = hwmon.add(2, "power_meter", watts=100.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    for _ in range(5):
        clock.now += 1.0
        power.write(text)
        meter.sample()
    assert meter.errors_total == 5
    assert meter.read().devices == []  # 5 s without a good sample: past the 3 s bound
    assert meter.report()[0].ok is False


def test_a_fifo_in_place_of_the_power_file_does_not_hang(hwmon) -> None:
    power = hwmon.add(2, "power_meter")
    meter = AcpiMeter(hwmon.root, start_sampler=False)
    os.remove(power.path)
    os.mkfifo(power.path)
    done = threading.Event()
    threading.Thread(target=lambda: (meter.sample(), done.set()), daemon=True).start()
    assert done.wait(10), "a read of a FIFO blocked the sampler"
    assert meter.errors_total == 1


def test_no_meter_is_down_with_the_reason(hwmon) -> None:
    meter = AcpiMeter(hwmon.root, start_sampler=False)
    meter.sample()
    assert meter.read().devices == [] and not meter.up()
    (line,) = meter.report()
    assert not line.ok and "power_meter" in line.detail and hwmon.root in line.detail


def test_a_meter_that_appears_later_is_found(hwmon) -> None:
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    hwmon.add(3, "power_meter", watts=250.0)
    clock.now += 61.0
    meter.sample()
    clock.now += 1.0
    meter.sample()
    assert joules(meter) == pytest.approx(250.0)


def test_only_the_first_of_several_meters_counts(hwmon) -> None:
    hwmon.add(4, "power_meter", watts=300.0)
    hwmon.add(3, "power_meter", watts=100.0)
    clock = Clock()
    meter = AcpiMeter(hwmon.root, clock=clock, start_sampler=False)
    meter.sample()
    stepped(meter, clock, 2)
    assert joules(meter) == pytest.approx(200.0)  # hwmon3's 100 W
    lines = meter.report()
    assert len(lines) == 2 and "not counted" in lines[1].detail and lines[1].device == "hwmon4"


def test_the_sampler_thread_integrates_real_time_and_stops(hwmon) -> None:
    hwmon.add(2, "power_meter", watts=100.0, interval_ms=500)
    meter = AcpiMeter(hwmon.root)
    try:
        assert meter.sample_seconds == 0.5
        assert wait_for(lambda: (joules(meter) or 0.0) > 100.0, timeout=30)
        assert any(t.name == "carbond-acpi-sampler" for t in threading.enumerate())
    finally:
        meter.close()
    assert wait_for(lambda: not any(t.name == "carbond-acpi-sampler"
                                    for t in threading.enumerate()), timeout=10)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(0.05, 5.0), st.floats(0.0, 3000.0) | st.none()),
                min_size=1, max_size=60),
       st.lists(st.floats(0.0, 3.0), min_size=1, max_size=60))
def test_what_the_tick_sees_never_goes_backwards(tmp_path_factory, steps, reads) -> None:
    """Any sequence of power (None: a failed read) and of read times between samples: the
    cumulative joules handed to the tick never decrease and are never NaN."""
    fake = FakeHwmon(str(tmp_path_factory.mktemp("hwmon")))
    power = fake.add(0, "power_meter")
    clock = Clock()
    meter = AcpiMeter(fake.root, clock=clock, start_sampler=False)
    last = 0.0
    for (seconds, watts), pause in zip(steps, reads * len(steps), strict=False):
        clock.now += seconds
        if watts is None:
            power.write("x")
        else:
            power.set_watts(max(watts, 0.001))
        meter.sample()
        clock.now += pause / 10
        value = joules(meter)
        if value is not None:
            assert value >= last
            last = value


def test_parse_microwatts() -> None:
    assert parse_microwatts("1000000000\n") == 1000.0
    for text in ("x", "-1", "0", str(10**12)):
        with pytest.raises(ReadingError):
            parse_microwatts(text)
