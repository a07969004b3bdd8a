"""Issue 21 item 7: a wall-clock step empties a budget. A month budget at 100 g: the clock +1
day then back gave used 1 g, then 11 g, while a tracker rebuilt from the ledger said 111 g; a
backward step over midnight restarted the previous day at 0. Periods come from the ledger's
rows: a step moves which period a tick lands in, never what a period already holds.

The wall clock is a fake passed to the real ledger and tracker; ticks go ledger first, then
budgets, as the daemon records them."""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.config import Budget
from carbond.ledger.budgets import BudgetTracker
from carbond.ledger.ledger import Ledger
from carbond.types import Consumer
from tests.helpers import tick_record

HOUR, DAY = 3600, 86400
JOB = Consumer("job", "slurm/7")
TICK_SECONDS = 60.0


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tick(ledger: Ledger, tracker: BudgetTracker, clock: Clock, grams: float) -> None:
    record = tick_record(clock.now, TICK_SECONDS, {JOB: {"cpu": 1.0}}, {JOB: grams}, {}, {},
                         300.0, "static")
    ledger.record(record)
    tracker.record(record)


def used(tracker: BudgetTracker) -> dict[str, float]:
    return {s.name: s.used_grams for s in tracker.status()}


def rebuilt(budgets: list[Budget], ledger: Ledger, clock: Clock) -> dict[str, float]:
    """What a restart at this instant would say: a tracker built from the ledger alone."""
    return used(BudgetTracker(budgets, "UTC", ledger, clock=clock))


def test_a_day_forward_and_back_keeps_what_the_month_holds(tmp_path):
    budgets = [Budget("month", {}, "month", 100.0)]
    clock = Clock(at("2024-05-31T12:00:00"))
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        record = tick_record(at("2024-05-10T00:00:00"), TICK_SECONDS, {JOB: {"cpu": 1.0}},
                             {JOB: 100.0}, {}, {}, 300.0, "static")
        ledger.record(record)  # earlier this month, before carbond started
        tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock)
        for _ in range(10):
            clock.now += TICK_SECONDS
            tick(ledger, tracker, clock, 0.1)
        assert used(tracker)["month"] == pytest.approx(101.0)
        clock.now += DAY  # the clock steps into June
        for _ in range(10):
            tick(ledger, tracker, clock, 1.0)
            clock.now += TICK_SECONDS
        assert used(tracker) == pytest.approx({"month": 10.0})  # June's own, none twice
        assert rebuilt(budgets, ledger, clock) == pytest.approx(used(tracker))
        clock.now -= DAY  # and back: May still holds its 101 g
        for _ in range(10):
            tick(ledger, tracker, clock, 1.0)
            clock.now += TICK_SECONDS
        clock.now -= TICK_SECONDS
        assert used(tracker) == pytest.approx({"month": 111.0})
        assert rebuilt(budgets, ledger, clock) == pytest.approx({"month": 111.0})
        clock.now += DAY  # June again: it kept its 10 g too
        tick(ledger, tracker, clock, 1.0)
        assert used(tracker) == pytest.approx({"month": 11.0})
        assert rebuilt(budgets, ledger, clock) == pytest.approx({"month": 11.0})


@pytest.mark.parametrize("restart_after_midnight", [False, True])
def test_a_step_back_over_midnight_continues_the_previous_day(tmp_path,
                                                               restart_after_midnight):
    """The previous day continues from what it held, whether the tracker saw that day (it is
    in memory) or was started after midnight (the day is read from the ledger's rows)."""
    budgets = [Budget("day", {}, "day", 5.0), Budget("week", {}, "week", 50.0)]
    clock = Clock(at("2024-05-01T23:00:00"))
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock)
        for _ in range(55):  # 23:01 .. 23:55 on May 1st: 5.5 g
            clock.now += TICK_SECONDS
            tick(ledger, tracker, clock, 0.1)
        clock.now = at("2024-05-02T00:10:00")
        if restart_after_midnight:
            tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock)
        tick(ledger, tracker, clock, 2.0)
        assert used(tracker) == pytest.approx({"day": 2.0, "week": 7.5})
        clock.now = at("2024-05-01T23:57:00")  # back over midnight
        tick(ledger, tracker, clock, 0.5)
        assert used(tracker) == pytest.approx({"day": 6.0, "week": 8.0})
        assert rebuilt(budgets, ledger, clock) == pytest.approx(used(tracker))
        clock.now = at("2024-05-02T00:20:00")  # forward again: May 2nd still holds 2 g
        tick(ledger, tracker, clock, 1.0)
        assert used(tracker) == pytest.approx({"day": 3.0, "week": 9.0})
        assert rebuilt(budgets, ledger, clock) == pytest.approx(used(tracker))


STEPS = st.lists(
    st.tuples(st.sampled_from([0, 0, 0, HOUR, -HOUR, DAY, -DAY, 7 * DAY, -3 * DAY, 40 * DAY,
                               -40 * DAY]),
              st.integers(1, 6), st.floats(0.0, 10.0), st.booleans()),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 40 * DAY), STEPS)
def test_any_clock_steps_leave_every_period_as_the_ledger_has_it(offset, steps):
    """Whatever the wall clock does between ticks (steps forward and back by an hour, days,
    weeks), the running tracker's used grams are what a tracker rebuilt from the ledger at
    that instant says, for day, week and month budgets."""
    budgets = [Budget("day", {}, "day", 1.0), Budget("week", {}, "week", 1.0),
               Budget("month", {}, "month", 1.0)]
    clock = Clock(at("2024-05-01T00:00:00") + round(offset))
    with tempfile.TemporaryDirectory() as state, Ledger.open(state, clock=clock) as ledger:
        tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock)
        for step, ticks, grams, flush in steps:
            clock.now += step
            for _ in range(ticks):
                clock.now += TICK_SECONDS
                tick(ledger, tracker, clock, grams)
            if flush:
                ledger.flush()
            assert used(tracker) == pytest.approx(rebuilt(budgets, ledger, clock),
                                                  rel=1e-9, abs=1e-9)
