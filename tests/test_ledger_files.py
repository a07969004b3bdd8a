"""The ledger's file under a running `carbond run`: deleted while it runs (noticed, logged,
counted, written again from memory, counters continuous across a restart afterwards), and a
state directory whose name is not UTF-8 (report works, a corrupt ledger there is moved aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carbond.ledger.ledger import LEDGER_FILE, Ledger, connect_readonly
from carbond.types import Consumer, TickRecord
from tests.cgroup_helpers import TestTree
from tests.helpers import Samples, carbond_run, total, wait_for
from tests.powercap import ConstantPower
from tests.test_ledger import fill, tmpfs

HOST = "carbond_host_energy_joules_total"
CONSUMER = "carbond_consumer_energy_joules_total"
ERRORS = "carbond_ledger_errors_total"


def counters(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: value for key, value in samples.items()
            if key[0].startswith("carbond_") and key[0].endswith("_total")}


def config(tmp_path: Path) -> str:
    path = tmp_path / "carbond.yaml"
    path.write_text("attribution: {idle_watts: {cpu: 0}}\nledger: {flush: 1s}\n"
                    "intensity: {providers: [{constant: {grams_per_kwh: 1000}}]}\n")
    return str(path)


def report(state: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir", state,
                           "--since", "1d", *args], capture_output=True, text=True, timeout=60)


def test_a_ledger_deleted_while_running_is_noticed_and_written_again(tree: TestTree,
                                                                     tmp_path) -> None:
    """A private cgroup tree with a busy job: the host's own cgroups (other work on this
    machine) would fold into the exporter's `other`, which the ledger keeps per consumer."""
    tree.make("job")
    tree.burners.start(0.5, tree.procs("job"))
    state = tmp_path / "state"
    args = ("--powercap-root", str(tmp_path / "powercap"), "--state-dir", str(state),
            "--zone", "DE", "--config", config(tmp_path), "--interval", "1s",
            "--cgroup-root", tree.root)
    with ConstantPower(str(tmp_path / "powercap"), package_watts=100.0):
        with carbond_run(*args) as daemon:
            daemon.wait_ticks(3)
            assert wait_for(lambda: (state / LEDGER_FILE).exists())
            assert total(daemon.scrape(), ERRORS) == 0
            for path in state.glob(f"{LEDGER_FILE}*"):  # rm ledger.db*
                path.unlink()
            assert wait_for(lambda: total(daemon.scrape(), ERRORS) >= 1, timeout=20)
            assert wait_for(lambda: (state / LEDGER_FILE).exists(), timeout=20)
            daemon.wait_ticks(2)  # and a flush after it: rows of this hour are back
            last = daemon.scrape()
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(timeout=10) == 0
            log = daemon.process.stderr.read()
        assert "deleted or replaced" in log and str(state / LEDGER_FILE) in log
        result = report(str(state), "--by", "kind", "--format", "json")
        assert result.returncode == 0, result.stderr
        reported = json.loads(result.stdout)["total"]["joules"]
        with carbond_run(*args) as daemon:
            first = daemon.scrape()
    before, after = counters(last), counters(first)
    assert total(last, HOST) > 0
    for key, value in before.items():  # every counter continues, the error counter too
        assert key in after, key
        assert after[key] >= value - 1e-9 * max(1.0, value), key
    assert total(first, ERRORS) >= 1
    # the report holds the whole run: the new file is a copy of the deleted one, and more
    assert reported >= total(last, CONSUMER) * 0.999


def non_utf8_dir(tmp_path: Path) -> str:
    raw = os.fsencode(str(tmp_path)) + b"/st\xff\xfeate"
    return os.fsdecode(raw)  # surrogates, as a shell hands such a name to Python


def test_report_from_a_state_dir_whose_name_is_not_utf8(tmp_path) -> None:
    state = non_utf8_dir(tmp_path)
    a = Consumer("unit", "a.service")
    with Ledger.open(state) as ledger:
        ledger.record(TickRecord(time.time(), 60.0, {a: {"cpu": 360.0}}, {a: 0.05}, {}))
    assert os.path.isfile(os.path.join(os.fsencode(state), b"ledger.db"))
    result = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir", state,
                             "--since", "1d", "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["consumer"], r["joules"]) for r in rows] == [("a.service", 360.0)]


