"""The idle baseline learned from power against utilisation, fed with a simulated clock."""

from __future__ import annotations

import json
import math
import os
import random
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.pipeline.idle import FALLBACK, FIT, FIXED, MAX_STATE_BYTES, WARMING, IdleBaseline

TICK_SECONDS = 5.0
WALL = 1_700_000_000.0
IDLE_WATTS, SLOPE_WATTS = 50.0, 150.0

Sample = tuple[float, float]  # watts, utilisation


def varying(rng: random.Random) -> Sample:
    u = rng.uniform(0.1, 0.9)
    return IDLE_WATTS + SLOPE_WATTS * u + rng.gauss(0.0, 3.0), u


def feed(base: IdleBaseline, samples: Iterable[Sample], start_seconds: float = 0.0) -> float:
    """Ticks every TICK_SECONDS from `start_seconds`; returns the time of the next tick."""
    now = start_seconds
    for watts, u in samples:
        base.observe(watts, u, now)
        now += TICK_SECONDS
    return now


def idle_fraction(base: IdleBaseline, samples: Iterable[Sample]) -> float:
    """Idle share of the energy, as the daemon computes it: the baseline from earlier ticks."""
    energy_joules = idle_joules = 0.0
    for i, (watts, u) in enumerate(samples):
        tick_joules = watts * TICK_SECONDS
        idle_joules += min(tick_joules, base.watts() * TICK_SECONDS)
        energy_joules += tick_joules
        base.observe(watts, u, i * TICK_SECONDS)
    return idle_joules / energy_joules


