"""Series folding: bounded, no flapping, counters never go backwards, retention."""

from __future__ import annotations

import math

from carbond.exporter.series import ConsumerSeries
from carbond.types import IDLE, OTHER, Consumer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unit(i: int) -> Consumer:
    return Consumer("unit", f"u{i}.service")


def totals(series: ConsumerSeries) -> dict[tuple[Consumer, str], float]:
    return {(s.consumer, s.component): s.joules_total for s in series.samples()}


def test_fold_keeps_top_and_conserves() -> None:
    clock = Clock()
    fold = ConsumerSeries(max_consumers=3, clock=clock)
    fed = 0.0
    for _ in range(10):
        clock.now += 5
        tick = {unit(i): {"cpu": float(i), "dram": i / 10} for i in range(10)}
        tick[IDLE] = {"cpu": 7.0}
        fed += sum(sum(p.values()) for p in tick.values())
        fold.update(tick, 5.0)
    assert fold.active == {unit(9), unit(8), unit(7)}
    exported = totals(fold)
    assert math.isclose(sum(exported.values()), fed, rel_tol=1e-12)
    assert exported[(OTHER, "cpu")] > 0 and exported[(IDLE, "cpu")] == 70.0
    watts = {(s.consumer, s.component): s.watts for s in fold.samples()}
    assert watts[(unit(9), "cpu")] == 9 / 5


def test_hysteresis_no_flapping_between_close_rivals() -> None:
    clock = Clock()
    fold = ConsumerSeries(max_consumers=1, margin=0.2, clock=clock, smoothing_seconds=10)
    changes, last = 0, None
    for i in range(200):
        clock.now += 1
        a, b = (10.0, 9.5) if i % 2 else (9.5, 10.0)  # alternate leadership within 5%
        fold.update({unit(1): {"cpu": a}, unit(2): {"cpu": b}}, 1.0)
        if fold.active != last:
            changes, last = changes + 1, fold.active
    assert changes == 1


def test_strong_newcomer_displaces_weakest() -> None:
    clock = Clock()
    fold = ConsumerSeries(max_consumers=2, clock=clock, smoothing_seconds=5)
    for _ in range(5):
        clock.now += 1
        fold.update({unit(1): {"cpu": 5.0}, unit(2): {"cpu": 1.0}, unit(3): {"cpu": 0.5}}, 1.0)
    assert fold.active == {unit(1), unit(2)}
    for _ in range(10):
        clock.now += 1
        fold.update({unit(1): {"cpu": 5.0}, unit(2): {"cpu": 1.0}, unit(3): {"cpu": 50.0}}, 1.0)
    assert fold.active == {unit(1), unit(3)}


def test_counters_never_go_backwards_and_retention() -> None:
    clock = Clock()
    fold = ConsumerSeries(max_consumers=1, clock=clock, retention_seconds=600, smoothing_seconds=1)
    seen: dict[tuple[Consumer, str], float] = {}

    def check() -> None:
        for key, value in totals(fold).items():
            assert value >= seen.get(key, 0.0)
            seen[key] = value

    for _ in range(3):
        clock.now += 5
        fold.update({unit(1): {"cpu": 10.0}}, 5.0)
        check()
    frozen = totals(fold)[(unit(1), "cpu")]
    for _ in range(3):  # u2 takes over u1's slot: u1's series goes, its new energy to other
        clock.now += 5
        fold.update({unit(1): {"cpu": 1.0}, unit(2): {"cpu": 100.0}}, 5.0)
        check()
        assert {s.consumer for s in fold.samples()} == {OTHER, unit(2)}
    assert totals(fold)[(OTHER, "cpu")] == 3.0
    # u2 finishes: its series stays (frozen) and holds the slot for ten minutes; u1, named
    # again after that, continues its remembered counter instead of restarting at zero
    clock.now += 5
    fold.update({}, 5.0)
    clock.now += 5
    fold.update({unit(1): {"cpu": 2.0}}, 5.0)
    assert (unit(1), "cpu") not in totals(fold) and (unit(2), "cpu") in totals(fold)
    clock.now += 600
    fold.update({unit(1): {"cpu": 2.0}}, 5.0)  # u2's series expires at the end of this tick
    clock.now += 5
    fold.update({unit(1): {"cpu": 2.0}}, 5.0)
    assert totals(fold)[(unit(1), "cpu")] == frozen + 2.0
    assert (unit(2), "cpu") not in totals(fold)
    fold = ConsumerSeries(max_consumers=1, clock=clock, retention_seconds=600,
                          smoothing_seconds=1)
    seen.clear()
    fold.update({unit(2): {"cpu": 100.0}}, 5.0)
    # a finished consumer: its series stays 10 minutes, then goes
    clock.now += 5
    fold.update({}, 5.0)
    assert (unit(2), "cpu") in totals(fold)
    clock.now += 590  # 595 s after its last energy
    fold.update({}, 5.0)
    assert (unit(2), "cpu") in totals(fold)
    before = totals(fold)[(unit(2), "cpu")]
    clock.now += 10
    fold.update({}, 5.0)
    assert (unit(2), "cpu") not in totals(fold)
    # coming back continues the remembered counter instead of restarting at zero
    clock.now += 5
    fold.update({unit(2): {"cpu": 1.0}}, 5.0)
    assert totals(fold)[(unit(2), "cpu")] == before + 1.0


def test_restore_from_ledger() -> None:
    fold = ConsumerSeries(max_consumers=5, clock=Clock())
    fold.restore({unit(1): {"cpu": 1000.0}, OTHER: {"cpu": 50.0}})
    fold.update({unit(1): {"cpu": 1.0}, unit(9): {"cpu": 1.0}}, 1.0)
    assert totals(fold)[(unit(1), "cpu")] == 1001.0
    assert totals(fold)[(OTHER, "cpu")] == 50.0


def test_zero_max_folds_everything() -> None:
    fold = ConsumerSeries(max_consumers=0, clock=Clock())
    fold.update({unit(1): {"cpu": 2.0}, IDLE: {"cpu": 1.0}}, 1.0)
    assert totals(fold) == {(IDLE, "cpu"): 1.0, (OTHER, "cpu"): 2.0}


def test_churn_never_exports_more_than_max_consumers() -> None:
    """Issue 14: 220 consumers that each live one tick, max_consumers 50: finished ones
    still hold their series (10 minutes, longer than this test), so new ones fold into
    `other` meanwhile, and nothing is lost."""
    clock = Clock()
    fold = ConsumerSeries(max_consumers=50, clock=clock)
    fed = 0.0
    for step in range(110):
        clock.now += 5
        tick = {unit(i): {"cpu": 1.0 + i % 7} for i in (2 * step, 2 * step + 1)}
        tick[IDLE] = {"cpu": 3.0}
        fed += sum(sum(p.values()) for p in tick.values())
        fold.update(tick, 5.0)
        named = {s.consumer for s in fold.samples()} - {IDLE, OTHER}
        assert len(named) <= 50
        assert math.isclose(sum(totals(fold).values()), fed, rel_tol=1e-12)
    assert totals(fold)[(OTHER, "cpu")] > 0