def test_a_corrupt_ledger_in_a_non_utf8_state_dir_is_moved_aside_at_startup(tmp_path) -> None:
    state = non_utf8_dir(tmp_path)
    os.makedirs(state)
    garbage = b"this is not a database\n" * 200
    Path(state, LEDGER_FILE).write_bytes(garbage)
    args = ("--powercap-root", str(tmp_path / "powercap"), "--state-dir", state,
            "--zone", "DE", "--config", config(tmp_path), "--interval", "1s")
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(*args) as daemon:
        daemon.wait_ticks(2)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=10) == 0
        log = daemon.process.stderr.read()
    assert "corrupt" in log and "Traceback" not in log
    moved = [name for name in os.listdir(os.fsencode(state))
             if name.startswith(b"ledger.db.corrupt-") and not name.endswith(b"-wal")]
    assert len(moved) == 1
    assert Path(state, os.fsdecode(moved[0])).read_bytes() == garbage
    result = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir", state,
                             "--since", "1d", "--format", "json"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_deleted_in_process_every_row_and_total_come_back(tmp_path, caplog) -> None:
    """The same in one process, on a simulated clock: after `rm ledger.db*` the next flush
    puts a file there holding every total and every hourly row (a copy of the deleted file,
    which the connection still has open) plus what was pending."""
    hour = 1_714_521_600 + 10 * 3600
    a, b = Consumer("unit", "a.service"), Consumer("job", "slurm/9")
    clock = Clock(hour + 60)
    state = tmp_path / "state"

    def tick(wall: float, joules: float) -> None:
        clock.now = wall
        ledger.record(TickRecord(wall, 10.0, {a: {"cpu": joules}, b: {"gpu": 2 * joules}},
                                 {a: joules / 1e4, b: joules / 5e3}, {}))

    with Ledger.open(str(state), clock=clock) as ledger:
        tick(hour - 100, 1.0)  # the hour before
        assert ledger.flush()
        tick(hour + 100, 10.0)
        assert ledger.flush()
        tick(hour + 200, 100.0)
        assert ledger.flush()
        for path in state.glob(f"{LEDGER_FILE}*"):
            path.unlink()
        tick(hour + 300, 1000.0)
        with caplog.at_level("ERROR", logger="carbond.ledger.ledger"):
            assert ledger.flush()
        assert ledger.errors_total == 1
        assert "deleted or replaced" in caplog.text
        assert (state / LEDGER_FILE).exists()
        tick(hour + 400, 10000.0)
    conn = connect_readonly(str(state))
    rows = dict(conn.execute("SELECT c.name || '@' || h.hour, h.cpu_joules + h.gpu_joules"
                             " FROM consumer_hours h JOIN consumers c ON c.id = h.consumer")
                .fetchall())
    conn.close()
    assert rows == {f"a.service@{hour}": 11110.0, f"slurm/9@{hour}": 22220.0,
                    f"a.service@{hour - 3600}": 1.0, f"slurm/9@{hour - 3600}": 2.0}
    with Ledger.open(str(state), clock=clock) as ledger:
        totals = ledger.restore()
        assert ledger.errors_total == 1  # the count continues across the restart
    assert totals.consumer_joules[a] == {"cpu": 11111.0}
    assert totals.consumer_joules[b] == {"gpu": 22222.0}
    assert totals.host_grams == pytest.approx(11111.0 / 1e4 + 11111.0 / 5e3)


def test_a_log_deleted_after_the_file_was_written_again_is_noticed_too(tmp_path) -> None:
    """`rm ledger.db*` racing a flush: the file goes, the flush writes a new one, then the
    rm takes the new one's write-ahead log (holding its commits): noticed the same way."""
    a = Consumer("unit", "a.service")
    clock = Clock(1_714_521_600 + 60)
    state = tmp_path / "state"
    with Ledger.open(str(state), clock=clock) as ledger:
        ledger.record(TickRecord(clock.now, 10.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {}))
        assert ledger.flush()
        (state / LEDGER_FILE).unlink()
        ledger.record(TickRecord(clock.now, 10.0, {a: {"cpu": 2.0}}, {a: 1e-4}, {}))
        assert ledger.flush() and ledger.errors_total == 1
        for suffix in ("-wal", "-shm"):
            Path(f"{state / LEDGER_FILE}{suffix}").unlink()
        ledger.record(TickRecord(clock.now, 10.0, {a: {"cpu": 4.0}}, {a: 1e-4}, {}))
        assert ledger.flush() and ledger.errors_total == 2
    # the file left without its log is kept aside, never added to
    assert len(list(state.glob(f"{LEDGER_FILE}.replaced-*"))) >= 1
    with Ledger.open(str(state), clock=clock) as ledger:
        assert ledger.restore().consumer_joules[a] == {"cpu": 7.0}
    conn = connect_readonly(str(state))
    assert conn.execute("SELECT SUM(cpu_joules) FROM consumer_hours").fetchone()[0] == 7.0
    conn.close()


def test_deleted_on_a_full_disk_the_totals_come_back_from_memory(tmp_path, caplog) -> None:
    """The copy of the deleted file needs space: on a full disk it fails, the ledger is
    written from memory once there is room (every total; the hourly rows written before the
    deletion are gone), and nothing recorded since is lost."""
    a = Consumer("unit", "a.service")
    clock = Clock(1_714_521_600 + 60)
    with tmpfs(tmp_path / "full", "size=1m") as state, \
            caplog.at_level("WARNING", logger="carbond.ledger.ledger"), \
            Ledger.open(str(state), clock=clock) as ledger:
        ledger.record(TickRecord(clock.now, 10.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {}))
        assert ledger.flush()
        for path in state.glob(f"{LEDGER_FILE}*"):
            path.unlink()
        fill(state / "filler")
        ledger.record(TickRecord(clock.now + 10, 10.0, {a: {"cpu": 2.0}}, {a: 1e-4}, {}))
        assert not ledger.flush()
        assert not ledger.flush()
        assert ledger.errors_total >= 2
        assert "could not copy the open file" in caplog.text
        (state / "filler").unlink()
        assert ledger.flush()
        ledger.record(TickRecord(clock.now + 20, 10.0, {a: {"cpu": 4.0}}, {a: 1e-4}, {}))
        ledger.close()
        errors = ledger.errors_total
        with Ledger.open(str(state), clock=clock) as again:
            assert again.restore().consumer_joules[a] == {"cpu": 7.0}
            assert again.errors_total == errors
        conn = connect_readonly(str(state))
        assert conn.execute("SELECT SUM(cpu_joules) FROM consumer_hours").fetchone()[0] == 6.0
        conn.close()
