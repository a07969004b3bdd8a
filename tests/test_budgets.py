"""Calendar periods in time zones, budget matching, used from the ledger across restarts, and
the projection arithmetic; embodied carbon sharing."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from carbond.carbon.embodied import SECONDS_PER_YEAR, embodied_grams_per_second, share_embodied
from carbond.config import Budget
from carbond.ledger.budgets import BudgetTracker, matches, projected_grams, window_grams
from carbond.ledger.ledger import Ledger
from carbond.ledger.periods import PERIODS, get_zone, hour_fraction, period_bounds
from carbond.types import IDLE, Consumer
from tests.helpers import tick_record

HOUR, DAY = 3600, 86400
UTC = get_zone("UTC")
BERLIN = get_zone("Europe/Berlin")
KOLKATA = get_zone("Asia/Kolkata")  # UTC+05:30: periods start in the middle of a UTC hour


def at(text: str, zone=UTC) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(instant: float, zone) -> str:
    return datetime.fromtimestamp(instant, zone).isoformat(timespec="seconds")


# ---- periods ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("period", "instant", "start", "end"), [
    ("month", "2024-01-31T23:59:59", "2024-01-01T00:00:00", "2024-02-01T00:00:00"),
    ("month", "2024-02-01T00:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
    ("month", "2024-02-29T12:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),  # leap day
    ("month", "2023-02-28T23:59:59", "2023-02-01T00:00:00", "2023-03-01T00:00:00"),
    ("month", "2024-12-31T23:00:00", "2024-12-01T00:00:00", "2025-01-01T00:00:00"),
    ("day", "2024-02-29T00:00:00", "2024-02-29T00:00:00", "2024-03-01T00:00:00"),
    ("week", "2024-03-03T23:59:59", "2024-02-26T00:00:00", "2024-03-04T00:00:00"),  # Sun
    ("week", "2024-03-04T00:00:00", "2024-03-04T00:00:00", "2024-03-11T00:00:00"),  # Mon
    ("week", "2024-12-31T10:00:00", "2024-12-30T00:00:00", "2025-01-06T00:00:00"),
    ("quarter", "2024-03-31T23:59:59", "2024-01-01T00:00:00", "2024-04-01T00:00:00"),
    ("quarter", "2024-11-15T00:00:00", "2024-10-01T00:00:00", "2025-01-01T00:00:00"),
    ("year", "2024-07-01T00:00:00", "2024-01-01T00:00:00", "2025-01-01T00:00:00"),
])
def test_calendar_periods_in_utc(period, instant, start, end):
    assert period_bounds(period, at(instant), UTC) == (at(start), at(end))


def test_a_leap_year_is_366_days_and_february_29():
    start, end = period_bounds("year", at("2024-06-01T00:00:00"), UTC)
    assert end - start == 366 * DAY
    start, end = period_bounds("month", at("2024-02-10T00:00:00"), UTC)
    assert end - start == 29 * DAY


def test_periods_follow_the_local_calendar_across_dst():
    # Berlin springs forward on 2024-03-31 (23 h day) and falls back on 2024-10-27 (25 h)
    start, end = period_bounds("day", at("2024-03-31T12:00:00", BERLIN), BERLIN)
    assert end - start == 23 * HOUR
    assert local(start, BERLIN) == "2024-03-31T00:00:00+01:00"
    assert local(end, BERLIN) == "2024-04-01T00:00:00+02:00"
    start, end = period_bounds("day", at("2024-10-27T12:00:00", BERLIN), BERLIN)
    assert end - start == 25 * HOUR
    start, end = period_bounds("month", at("2024-03-15T00:00:00", BERLIN), BERLIN)
    assert end - start == 31 * DAY - HOUR  # March loses an hour
    start, end = period_bounds("week", at("2024-10-30T00:00:00", BERLIN), BERLIN)
    assert local(start, BERLIN) == "2024-10-28T00:00:00+01:00"
    # just before local midnight in Berlin is still the previous month, though UTC says so too
    instant = at("2024-01-31T23:30:00", BERLIN)  # 22:30 UTC
    assert local(period_bounds("month", instant, BERLIN)[1], BERLIN) == "2024-02-01T00:00:00+01:00"
    # just after local midnight in Berlin is the new month, while UTC is still in the old one
    instant = at("2024-02-01T00:30:00", BERLIN)  # 2024-01-31 23:30 UTC
    assert period_bounds("month", instant, BERLIN)[0] == at("2024-01-31T23:00:00")
    assert period_bounds("month", instant, UTC)[0] == at("2024-01-01T00:00:00")


def test_half_hour_zone_starts_periods_mid_hour():
    start, _ = period_bounds("day", at("2024-05-02T03:00:00"), KOLKATA)
    assert start == at("2024-05-01T18:30:00")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PERIODS),
       st.floats(at("1990-01-01T00:00:00"), at("2060-01-01T00:00:00")),
       st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata",
                        "Australia/Lord_Howe", "America/Sao_Paulo", "Pacific/Apia"]))
def test_periods_tile_time(period, instant, zone_name):
    """Invariant: each instant lies in exactly one period; periods follow each other without
    gap or overlap; each starts at local midnight (or where a day begins in a DST gap)."""
    zone = get_zone(zone_name)
    start, end = period_bounds(period, instant, zone)
    assert start <= instant < end
    assert period_bounds(period, end, zone)[0] == end
    assert period_bounds(period, start, zone) == (start, end)
    assert period_bounds(period, start - 1e-3, zone)[1] == start
    begins = datetime.fromtimestamp(start, zone)
    assert begins.time().minute == 0 and begins.time().hour in (0, 1)
    assert 23 * HOUR <= (end - start) / {"day": 1, "week": 7, "month": 28, "quarter": 90,
                                         "year": 365}[period] <= 25 * HOUR + 31 * DAY


def test_hour_fraction():
    h = 7200
    assert hour_fraction(h, h, h + HOUR, h + 2 * HOUR) == 1.0
    assert hour_fraction(h, h + 900, h + HOUR, h + 2 * HOUR) == 0.75
    assert hour_fraction(h, h + 900, h + 1800, h + 1800) == 0.5  # observed until h+30min
    assert hour_fraction(h, h + HOUR, h + 2 * HOUR, h + 2 * HOUR) == 0.0
    assert hour_fraction(h, 0, h, h + 2 * HOUR) == 0.0


# ---- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("match", "consumer", "expected"), [
    ({}, ("idle", "idle"), True),
    ({"kind": "job"}, ("job", "slurm/1"), True),
    ({"kind": "job"}, ("user", "slurm/1"), False),
    ({"kind": "user", "consumer": "alice*"}, ("user", "alice-dev"), True),
    ({"kind": "user", "consumer": "alice*"}, ("user", "Alice"), False),  # case matters
    ({"consumer": "docker/[0-9]*"}, ("container", "docker/3f2a"), True),
    ({"project": "climate-*"}, ("project", "climate-model"), True),
    ({"project": "climate-*"}, ("job", "climate-model"), False),
    ({"project": "x", "consumer": "y"}, ("project", "x"), False),
])
def test_matching(match, consumer, expected):
    assert matches(match, consumer) is expected


# ---- used and projected -------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


ALICE = Consumer("user", "alice")
BOB = Consumer("user", "bob")
JOB = Consumer("job", "slurm/7")


def book(ledger: Ledger, wall_time: float, grams: dict[Consumer, float]) -> None:
    ledger.record(tick_record(wall_time, 60.0, {c: {"cpu": 1.0} for c in grams}, grams, {}, {},
                              300.0, "static"))


def test_projection_arithmetic():
    assert projected_grams(10.0, 0.5, 100.0, 120.0) == 20.0
    assert projected_grams(10.0, 0.5, 130.0, 120.0) == 10.0  # past the end: nothing added
    hours = {0: 36.0, HOUR: 72.0}
    assert window_grams(hours, 1800, 2 * HOUR) == pytest.approx(18.0 + 72.0)
    assert window_grams(hours, 1800, HOUR + 1800) == pytest.approx(18.0 + 72.0)


def test_used_comes_from_the_ledger_and_survives_a_restart(tmp_path):
    start = at("2024-05-02T00:00:00")
    clock = Clock(start + 12 * HOUR)
    budgets = [Budget("alice", {"kind": "user", "consumer": "ali*"}, "day", 10.0),
               Budget("users", {"kind": "user"}, "month", 1000.0),
               Budget("jobs", {"kind": "job"}, "day", 1.0)]
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        book(ledger, start - HOUR, {ALICE: 100.0})  # yesterday: in this month, not this day
        for hour in range(12):
            book(ledger, start + hour * HOUR + 1800, {ALICE: 0.5, BOB: 1.0, JOB: 2.0})
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock)
        alice, users, jobs = tracker.status()
    assert (alice.limit_grams, alice.used_grams) == (10.0, pytest.approx(6.0))
    # 6 g in the 12 h since midnight, the same rate for the 12 h left
    assert alice.burn_grams_per_second == pytest.approx(6.0 / (12 * HOUR))
    assert alice.projected_grams == pytest.approx(12.0)
    assert (alice.period_start, alice.period_end) == (start, start + DAY)
    assert users.used_grams == pytest.approx(100.0 + 18.0)
    # busy consumer on a 1 g/day budget: over already, and projected over
    assert jobs.used_grams > jobs.limit_grams and jobs.projected_grams > jobs.limit_grams


def test_burn_rate_uses_the_last_24_hours_of_a_long_period(tmp_path):
    start = at("2024-05-01T00:00:00")
    clock = Clock(start + 10 * DAY)
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        for hour in range(10 * 24):
            rate = 1.0 if hour < 9 * 24 else 4.0  # the last day burns four times as fast
            book(ledger, start + hour * HOUR + 1800, {JOB: rate})
        tracker = BudgetTracker([Budget("jobs", {"kind": "job"}, "month", 1e6)], "UTC", ledger,
                                clock=clock)
    (jobs,) = tracker.status()
    assert jobs.used_grams == pytest.approx(9 * 24 + 4 * 24)
    assert jobs.burn_grams_per_second == pytest.approx(4.0 / HOUR)
    left = at("2024-06-01T00:00:00") - clock.now
    assert jobs.projected_grams == pytest.approx(jobs.used_grams + 4.0 / HOUR * left)


def test_burn_rate_ignores_time_before_the_ledger_began(tmp_path):
    start = at("2024-05-01T00:00:00")
    clock = Clock(start + 15 * DAY + 12 * HOUR)
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        began = start + 15 * DAY + 6 * HOUR
        for minute in range(0, 6 * 60, 5):
            book(ledger, began + minute * 60, {JOB: 1.0})
        tracker = BudgetTracker([Budget("jobs", {}, "month", 1e6)], "UTC", ledger, clock=clock)
    (jobs,) = tracker.status()
    assert jobs.used_grams == pytest.approx(72.0)
    assert jobs.burn_grams_per_second == pytest.approx(72.0 / (clock.now - began))


def test_ticks_add_and_a_new_period_starts_from_zero(tmp_path):
    start = at("2024-05-01T00:00:00")
    clock = Clock(start + 23 * HOUR)
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        book(ledger, start + HOUR, {ALICE: 3.0})
        tracker = BudgetTracker([Budget("a", {"consumer": "alice"}, "day", 5.0)], "UTC",
                                ledger, clock=clock)
        for minute in range(60):  # the tick loop: record, then add
            clock.now = start + 23 * HOUR + minute * 60
            grams = {ALICE: 0.1, BOB: 9.0}
            ledger.record(tick_record(clock.now, 60.0, {c: {"cpu": 1.0} for c in grams}, grams,
                                      {}, {}, 300.0, "static"))
            tracker.add(clock.now, 60.0, grams)
        (a,) = tracker.status()
        assert a.used_grams == pytest.approx(3.0 + 6.0)
        assert a.used_grams > a.limit_grams and a.projected_grams >= a.used_grams
        clock.now = start + DAY + 30
        ledger.record(tick_record(clock.now, 60.0, {ALICE: {"cpu": 1.0}}, {ALICE: 0.25}, {}, {},
                                  300.0, "static"))
        tracker.add(clock.now, 60.0, {ALICE: 0.25})
        (a,) = tracker.status()
        # the tick began 30 s before midnight: half of it is in the new day
        assert a.period_start == start + DAY and a.used_grams == pytest.approx(0.125)
        # a fresh tracker (a restart) agrees with the running one
        (again,) = BudgetTracker([Budget("a", {"consumer": "alice"}, "day", 5.0)], "UTC",
                                 ledger, clock=clock).status()
        assert again.used_grams == pytest.approx(0.125)


def test_a_period_starting_mid_hour_counts_that_hour_in_part(tmp_path):
    # Kolkata's day starts at 18:30 UTC: 10 g booked in the 18:00 UTC hour counts half
    clock = Clock(at("2024-05-01T20:00:00"))
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        book(ledger, at("2024-05-01T18:45:00"), {JOB: 10.0})
        book(ledger, at("2024-05-01T19:30:00"), {JOB: 1.0})
        ledger.flush()
        (day,) = BudgetTracker([Budget("d", {}, "day", 100.0)], "Asia/Kolkata", ledger,
                               clock=clock).status()
    assert day.period_start == at("2024-05-01T18:30:00")
    assert day.used_grams == pytest.approx(5.0 + 1.0)


# ---- embodied -----------------------------------------------------------------------------------


def test_embodied_rate():
    rate = embodied_grams_per_second(1500, 4 * SECONDS_PER_YEAR)
    assert rate * 4 * SECONDS_PER_YEAR == pytest.approx(1_500_000)
    assert embodied_grams_per_second(0, SECONDS_PER_YEAR) == 0.0


@example(1.5, {ALICE: {"cpu": 5e-324}})  # 1.5 * 5e-324 rounds up to 1e-323
@given(st.floats(0, 1e3), st.dictionaries(
    st.sampled_from([ALICE, BOB, JOB, IDLE]),
    st.dictionaries(st.sampled_from(["cpu", "dram", "gpu"]), st.floats(0, 1e6)),
))
def test_embodied_shares_sum_to_the_host_figure(grams, energy):
    shares = share_embodied(grams, energy)
    assert math.fsum(shares.values()) == pytest.approx(grams, rel=1e-9, abs=1e-12)
    total = math.fsum(math.fsum(p.values()) for p in energy.values())
    for consumer, share in shares.items():
        if total > 0:
            assert share == pytest.approx(grams * (math.fsum(energy[consumer].values()) / total))
        else:
            assert consumer == IDLE

