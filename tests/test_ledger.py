"""The ledger on real SQLite files: restart continuity, kill -9, migration, corruption, a
read-only and a full state directory (real tmpfs mounts), two holders, retention."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.ledger.ledger import (
    LEDGER_FILE,
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    LedgerLocked,
    aggregate,
    connect_readonly,
)
from carbond.types import Consumer
from tests.helpers import tick_record

HOUR = 3600
H0 = 1_714_521_600  # 2024-05-01 00:00 UTC
T0 = H0 + 600.0  # ticks end ten minutes into an hour unless a test says otherwise
A = Consumer("unit", "a.service")
B = Consumer("job", "slurm/42")
PACKAGE = ("cpu", "package-0", "rapl")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tick(ledger: Ledger, wall_time: float, seconds: float = 5.0, joules: float = 100.0,
         consumers: tuple[Consumer, ...] = (A, B), intensity: float | None = 400.0,
         provider: str | None = "static") -> None:
    """One tick at `joules` per consumer (cpu 80 %, dram 20 %), grams at `intensity`."""
    energy = {c: {"cpu": joules * 0.8, "dram": joules * 0.2} for c in consumers}
    grams = {c: joules / 3.6e6 * (intensity or 0.0) for c in consumers}
    embodied = {c: joules * 1e-6 for c in consumers}
    ledger.record(tick_record(wall_time, seconds, energy, grams, embodied,
                  {PACKAGE: joules * len(consumers)}, intensity, provider))


def hourly_sums(state_dir: str) -> dict[Consumer, list[float]]:
    """Per consumer: cpu, dram, grams, embodied summed over every hourly row on disk."""
    conn = connect_readonly(state_dir)
    try:
        rows = conn.execute(
            "SELECT c.kind, c.name, SUM(h.cpu_joules), SUM(h.dram_joules), SUM(h.grams),"
            " SUM(h.embodied_grams) FROM consumer_hours h JOIN consumers c ON c.id = h.consumer"
            " GROUP BY c.id").fetchall()
    finally:
        conn.close()
    return {Consumer(k, n): list(rest) for k, n, *rest in rows}


# ---- continuity -------------------------------------------------------------------------------


def test_totals_continue_across_close_and_open(tmp_path):
    state = str(tmp_path / "state")
    clock = Clock(T0 + 10)
    with Ledger.open(state, clock=clock) as ledger:
        for i in range(20):
            tick(ledger, T0 + 5 * i)
        ledger.put_state("exited_tasks_total", 17)
        ledger.put_state("counter_wraps_total", {"package-0": 2})
        assert ledger.flush()
        tick(ledger, T0 + 200)  # pending at close: close flushes it
    with Ledger.open(state, clock=clock) as ledger:
        totals = ledger.restore()
        assert totals.consumer_joules[A]["cpu"] == pytest.approx(21 * 80.0)
        assert totals.consumer_joules[B]["dram"] == pytest.approx(21 * 20.0)
        assert totals.consumer_grams[A] == pytest.approx(21 * 100 / 3.6e6 * 400)
        assert totals.consumer_embodied_grams[B] == pytest.approx(21 * 100e-6)
        assert totals.device_joules[PACKAGE] == pytest.approx(21 * 200.0)
        assert totals.host_grams == pytest.approx(2 * 21 * 100 / 3.6e6 * 400)
        assert totals.first_record == T0
        assert totals.state == {"exited_tasks_total": 17, "counter_wraps_total": {"package-0": 2}}
        tick(ledger, T0 + 205)  # counters keep growing from the restored values
        assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(22 * 80.0)
    assert hourly_sums(state)[A][0] == pytest.approx(22 * 80.0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(
    st.tuples(
        st.floats(0, 3 * HOUR),  # wall time offset
        st.floats(0, 2 * HOUR),  # tick length: ticks may straddle hours
        st.sampled_from([A, B, Consumer("user", "ä\udcff\x00")]),
        st.floats(0, 1e6),
        st.booleans(),  # flush after this tick
    ),
    min_size=1, max_size=40,
))
def test_hourly_rows_sum_to_the_totals(ticks):
    """Invariant: whatever the ticks and flushes, the rows on disk sum to the totals, and
    the totals to what was recorded."""
    with tempfile.TemporaryDirectory() as state:
        expected: dict[Consumer, float] = {}
        with Ledger.open(state, clock=Clock(T0 + 4 * HOUR)) as ledger:
            for offset, seconds, consumer, joules, flush in ticks:
                ledger.record(tick_record(T0 + offset, seconds, {consumer: {"cpu": joules}},
                              {consumer: joules / 1e3}, {}, {}, 100.0, "static"))
                expected[consumer] = expected.get(consumer, 0.0) + joules
                if flush:
                    ledger.flush()
        with Ledger.open(state, clock=Clock(T0 + 4 * HOUR)) as ledger:
            totals = ledger.restore()
        sums = hourly_sums(state)
        for consumer, joules in expected.items():
            # names with undecodable bytes come back escaped: find consumers by kind
            stored = next((v for c, v in totals.consumer_joules.items()
                           if c.kind == consumer.kind), {})
            assert stored.get("cpu", 0.0) == pytest.approx(joules, rel=1e-9, abs=1e-6)
            # a consumer that never used anything books no row at all
            row = next((v for c, v in sums.items() if c.kind == consumer.kind), (0.0, 0.0, 0.0))
            assert row[0] == pytest.approx(joules, rel=1e-9, abs=1e-6)
            assert row[2] == pytest.approx(joules / 1e3, rel=1e-9, abs=1e-9)


def test_an_idle_consumer_books_no_row(tmp_path):
    """An idle cgroup gets 0 J every tick: nothing to book, so no hourly row, no total."""
    with Ledger.open(str(tmp_path), clock=Clock(T0 + 2 * HOUR)) as ledger:
        ledger.record(tick_record(T0, 5.0, {A: {"cpu": 10.0}, B: {"cpu": 0.0, "dram": 0.0}},
                      {A: 0.001, B: 0.0}, {B: 0.0}, {}, 100.0, "static"))
        ledger.flush()
        totals = ledger.restore()
    assert set(totals.consumer_joules) == {A}
    assert set(hourly_sums(str(tmp_path))) == {A}


def test_a_tick_across_an_hour_is_split_by_time(tmp_path):
    with Ledger.open(str(tmp_path), clock=Clock(T0 + 2 * HOUR)) as ledger:
        # 10 s tick ending 4 s past the hour: 6 s before, 4 s after
        ledger.record(tick_record(H0 + HOUR + 4, 10.0, {A: {"cpu": 100.0}}, {A: 1.0}, {}, {},
                                  300, "x"))
    conn = connect_readonly(str(tmp_path))
    rows = dict(conn.execute("SELECT hour, cpu_joules FROM consumer_hours").fetchall())
    conn.close()
    assert rows == {H0: pytest.approx(60.0), H0 + HOUR: pytest.approx(40.0)}


KILL_CHILD = textwrap.dedent("""
    import sys
    import time
    from carbond.ledger.ledger import Ledger
    from carbond.types import DeviceDelta, TickRecord
    ledger = Ledger.open(sys.argv[1])
    every = int(sys.argv[2])
    n = 0
    while True:
        ledger.record(TickRecord(time.time(), 1.0, {("unit", "a.service"): {"cpu": 1.0}},
                      {("unit", "a.service"): 0.001}, {},
                      (DeviceDelta("cpu", "package-0", "rapl", 1.0),), 300.0, "static"))
        n += 1
        if n % every == 0:
            ledger.flush()
            print(n, flush=True)
