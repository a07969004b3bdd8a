"""Owners kept in the ledger: each consumer's metadata (namespace, account, user, ...) is stored
when it changes, survives the consumer's end and a restart, and `carbond report --by
namespace|account|user` equals the sums of what was fed, in every format; the platform
component is stored and reported; a v2 ledger (no owners, no platform) still reads."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from carbond.ledger.ledger import (
    LEDGER_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    Ledger,
    aggregate,
    connect_readonly,
)
from carbond.types import IDLE, Consumer, TickRecord

HOUR = 3600
H0 = 1_714_521_600  # 2024-05-01 00:00 UTC
SINCE, UNTIL = "2024-05-01T00:00:00+00:00", "2024-05-02T00:00:00+00:00"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pod(namespace: str, name: str) -> tuple[Consumer, dict[str, str]]:
    return Consumer("pod", f"{namespace}/{name}"), {
        "namespace": namespace, "pod": name, "pod_uid": f"uid-{name}"}


def container(namespace: str, pod_name: str, name: str) -> tuple[Consumer, dict[str, str]]:
    return Consumer("container", f"{namespace}/{pod_name}/{name}"), {
        "namespace": namespace, "pod": pod_name, "container": name, "runtime": "containerd"}


def job(number: int, account: str, user: str) -> tuple[Consumer, dict[str, str]]:
    return Consumer("job", f"slurm/{number}"), {
        "account": account, "user": user, "partition": "gpu", "job_name": f"run{number}"}


OWNED = dict([
    pod("team-a", "web"), pod("team-a", "db"), pod("team-b", "train"), pod("team-c", "etl"),
    container("team-a", "web", "nginx"), container("team-b", "train", "torch"),
    job(1, "physics", "alice"), job(2, "physics", "bob"), job(3, "chem", "alice"),
])
UNOWNED = [Consumer("unit", "sshd.service"), IDLE, Consumer("user", "carol")]
LATE = Consumer("job", "slurm/3")  # its metadata becomes known only after some ticks


def feed(ledger: Ledger, clock: Clock, ticks: int) -> dict[Consumer, list[float]]:
    """`ticks` 60 s ticks over the first hours of May 1 with every consumer drawing a
    different amount (cpu, dram, gpu, platform), grams at 300 g/kWh; returns what was fed
    per consumer: [joules, grams]."""
    fed: dict[Consumer, list[float]] = {}
    everyone = [*OWNED, *UNOWNED]
    for n in range(ticks):
        wall = H0 + 60.0 * (n + 1)
        clock.now = wall
        energy, grams = {}, {}
        for i, consumer in enumerate(everyone):
            watts = 5.0 + 7.0 * i + (n % 5)
            parts = {"cpu": watts * 36.0, "dram": watts * 6.0, "gpu": watts * 12.0,
                     "platform": watts * 6.0}
            energy[consumer] = parts
            grams[consumer] = math.fsum(parts.values()) / 3.6e6 * 300.0
            got = fed.setdefault(consumer, [0.0, 0.0])
            got[0] += math.fsum(parts.values())
            got[1] += grams[consumer]
        metadata = {c: m for c, m in OWNED.items() if c != LATE or n >= 40}
        ledger.record(TickRecord(wall, 60.0, energy, grams, {}, (), 300.0, "static", metadata))
        if n % 17 == 0:
            assert ledger.flush()
    return fed


def expected_by(fed: dict[Consumer, list[float]], key: str) -> dict[str, list[float]]:
    result: dict[str, list[float]] = {}
    for consumer, (joules, grams) in fed.items():
        owner = OWNED.get(consumer, {}).get(key)
        if owner is None and key == "user" and consumer.kind == "user":
            owner = consumer.name
        row = result.setdefault(owner or "(unknown)", [0.0, 0.0])
        row[0] += joules
        row[1] += grams
    return result


def report(state: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir", state,
                           "--since", SINCE, "--until", UNTIL, *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def fed_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """Consumers fed for 3 hours, then only sshd for 8 more: the pods and jobs have ended
    (and left memory) when the report runs; the ledger closed and reopened in between."""
    state = str(tmp_path_factory.mktemp("owners") / "state")
    clock = Clock(H0)
    with Ledger.open(state, clock=clock, keep_seconds=2 * HOUR) as ledger:
        fed = feed(ledger, clock, 180)
        assert ledger.labels(LATE)["account"] == "chem"
    with Ledger.open(state, clock=clock, keep_seconds=2 * HOUR) as ledger:
        sshd = Consumer("unit", "sshd.service")
        for n in range(8):
            clock.now = H0 + 3 * HOUR + (n + 1) * HOUR
            ledger.record(TickRecord(clock.now, 60.0, {sshd: {"cpu": 100.0}},
                                     {sshd: 100.0 / 3.6e6 * 300.0}, {}, (), 300.0, "static"))
            fed[sshd][0] += 100.0
            fed[sshd][1] += 100.0 / 3.6e6 * 300.0
            assert ledger.flush()
        # the ended consumers' totals left memory; the file keeps them and their owners
        assert ledger.consumers_in_memory == 1
        assert ledger.labels(LATE) == {}
        known = ledger.stored_labels()  # what seeds owner budgets at start
        assert {c: known[c] for c in OWNED} == OWNED
    return state, fed


@pytest.mark.parametrize("by", ["namespace", "account", "user"])
def test_report_by_owner_equals_what_was_fed_after_the_consumers_ended(fed_ledger, by):
    state, fed = fed_ledger
    expected = expected_by(fed, by)
    result = report(state, "--by", by, "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    rows = {row[by]: row for row in doc["rows"]}
    assert set(rows) == set(expected)
    for owner, (joules, grams) in expected.items():
        assert rows[owner]["joules"] == pytest.approx(joules, rel=1e-9), owner
        assert rows[owner]["grams"] == pytest.approx(grams, rel=1e-9), owner
    everything = math.fsum(j for j, _ in fed.values())
    assert doc["total"]["joules"] == pytest.approx(everything, rel=1e-9)
    # the rest of the node is its own column, a part of the energy
    assert 0 < doc["total"]["platform_joules"] < doc["total"]["joules"]


def test_namespaces_and_accounts_as_csv_and_table(fed_ledger):
    state, fed = fed_ledger
    result = report(state, "--by", "namespace", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = {row["namespace"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    expected = expected_by(fed, "namespace")
    assert set(rows) == {*expected, "total"}
    assert set(expected) == {"team-a", "team-b", "team-c", "(unknown)"}
    for owner, (joules, grams) in expected.items():
        assert float(rows[owner]["joules"]) == pytest.approx(joules, rel=1e-9)
        assert float(rows[owner]["grams"]) == pytest.approx(grams, rel=1e-9)
    table = report(state, "--by", "account")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:2] == ["ACCOUNT", "CPU"] and "PLATFORM" in lines[1]
    assert {line.split()[0] for line in lines[3:-2]} == {"physics", "chem", "(unknown)"}


def test_owners_need_the_ledger_not_prometheus(fed_ledger):
    state, _ = fed_ledger
    result = report(state, "--by", "account", "--prometheus", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "--by" in result.stderr and "Traceback" not in result.stderr


def test_metadata_is_written_when_it_changes(tmp_path):
    """Unchanged metadata adds no write (a trigger counts the rows written); a change
    replaces the stored set; a tick without metadata for a consumer keeps what is known."""
    state = str(tmp_path)
    clock = Clock(H0 + 60)
    a, meta = job(7, "physics", "alice")
    with Ledger.open(state, clock=clock) as ledger:
        ledger.record(TickRecord(H0 + 60, 60.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {},
                                 metadata={a: meta}))
        assert ledger.flush()
        spy = sqlite3.connect(Path(state) / LEDGER_FILE, isolation_level=None)
        spy.execute("CREATE TABLE label_writes (n INTEGER)")
        spy.execute("CREATE TRIGGER count_label_writes AFTER INSERT ON consumer_labels"
                    " BEGIN INSERT INTO label_writes VALUES (1); END")
        for n in range(1, 4):
            ledger.record(TickRecord(H0 + 60 * (n + 1), 60.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {},
                                     metadata={a: dict(meta)}))
            assert ledger.flush()
        assert spy.execute("SELECT COUNT(*) FROM label_writes").fetchone()[0] == 0
        ledger.record(TickRecord(H0 + 300, 60.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {},
                                 metadata={a: {**meta, "account": "chem"}}))
        ledger.record(TickRecord(H0 + 360, 60.0, {a: {"cpu": 1.0}}, {a: 1e-4}, {}))
        assert ledger.flush()
        assert spy.execute("SELECT COUNT(*) FROM label_writes").fetchone()[0] == len(meta)
        spy.close()
    conn = connect_readonly(state)
    stored = dict(conn.execute("SELECT key, value FROM consumer_labels").fetchall())
    conn.close()
    assert stored == {**meta, "account": "chem"}


def make_v2(state: Path) -> None:
    """A ledger as carbond with schema v2 wrote it: no platform column, no owners."""
    state.mkdir()
    conn = sqlite3.connect(state / LEDGER_FILE)
    for step in MIGRATIONS[:2]:
        for statement in step:
            conn.execute(statement)
    conn.execute("INSERT INTO consumers VALUES (1, 'job', 'slurm/1')")
    conn.execute(f"INSERT INTO consumer_hours (hour, consumer, cpu_joules, grams) VALUES "
                 f"({H0}, 1, 500, 2.5)")
    conn.execute(f"INSERT INTO consumer_totals VALUES (1, 2.5, {H0 + 60}, 0)")
    conn.execute("INSERT INTO consumer_energy_totals VALUES (1, 'cpu', 500)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()


def test_a_v2_ledger_reads_and_migrates_keeping_its_rows(tmp_path):
    state = tmp_path / "state"
    make_v2(state)
    conn = connect_readonly(str(state))
    assert aggregate(conn, H0, H0 + HOUR, "account")[0][0] == ("(unknown)",)
    conn.close()
    a, meta = job(1, "physics", "alice")
    with Ledger.open(str(state), clock=Clock(H0 + 120)) as ledger:
        assert ledger.restore().consumer_joules[a] == {"cpu": 500.0}
        ledger.record(TickRecord(H0 + 120, 60.0, {a: {"cpu": 10.0, "platform": 5.0}},
                                 {a: 0.5}, {}, metadata={a: meta}))
    conn = connect_readonly(str(state))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (key, usage), = aggregate(conn, H0, H0 + HOUR, "account")
    conn.close()
    assert key == ("physics",)
    assert usage.cpu_joules == 510.0 and usage.platform_joules == 5.0 and usage.grams == 3.0