def draw(gen: Callable[[random.Random], Sample], ticks: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [gen(rng) for _ in range(ticks)]


# -- learning ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_intercept_learned_where_utilisation_varies(seed: int) -> None:
    base = IdleBaseline()
    feed(base, draw(varying, 120, seed))  # ten minutes
    assert base.source() == FIT
    assert base.watts() == pytest.approx(IDLE_WATTS, rel=0.05)


def test_host_pinned_at_full_load_has_almost_no_idle_energy() -> None:
    fraction = idle_fraction(IdleBaseline(), [(200.0, 1.0)] * 720)
    assert fraction <= 0.05


def test_busy_host_with_jitter_is_not_called_idle() -> None:
    """A training server: utilisation 95..100%, too little spread for a line."""
    def busy(rng: random.Random) -> Sample:
        u = rng.uniform(0.95, 1.0)
        return IDLE_WATTS + SLOPE_WATTS * u + rng.gauss(0.0, 3.0), u

    base = IdleBaseline()
    fraction = idle_fraction(base, draw(busy, 720, 7))
    assert base.source() == FALLBACK
    assert fraction <= 0.05


def test_idle_host_is_all_idle() -> None:
    base = IdleBaseline()
    feed(base, [(80.0, 0.0)] * 60)
    assert base.source() == FALLBACK
    assert base.watts() == pytest.approx(80.0)


def test_power_that_does_not_follow_utilisation_falls_back() -> None:
    """A slope indistinguishable from zero would put the intercept at busy power."""
    def unrelated(rng: random.Random) -> Sample:
        return rng.uniform(180.0, 220.0), rng.uniform(0.6, 1.0)

    base = IdleBaseline()
    feed(base, draw(unrelated, 720, 3))
    assert base.source() == FALLBACK
    assert base.watts() <= 0.4 * 180.0  # the idle share of the quietest minute, not 180 W


def test_warming_up_gives_zero_then_learns() -> None:
    base = IdleBaseline(min_samples=12)
    samples = draw(varying, 12, 0)
    feed(base, samples[:11])
    assert (base.watts(), base.source()) == (0.0, WARMING)
    feed(base, samples[11:], start_seconds=11 * TICK_SECONDS)
    assert base.source() == FIT
    assert base.watts() > 0


def test_fixed_watts_overrides_learning() -> None:
    for fixed in (0.0, 12.5):
        base = IdleBaseline(fixed_watts=fixed)
        feed(base, draw(varying, 200, 0))
        assert (base.watts(), base.source()) == (fixed, FIXED)
    with pytest.raises(ValueError):
        IdleBaseline(fixed_watts=-1.0)
    with pytest.raises(ValueError):
        IdleBaseline(fixed_watts=math.nan)


def test_a_glitching_minute_does_not_move_the_fit() -> None:
    samples = draw(varying, 720, 1)
    samples[300:312] = [(5000.0, u) for _, u in samples[300:312]]  # one minute of garbage
    base = IdleBaseline()
    feed(base, samples)
    assert base.source() == FIT
    assert base.watts() == pytest.approx(IDLE_WATTS, rel=0.05)


def test_window_forgets_the_old_host() -> None:
    """Idle power rose (a new CPU governor, say): after an hour the old line is gone."""
    base = IdleBaseline()
    now = feed(base, draw(varying, 720, 2))
    rng = random.Random(4)
    later = []
    for _ in range(800):
        u = rng.uniform(0.1, 0.9)
        later.append((90.0 + SLOPE_WATTS * u + rng.gauss(0.0, 3.0), u))
    feed(base, later, start_seconds=now)
    assert base.watts() == pytest.approx(90.0, rel=0.05)


def test_memory_is_bounded_whatever_the_tick_rate() -> None:
    base = IdleBaseline(window_seconds=3600.0, bucket_seconds=60.0)
    rng = random.Random(5)
    now = 0.0
    for _ in range(100_000):  # 0.1 s ticks for 2.8 hours
        u = rng.random()
        base.observe(50.0 + 100.0 * u, u, now)
        now += 0.1
    assert len(base.to_state(WALL)["buckets"]) <= 62


# -- persistence -------------------------------------------------------------------------


def test_restart_keeps_the_learned_value(tmp_path: Path) -> None:
    path = tmp_path / "idle-baseline.json"
    base = IdleBaseline()
    feed(base, draw(varying, 120, 0))
    learned = base.watts()
    base.save(path, wall_now=WALL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    restarted = IdleBaseline.load(path, wall_now=WALL + 30.0)
    assert (restarted.watts(), restarted.source()) == (learned, FIT)
    # and it goes on learning from the loaded sums on the new monotonic clock
    feed(restarted, draw(varying, 120, 1), start_seconds=12.0)
    assert restarted.watts() == pytest.approx(IDLE_WATTS, rel=0.05)


def test_state_round_trips_through_json() -> None:
    base = IdleBaseline()
    feed(base, draw(varying, 300, 3))
    state = json.loads(json.dumps(base.to_state(WALL)))
    again = IdleBaseline.from_state(state, wall_now=WALL, now_seconds=5.0)
    assert again.estimate() == base.estimate()


def test_samples_older_than_the_window_are_dropped_on_load() -> None:
    base = IdleBaseline()
    feed(base, draw(varying, 720, 0))  # one hour, saved at the end
    state = base.to_state(WALL)
    half_later = IdleBaseline.from_state(state, wall_now=WALL + 1800.0)
    kept = half_later.to_state(WALL + 1800.0)["buckets"]
    assert 0 < len(kept) < len(state["buckets"])
    assert all(WALL + 1800.0 - b["last_wall_seconds"] <= 3600.0 for b in kept)
    assert IdleBaseline.from_state(state, wall_now=WALL + 3700.0).source() == WARMING


def test_saving_before_the_first_tick_keeps_the_ages(tmp_path: Path) -> None:
    path = tmp_path / "idle-baseline.json"
    base = IdleBaseline()
    feed(base, draw(varying, 120, 0))
    base.save(path, wall_now=WALL)
    loaded = IdleBaseline.load(path, wall_now=WALL + 100.0)
    loaded.save(path, wall_now=WALL + 400.0)  # the persister ran before any tick
    assert json.loads(path.read_text())["buckets"] == base.to_state(WALL)["buckets"]


def test_a_clock_set_back_drops_buckets_from_the_future() -> None:
    base = IdleBaseline()
    feed(base, draw(varying, 120, 0))
    state = base.to_state(WALL)
    assert IdleBaseline.from_state(state, wall_now=WALL - 3600.0).source() == WARMING


def test_missing_file_gives_a_fresh_learner(tmp_path: Path) -> None:
    base = IdleBaseline.load(tmp_path / "absent.json", wall_now=WALL, fixed_watts=None)
    assert (base.watts(), base.source()) == (0.0, WARMING)


def valid_state_text() -> str:
    base = IdleBaseline()
    feed(base, draw(varying, 120, 0))
    return json.dumps(base.to_state(WALL))


def test_every_truncation_of_a_state_file_gives_a_fresh_learner(tmp_path: Path) -> None:
    path = tmp_path / "idle-baseline.json"
    text = valid_state_text()
    for cut in range(len(text)):
        path.write_text(text[:cut])
        assert IdleBaseline.load(path, wall_now=WALL).source() == WARMING
    path.write_text(text)
    assert IdleBaseline.load(path, wall_now=WALL).source() == FIT  # the whole file does load


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b"\xc3\x28",
        b"[" * 100_000,
        b"null",
        b"42",
        b'"state"',
        b"{}",
        b'{"version": 2, "buckets": []}',
        b'{"version": 1, "buckets": {}}',
        b'{"version": 1, "buckets": [1, 2]}',
        b'{"version": 1}',
        b" " * (MAX_STATE_BYTES + 1),
    ],
)
def test_garbage_state_files_give_a_fresh_learner(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "idle-baseline.json"
    path.write_bytes(content)
    base = IdleBaseline.load(path, wall_now=WALL)
    assert (base.watts(), base.source()) == (0.0, WARMING)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", -3), ("n", 0), ("n", 1.5), ("n", True), ("n", "12"), ("n", 1e300),
        ("sum_u", -1.0), ("sum_u", 1e9), ("sum_uu", -0.1), ("sum_ww", -5.0),
        ("min_w", -1.0), ("min_w", 1e9), ("min_w", None), ("sum_w", "NaN"),
        ("sum_idle", 1e12), ("last_wall_seconds", "yesterday"), ("start_wall_seconds", 1e300),
    ],
)
def test_inconsistent_bucket_gives_a_fresh_learner(tmp_path: Path, field: str,
                                                   value: object) -> None:
    state = json.loads(valid_state_text())
    state["buckets"][3][field] = value
    path = tmp_path / "idle-baseline.json"
    path.write_text(json.dumps(state))
    assert IdleBaseline.load(path, wall_now=WALL).source() == WARMING