""")


def test_kill_9_loses_at_most_one_flush_interval(tmp_path):
    """A process killed mid-run (possibly mid-flush) leaves a ledger that opens, holds at
    least every flush it reported, and whose rows agree with its totals (one transaction)."""
    state, every = str(tmp_path / "state"), 50
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, state, str(every)],
                             stdout=subprocess.PIPE, text=True)
    try:
        reported = [int(child.stdout.readline()) for _ in range(30)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    reported += [int(line) for line in child.stdout.read().split()]
    assert child.returncode == -signal.SIGKILL
    with Ledger.open(state) as ledger:  # the lock died with the process
        joules = ledger.restore().consumer_joules[A]["cpu"]
        devices = ledger.restore().device_joules[PACKAGE]
    assert joules >= reported[-1]  # every reported flush is durable
    assert joules % every == 0  # totals are a flush boundary, never half of one
    assert joules <= reported[-1] + every  # at most the flush in flight beyond that
    assert devices == joules
    assert hourly_sums(state)[A][0] == pytest.approx(joules)


# ---- schema -----------------------------------------------------------------------------------

V1 = [  # the first released layout: no embodied emissions
    "CREATE TABLE consumers (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,"
    " UNIQUE (kind, name))",
    "CREATE TABLE providers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE consumer_hours (hour INTEGER NOT NULL, consumer INTEGER NOT NULL,"
    " cpu_joules REAL NOT NULL DEFAULT 0, dram_joules REAL NOT NULL DEFAULT 0,"
    " gpu_joules REAL NOT NULL DEFAULT 0, grams REAL NOT NULL DEFAULT 0,"
    " intensity_joules REAL NOT NULL DEFAULT 0, intensity_weighted REAL NOT NULL DEFAULT 0,"
    " providers INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (hour, consumer)) WITHOUT ROWID",
    "CREATE TABLE host_hours (hour INTEGER NOT NULL, component TEXT NOT NULL,"
    " device TEXT NOT NULL, source TEXT NOT NULL, joules REAL NOT NULL DEFAULT 0,"
    " PRIMARY KEY (hour, component, device, source)) WITHOUT ROWID",
    "CREATE TABLE consumer_totals (consumer INTEGER PRIMARY KEY,"
    " grams REAL NOT NULL DEFAULT 0, updated REAL NOT NULL)",
    "CREATE TABLE consumer_energy_totals (consumer INTEGER NOT NULL, component TEXT NOT NULL,"
    " joules REAL NOT NULL, PRIMARY KEY (consumer, component)) WITHOUT ROWID",
    "CREATE TABLE device_totals (component TEXT NOT NULL, device TEXT NOT NULL,"
    " source TEXT NOT NULL, joules REAL NOT NULL,"
    " PRIMARY KEY (component, device, source)) WITHOUT ROWID",
    "CREATE TABLE host_totals (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "INSERT INTO consumers VALUES (1, 'unit', 'a.service')",
    "INSERT INTO providers VALUES (0, 'electricitymaps')",
    f"INSERT INTO consumer_hours VALUES ({H0}, 1, 500, 50, 0, 2.5, 550, 110000, 1)",
    f"INSERT INTO consumer_totals VALUES (1, 2.5, {T0})",
    "INSERT INTO consumer_energy_totals VALUES (1, 'cpu', 500), (1, 'dram', 50)",
    "INSERT INTO host_totals VALUES ('grams', 2.5)",
    "PRAGMA user_version = 1",
]


def make_v1(state: Path) -> None:
    state.mkdir()
    conn = sqlite3.connect(state / LEDGER_FILE)
    for statement in V1:
        conn.execute(statement)
    conn.commit()
    conn.close()


def test_migration_from_v1_keeps_the_data(tmp_path, caplog):
    state = tmp_path / "state"
    make_v1(state)
    # the report reads a v1 ledger as it is (a daemon not yet upgraded)
    conn = connect_readonly(str(state))
    (key, usage), = aggregate(conn, T0, T0 + HOUR, "consumer")
    conn.close()
    assert key == ("a.service", "unit") and usage.embodied_grams == 0.0
    caplog.set_level(logging.INFO, logger="carbond.ledger.ledger")
    with Ledger.open(str(state), clock=Clock(T0 + 60)) as ledger:
        totals = ledger.restore()
        assert totals.consumer_joules[A] == {"cpu": 500.0, "dram": 50.0}
        assert totals.consumer_grams[A] == 2.5 and totals.consumer_embodied_grams[A] == 0.0
        ledger.record(tick_record(T0 + 30, 5.0, {A: {"cpu": 10.0}}, {A: 0.5}, {A: 0.25}, {}, 200.0,
                      "electricitymaps"))
    assert "migrated from schema v1 to v2" in caplog.text
    conn = connect_readonly(str(state))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (key, usage), = aggregate(conn, T0, T0 + HOUR, "consumer")
    conn.close()
    assert usage.cpu_joules == 510.0 and usage.grams == 3.0 and usage.embodied_grams == 0.25
    assert usage.providers == {"electricitymaps"}
    assert usage.grid_grams_per_kwh == pytest.approx((110000 + 10 * 200) / 560)


def test_a_newer_schema_is_refused_not_overwritten(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / LEDGER_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match=f"schema v{SCHEMA_VERSION + 1}, newer"):
        Ledger.open(str(state))
    with Ledger.open(str(tmp_path / "other")):  # the failed open released nothing it lacked
        pass
    with pytest.raises(LedgerError), Ledger.open(str(state)):
        pass


# ---- damage -------------------------------------------------------------------------------------


def corrupt_files(state: Path) -> list[Path]:
    return sorted(p for p in state.glob(f"{LEDGER_FILE}.corrupt-*")
                  if not p.name.endswith("-wal"))


def test_a_garbage_file_is_moved_aside_once(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / LEDGER_FILE).write_bytes(b"this is not a database\n" * 500)
    with caplog.at_level(logging.WARNING, logger="carbond.ledger.ledger"), \
            Ledger.open(str(state), clock=Clock(T0)) as ledger:
        assert ledger.restore().consumer_grams == {}
        tick(ledger, T0)
        assert ledger.flush()
    moved = corrupt_files(state)
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not a database")
    assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 1
    with Ledger.open(str(state), clock=Clock(T0)) as ledger:  # no crash loop: it stays good
        assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(80.0)
    assert len(corrupt_files(state)) == 1


def test_damaged_pages_are_detected_and_a_fresh_ledger_started(tmp_path):
    state = tmp_path / "state"
    with Ledger.open(str(state), clock=Clock(T0 + 400 * HOUR)) as ledger:
        for hour in range(400):  # enough rows for many pages
            tick(ledger, T0 + hour * HOUR, consumers=tuple(
                Consumer("unit", f"s{i}.service") for i in range(20)))
    path = state / LEDGER_FILE
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    for start in range(4 * page, len(data) - page, 3 * page):  # trash every third page
        data[start + 8:start + page] = os.urandom(page - 8)
    path.write_bytes(bytes(data))
    with Ledger.open(str(state), clock=Clock(T0 + 401 * HOUR)) as ledger:
        tick(ledger, T0 + 401 * HOUR)
        assert ledger.flush() and ledger.errors_total == 0
    assert len(corrupt_files(state)) == 1
    conn = connect_readonly(str(state))
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    conn.close()


# ---- the state directory --------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_an_empty_read_only_state_dir_keeps_working_from_memory(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as state:
        with Ledger.open(str(state), clock=Clock(T0)) as ledger:
            tick(ledger, T0)
            assert not ledger.flush()
            assert not ledger.flush()
            assert ledger.errors_total >= 2
            assert ledger.pending_rows == 2  # nothing dropped
            assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(80.0)
        assert not (state / LEDGER_FILE).exists()


def test_a_state_dir_gone_read_only_restores_then_retries(tmp_path):
    with tmpfs(tmp_path / "state", "size=4m") as state:
        with Ledger.open(str(state), clock=Clock(T0)) as ledger:
            tick(ledger, T0)
        remount(state, "ro")
        with Ledger.open(str(state), clock=Clock(T0 + 10)) as ledger:
            assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(80.0)
            tick(ledger, T0 + 5)
            assert not ledger.flush()
            errors = ledger.errors_total
            assert errors >= 1
            assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(160.0)
            # the report still reads it
            report = subprocess.run(
                [sys.executable, "-m", "carbond", "report", "--state-dir", str(state),
                 "--since", "2024-05-01", "--until", "2024-05-02", "--format", "csv"],
                capture_output=True, text=True, timeout=60)
            assert report.returncode == 0, report.stderr
            assert "a.service,unit,80.0," in report.stdout
            remount(state, "rw")
            tick(ledger, T0 + 10)
            assert ledger.flush()
            assert ledger.errors_total == errors
        with Ledger.open(str(state), clock=Clock(T0 + 20)) as ledger:
            assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(240.0)
        assert hourly_sums(str(state))[A][0] == pytest.approx(240.0)


def fill(path: Path) -> None:
    with open(path, "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


def test_a_full_disk_counts_errors_keeps_data_and_retries(tmp_path, caplog):
    with tmpfs(tmp_path / "full", "size=1m") as state:
        names = tuple(Consumer("cgroup", f"{'x' * 200}/{i}") for i in range(50))
        with caplog.at_level(logging.WARNING, logger="carbond.ledger.ledger"), \
                Ledger.open(str(state), clock=Clock(T0 + 30 * HOUR)) as ledger:
            tick(ledger, T0, consumers=names)
            assert ledger.flush()
            fill(state / "filler")
            for hour in range(1, 25):
                tick(ledger, T0 + hour * HOUR, consumers=names)
            assert not ledger.flush()
            assert not ledger.flush()
            assert ledger.errors_total == 2
            assert ledger.pending_rows == 24 * 50
            (state / "filler").unlink()
            assert ledger.flush()
            assert ledger.pending_rows == 0
        failures = [r for r in caplog.records if "write failed" in r.getMessage()]
        assert len(failures) == 1  # logged once per distinct error, not per try
        sums = hourly_sums(str(state))
        assert sum(v[0] for v in sums.values()) == pytest.approx(25 * 50 * 80.0)


# ---- holders ------------------------------------------------------------------------------------


def test_two_holders_on_one_directory(tmp_path):
    state = str(tmp_path / "state")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from carbond.ledger.ledger import Ledger; "
         "l = Ledger.open(sys.argv[1]); print('held', flush=True); sys.stdin.read()", state],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LedgerLocked) as caught:
            Ledger.open(state)
        assert state in str(caught.value) and f"pid {holder.pid}" in str(caught.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with Ledger.open(state) as first:  # free again once the holder is gone
        with pytest.raises(LedgerLocked):
            Ledger.open(state)  # in one process too: no second writer
        tick(first, T0)


def test_the_flush_thread_writes_without_being_asked(tmp_path):
    state = str(tmp_path / "state")
    ledger = Ledger.open(state, clock=Clock(T0 + 10))
    try:
        ledger.start(0.05)
        tick(ledger, T0)

        def flushed() -> float:
            with contextlib.suppress(LedgerError, sqlite3.Error):
                return hourly_sums(state).get(A, [0.0])[0]
            return 0.0

        deadline = time.monotonic() + 30
        while flushed() < 80.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flushed() == pytest.approx(80.0)
        tick(ledger, T0 + 5)
    finally:
        ledger.close()  # stops the thread and flushes the rest
    assert hourly_sums(state)[A][0] == pytest.approx(160.0)


def test_report_reads_while_the_daemon_holds_the_ledger(tmp_path):
    state = str(tmp_path / "state")
    with Ledger.open(state, clock=Clock(T0 + 10)) as ledger:
        tick(ledger, T0)
        ledger.flush()
        tick(ledger, T0 + 5)  # not flushed yet: not visible outside
        conn = connect_readonly(state)
        (_, usage), = aggregate(conn, T0, T0 + HOUR, "kind")[:1]
        conn.close()
        assert usage.cpu_joules == pytest.approx(80.0)
        ledger.flush()


# ---- hostile input, retention, queries ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=30), st.binary(max_size=30),
       st.sampled_from([math.nan, math.inf, -1.0, -math.inf, 5.0]))
def test_any_name_or_value_never_breaks_record_or_flush(text, raw, value):
    name = raw.decode("utf-8", "surrogateescape") + text
    with tempfile.TemporaryDirectory() as state:
        with Ledger.open(state, clock=Clock(T0)) as ledger:
            ledger.record(tick_record(T0, 5.0, {("cgroup", name): {"cpu": value, "weird": 1.0}},
                          {("cgroup", name): value}, {("cgroup", name): value},
                          {("cpu", name, "rapl"): value}, value, name))
            ledger.record(tick_record(math.nan, 5.0, {("x", "y"): {"cpu": 1.0}}, {}, {}, {},
                                      None, None))
            assert ledger.flush()
            assert ledger.errors_total == 0
            totals = ledger.restore()
        for parts in totals.consumer_joules.values():
            assert all(math.isfinite(v) and v >= 0 for v in parts.values())
        assert math.isfinite(totals.host_grams)


def test_retention_drops_old_rows_and_stale_consumers(tmp_path):
    clock = Clock(T0)
    state = str(tmp_path)
    with Ledger.open(state, retention_seconds=10 * 86400, clock=clock) as ledger:
        tick(ledger, T0, consumers=(A, B))
        for day in range(1, 12):
            tick(ledger, T0 + day * 86400, consumers=(A,))
        clock.now = T0 + 12 * 86400
        assert ledger.flush()
        assert B not in ledger.restore().consumer_grams  # B last seen 12 days ago
        assert A in ledger.restore().consumer_grams
    conn = connect_readonly(state)
    hours = [h for (h,) in conn.execute("SELECT DISTINCT hour FROM consumer_hours")]
    kinds = {k for (k,) in conn.execute("SELECT kind FROM consumers")}
    conn.close()
    assert min(hours) >= T0 + 2 * 86400 - HOUR and len(hours) == 10
    assert kinds == {"unit"}
    with Ledger.open(state, clock=clock) as ledger:  # totals of the living consumer survive
        assert ledger.restore().consumer_joules[A]["cpu"] == pytest.approx(12 * 80.0)


def test_consumer_grams_include_pending_and_cut_hours(tmp_path):
    clock = Clock(H0 + 2 * HOUR)
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        ledger.record(tick_record(H0 + HOUR - 1, 1.0, {A: {"cpu": 1.0}}, {A: 36.0}, {}, {}, 1.0,
                                  "x"))
        assert ledger.flush()
        ledger.record(tick_record(H0 + 2 * HOUR - 1, 1.0, {A: {"cpu": 1.0}}, {A: 10.0}, {}, {},
                                  1.0, "x"))
        assert ledger.consumer_grams(H0, clock.now) == {A: pytest.approx(46.0)}
        # half of the first hour: its grams are taken as spread over the hour
        assert ledger.consumer_grams(H0 + HOUR / 2, H0 + HOUR) == {A: pytest.approx(18.0)}
        # the current hour is observed up to now: a quarter of it holds half its grams
        clock.now = H0 + HOUR + HOUR / 2
        assert ledger.consumer_grams(H0 + HOUR + HOUR / 4, clock.now) == {
            A: pytest.approx(5.0)}
        hourly = ledger.hourly_grams(H0, clock.now)
        assert hourly == {H0: {A: 36.0}, H0 + HOUR: {A: 10.0}}
