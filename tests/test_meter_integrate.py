"""The pure integration under the platform meters: power gauges and energy counters to
cumulative joules, with gaps, resets, stale counters and absurd readings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.meters.integrate import (
    MAX_PLATFORM_WATTS,
    TRAPEZOID,
    WINDOW_MEAN,
    CounterTrack,
    Freshness,
    PowerIntegrator,
    ReadingError,
    Reported,
    check_joules,
    check_watts,
)


def test_trapezoid_and_window_mean() -> None:
    trapezoid = PowerIntegrator(10.0, TRAPEZOID)
    mean = PowerIntegrator(10.0, WINDOW_MEAN)
    for integrator in (trapezoid, mean):
        integrator.add(0.0, 100.0)
        integrator.add(2.0, 300.0)
    assert trapezoid.joules == pytest.approx(400.0)
    assert mean.joules == pytest.approx(600.0)  # 300 W was the mean of the 2 s before it


def test_a_gap_is_counted_and_not_integrated() -> None:
    integrator = PowerIntegrator(3.0)
    integrator.add(0.0, 100.0)
    integrator.add(1.0, 100.0)
    integrator.add(30.0, 100.0)
    integrator.add(31.0, 100.0)
    assert integrator.joules == pytest.approx(200.0)
    assert (integrator.gaps.count, integrator.gaps.seconds) == (1, 29.0)


def test_joules_at_holds_the_last_power_up_to_the_horizon() -> None:
    integrator = PowerIntegrator(3.0)
    assert integrator.joules_at(0.0, 3.0) is None
    integrator.add(0.0, 100.0)
    integrator.add(1.0, 200.0)
    assert integrator.joules_at(1.5, 3.0) == pytest.approx(150.0 + 100.0)
    assert integrator.joules_at(4.5, 3.0) is None  # no fresh sample: not power
    integrator.restart()
    assert integrator.joules_at(1.5, 3.0) is None


def test_a_counter_tracks_moves_resets_and_estimates_between_moves() -> None:
    track = CounterTrack()
    track.add(0.0, 5_000_000.0, watts=1000.0)  # joules since the BMC started: a baseline
    assert track.joules_at(0.0, 60.0) == 0.0
    track.add(10.0, 5_010_000.0, watts=1000.0)
    assert track.joules == pytest.approx(10_000.0)
    assert track.joules_at(15.0, 60.0) == pytest.approx(15_000.0)
    track.add(20.0, 3_000.0)  # reset (BMC reboot): 3 kJ since then
    assert track.resets == 1 and track.joules == pytest.approx(13_000.0)


def test_a_coarse_counter_without_power_uses_its_own_rate() -> None:
    track = CounterTrack()
    kwh = 3.6e6
    track.add(0.0, 100.000 * kwh)
    track.add(36.0, 100.001 * kwh)  # 3.6 kJ in 36 s: 100 W
    assert track.watts == pytest.approx(100.0)
    assert track.joules_at(54.0, 120.0) == pytest.approx(3600.0 + 1800.0)
    assert track.joules_at(160.0, 120.0) is None


def test_readings_that_do_not_move_go_stale() -> None:
    fresh = Freshness(stale_seconds=60.0)
    assert not fresh.observe(0.0, (1000.0, 50.0))
    assert not fresh.observe(50.0, (1000.0, 51.0))  # counter flat (coarse), power moved
    assert not fresh.observe(100.0, (1000.0, 51.0))
    assert fresh.observe(111.0, (1000.0, 51.0))
    assert fresh.observe(200.0, (1000.0, 51.0))  # stays stale until something moves
    assert not fresh.observe(210.0, (1003.6, 51.0))


def test_an_impossible_counter_move_is_an_error() -> None:
    track = CounterTrack()
    track.add(0.0, 0.0)
    with pytest.raises(ReadingError):
        track.add(1.0, 2 * MAX_PLATFORM_WATTS)
    assert track.joules == 0.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, MAX_PLATFORM_WATTS * 1.01, "5",
                                   None, True])
def test_readings_that_are_not_power(value) -> None:
    with pytest.raises(ReadingError):
        check_watts(value)


@pytest.mark.parametrize("value", [math.nan, -math.inf, -0.5, "1", None, False])
def test_readings_that_are_not_energy(value) -> None:
    with pytest.raises(ReadingError):
        check_joules(value)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.floats(0.01, 30.0), st.floats(0.0, 1e7)), max_size=50))
def test_counter_total_is_the_sum_of_its_rises(steps) -> None:
    """Without resets, the track's total is exactly the counter's rise from its first value,
    whatever the spacing (impossible rises refused and left out)."""
    track = CounterTrack()
    now, raw, first = 0.0, 0.0, None
    accepted = 0.0
    for seconds, rise in steps:
        now += seconds
        try:
            track.add(now, raw + rise)
        except ReadingError:
            continue
        if first is None:
            first = raw + rise
        else:
            accepted += rise
        raw += rise
    assert track.joules == pytest.approx(accepted, rel=1e-9, abs=1e-6)


def test_reported_never_decreases() -> None:
    reported = Reported()
    assert [reported.update(x) for x in (1.0, 3.0, 2.0, 2.5, 4.0)] == [1, 3, 3, 3, 4]
