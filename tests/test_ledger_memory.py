"""Memory bounded by recent consumers (issue 21 defect 8): totals of consumers not booked for
`keep_seconds` leave memory once written, and are read back from the file when the consumer
returns, so its totals continue exactly; across a restart too."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.ledger.ledger import Ledger, connect_readonly
from carbond.types import Consumer, TickRecord

HOUR = 3600
T0 = 1_714_521_600.0 + 600
A = Consumer("job", "slurm/1")
B = Consumer("unit", "b.service")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def book(ledger: Ledger, clock: Clock, wall: float, who: dict[Consumer, float],
         metadata: dict[Consumer, dict[str, str]] | None = None) -> None:
    clock.now = wall
    ledger.record(TickRecord(wall, 60.0, {c: {"cpu": j, "platform": j / 10} for c, j in
                                          who.items()},
                             {c: j / 1e3 for c, j in who.items()},
                             {c: j / 1e6 for c, j in who.items()}, metadata=metadata or {}))


def stored(state: str, consumer: Consumer) -> dict[str, float]:
    conn = connect_readonly(state)
    try:
        return dict(conn.execute(
            "SELECT t.component, t.joules FROM consumer_energy_totals t JOIN consumers c"
            " ON c.id = t.consumer WHERE c.kind = ? AND c.name = ?", consumer).fetchall())
    finally:
        conn.close()


def test_a_consumer_leaves_memory_and_returns_with_its_totals(tmp_path):
    state, clock = str(tmp_path), Clock(T0)
    with Ledger.open(state, clock=clock, keep_seconds=HOUR) as ledger:
        book(ledger, clock, T0, {A: 100.0, B: 1.0}, {A: {"account": "physics"}})
        assert ledger.flush()
        for hour in range(1, 4):  # A ended; B goes on
            book(ledger, clock, T0 + hour * HOUR, {B: 1.0})
            assert ledger.flush()
        assert ledger.consumers_in_memory == 1
        assert A not in ledger.restore().consumer_joules  # only in the file now
        assert ledger.labels(A) == {}
        assert stored(state, A) == {"cpu": 100.0, "platform": 10.0}
        book(ledger, clock, T0 + 4 * HOUR, {A: 5.0, B: 1.0})  # A is back (a job id reused)
        assert ledger.flush()
        totals = ledger.restore()
        assert totals.consumer_joules[A] == {"cpu": 105.0, "platform": 10.5}
        assert totals.consumer_grams[A] == pytest.approx(0.105)
        assert totals.consumer_embodied_grams[A] == pytest.approx(105e-6)
        assert ledger.labels(A) == {"account": "physics"}  # its owner came back with it
        assert stored(state, A) == {"cpu": 105.0, "platform": 10.5}
        book(ledger, clock, T0 + 4 * HOUR + 60, {A: 5.0})  # pending at close
    with Ledger.open(state, clock=clock, keep_seconds=HOUR) as ledger:
        assert ledger.restore().consumer_joules[A] == {"cpu": 110.0, "platform": 11.0}
        assert ledger.restore().host_grams == pytest.approx(0.11 + 0.005)


def test_a_restart_loads_only_recent_consumers_and_finds_the_others(tmp_path):
    state, clock = str(tmp_path), Clock(T0)
    with Ledger.open(state, clock=clock, keep_seconds=HOUR) as ledger:
        book(ledger, clock, T0, {A: 7.0})
        book(ledger, clock, T0 + 3 * HOUR, {B: 1.0})
    with Ledger.open(state, clock=clock, keep_seconds=HOUR) as ledger:
        assert set(ledger.restore().consumer_joules) == {B}
        book(ledger, clock, T0 + 3 * HOUR + 60, {A: 1.0})
        # A is back: the flush reads its stored totals before writing any of its own
        assert ledger.flush()
        assert ledger.restore().consumer_joules[A]["cpu"] == 8.0
    assert stored(state, A)["cpu"] == 8.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([A, B, Consumer("pod", "ns/p")]),
                          st.floats(0, 1e4), st.integers(0, 3 * HOUR),
                          st.sampled_from(["flush", "reopen", "none"])),
                min_size=1, max_size=40),
       st.sampled_from([60.0, HOUR, 1e9]))
def test_totals_in_the_file_equal_what_was_fed_whatever_leaves_memory(ticks, keep):
    """Invariant: however consumers leave memory, return, and the ledger restarts, each
    consumer's stored total is the sum of what was fed for it."""
    with tempfile.TemporaryDirectory() as state:
        clock = Clock(T0)
        fed: dict[Consumer, float] = {}
        wall = T0
        ledger = Ledger.open(state, clock=clock, keep_seconds=keep)
        try:
            for consumer, joules, step, then in ticks:
                wall += step
                book(ledger, clock, wall, {consumer: joules})
                fed[consumer] = fed.get(consumer, 0.0) + joules
                if then == "flush":
                    assert ledger.flush()
                elif then == "reopen":
                    ledger.close()
                    ledger = Ledger.open(state, clock=clock, keep_seconds=keep)
        finally:
            ledger.close()
        for consumer, joules in fed.items():
            assert stored(state, consumer).get("cpu", 0.0) == pytest.approx(joules, rel=1e-9,
                                                                            abs=1e-9)


def test_under_churn_memory_holds_at_most_keep_consumers(tmp_path):
    """Thousands of consumers a minute, all within keep_seconds: memory holds the most recently
    booked `keep_consumers`, once written; the rest are read back when they return, and a
    restart loads no more than that either."""
    state, clock = str(tmp_path), Clock(T0)
    churn = [Consumer("cgroup", f"churn-{i}") for i in range(300)]
    with Ledger.open(state, clock=clock, keep_consumers=50) as ledger:
        for second, consumer in enumerate(churn):
            book(ledger, clock, T0 + second, {consumer: 1.0, B: 1.0})
            if second % 60 == 59:
                assert ledger.flush()
                assert ledger.consumers_in_memory <= 50
        assert ledger.flush()
        assert ledger.consumers_in_memory <= 50
        book(ledger, clock, T0 + 400, {churn[0]: 2.0})  # long gone from memory: it returns
        assert ledger.flush()
        assert ledger.restore().consumer_joules[churn[0]]["cpu"] == 3.0
        assert ledger.restore().consumer_joules[B]["cpu"] == 300.0  # booked every tick: kept
    with Ledger.open(state, clock=clock, keep_consumers=50) as ledger:
        assert ledger.consumers_in_memory <= 50
        assert stored(state, churn[1]) == {"cpu": 1.0, "platform": 0.1}