def test_nan_in_a_state_file_gives_a_fresh_learner(tmp_path: Path) -> None:
    path = tmp_path / "idle-baseline.json"
    path.write_text(valid_state_text().replace('"sum_uw": ', '"sum_uw": NaN, "x": ', 1))
    assert IdleBaseline.load(path, wall_now=WALL).source() == WARMING


def test_unreadable_path_gives_a_fresh_learner(tmp_path: Path) -> None:
    assert IdleBaseline.load(tmp_path, wall_now=WALL).source() == WARMING  # a directory


def test_saving_while_ticking_from_another_thread(tmp_path: Path) -> None:
    """The daemon ticks in one thread and persists from another."""
    path = tmp_path / "idle-baseline.json"
    base = IdleBaseline(bucket_seconds=1.0, window_seconds=60.0)
    done = threading.Event()
    saves: list[float] = []
    errors: list[BaseException] = []

    def persist() -> None:
        while not done.is_set():
            try:
                base.save(path, wall_now=WALL)
            except BaseException as exc:  # reported to the test below
                errors.append(exc)
                return
            saves.append(WALL)

    saver = threading.Thread(target=persist)
    saver.start()
    try:
        rng = random.Random(0)
        i = 0
        while len(saves) < 50 and not errors and i < 10_000_000:  # tick while it saves
            u = rng.random()
            base.observe(50.0 + 100.0 * u, u, i * 0.01)
            i += 1
    finally:
        done.set()
        saver.join()
    assert errors == []
    assert len(saves) >= 50
    assert json.loads(path.read_text())["version"] == 1  # whichever save came last is whole
    base.save(path, wall_now=WALL)
    assert IdleBaseline.load(path, wall_now=WALL).estimate() == base.estimate()


