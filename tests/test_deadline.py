"""DeadlineWorker: a source's call returns, raises, or misses its deadline alone, and a late
answer never reaches the wrong caller."""

from __future__ import annotations

import threading
import time

import pytest

from carbond.pipeline.deadline import DeadlineWorker, Missed


def test_answers_and_errors_reach_the_caller():
    worker: DeadlineWorker[int] = DeadlineWorker("t")
    assert [worker.call(lambda i=i: i * i, 5.0) for i in range(100)] == [i * i for i in range(100)]
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 // 0, 5.0)
    assert worker.call(lambda: 7, 5.0) == 7  # the thread survived the error
    assert worker.missed_total == 0


def test_a_stuck_call_misses_alone_and_its_late_answer_is_dropped():
    worker: DeadlineWorker[str] = DeadlineWorker("t")
    release = threading.Event()

    def stuck() -> str:
        release.wait(30)
        return "late"

    started = time.monotonic()
    with pytest.raises(Missed):
        worker.call(stuck, 0.2)
    assert 0.15 <= time.monotonic() - started < 5
    with pytest.raises(Missed):  # still stuck: refused at once, not queued behind it
        worker.call(lambda: "queued", 5.0)
    assert worker.missed_total == 2
    release.set()
    deadline = time.monotonic() + 10
    while True:  # once the stuck call has returned, calls go through again
        try:
            answer = worker.call(lambda: "fresh", 5.0)
            break
        except Missed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert answer == "fresh"  # never the stuck call's "late"