# -- properties --------------------------------------------------------------------------

power = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
utilisation = st.floats(min_value=0.0, max_value=1.0)
step = st.floats(min_value=0.0, max_value=600.0)
ticks = st.lists(st.tuples(power, utilisation, step), max_size=150)


def run(ticks: list[tuple[float, float, float]], **options: float) -> IdleBaseline:
    base = IdleBaseline(min_samples=1, **options)  # type: ignore[arg-type]
    now = 0.0
    for watts, u, dt in ticks:
        now += dt
        base.observe(watts, u, now)
    return base


@settings(max_examples=300, deadline=None)
@given(ticks, st.sampled_from([0.0, 0.05]))
def test_baseline_is_finite_non_negative_and_below_the_lowest_power(
    ticks: list[tuple[float, float, float]], min_spread: float
) -> None:
    base = run(ticks, min_spread=min_spread)
    watts = base.watts()
    assert math.isfinite(watts)
    assert watts >= 0.0
    if not ticks:
        assert watts == 0.0
        return
    times = [0.0] * len(ticks)
    now = 0.0
    for i, (_, _, dt) in enumerate(ticks):
        now += dt
        times[i] = now
    # ticks within the last hour are surely still in the window (older ones may be too)
    assert watts <= min(w for (w, _, _), t in zip(ticks, times, strict=True) if t >= now - 3600)


garbage = st.tuples(
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-9, 2e6, 50.0]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.5]),
).filter(lambda t: not (t[0] == 50.0 and t[1] == 0.5))


@settings(max_examples=200, deadline=None)
@given(ticks, st.lists(st.tuples(st.integers(min_value=0, max_value=150), garbage), max_size=20))
def test_nan_inf_and_negative_inputs_are_ignored(
    ticks: list[tuple[float, float, float]], junk: list[tuple[int, tuple[float, float]]]
) -> None:
    clean = run(ticks)
    dirty = IdleBaseline(min_samples=1)
    insert: dict[int, list[tuple[float, float]]] = {}
    for at, sample in junk:
        insert.setdefault(at, []).append(sample)
    now = 0.0
    for i, (watts, u, dt) in enumerate(ticks):
        now += dt
        for bad_watts, bad_u in insert.get(i, []):
            dirty.observe(bad_watts, bad_u, now)
        dirty.observe(watts, u, now)
    assert dirty.estimate() == clean.estimate()


@settings(max_examples=200, deadline=None)
@given(ticks)
def test_state_round_trip_preserves_the_baseline(ticks: list[tuple[float, float, float]]) -> None:
    base = run(ticks)
    state = json.loads(json.dumps(base.to_state(WALL)))
    again = IdleBaseline.from_state(state, wall_now=WALL, min_samples=1)
    assert again.estimate() == base.estimate()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["version", "buckets", "n", "sum_u", "sum_w", "min_w", "x"]),
        children,
        max_size=4,
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.floats())
def test_any_state_gives_a_usable_learner(state: object, wall_now: float) -> None:
    base = IdleBaseline.from_state(state, wall_now=wall_now)
    base.observe(100.0, 0.5, 1.0)
    watts = base.watts()
    assert math.isfinite(watts) and 0.0 <= watts <= 100.0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_in_the_state_file_give_a_usable_learner(tmp_path_factory: pytest.TempPathFactory,
                                                          content: bytes) -> None:
    path = tmp_path_factory.mktemp("idle") / "idle-baseline.json"
    path.write_bytes(content)
    base = IdleBaseline.load(path, wall_now=WALL)
    assert base.watts() == 0.0
    os.unlink(path)
