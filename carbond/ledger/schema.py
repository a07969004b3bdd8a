"""The ledger's SQLite schema, its migrations, and the totals as stored.

Layout (schema v3, `PRAGMA user_version`):
- `consumers(id, kind, name)`: ids keep the hourly rows small (about 1.9 million of them for
  200 consumers over 400 days).
- `consumer_hours(hour, consumer, cpu/dram/gpu/platform_joules, grams, embodied_grams,
  intensity_joules, intensity_weighted, providers)`: `hour` is the UTC hour's start in epoch
  seconds; the mean grid intensity is `intensity_weighted / intensity_joules` (energy-weighted
  g/kWh over the energy that had a figure); `providers` is a bit mask over `providers(id, name)`.
- `consumer_labels(consumer, key, value)`: the consumer's owner metadata (its
  `carbond_consumer_info` labels: namespace, account, user, ...), as last known; kept after the
  consumer ends, so a Slurm job's account is known for its rows afterwards.
- `host_hours(hour, component, device, source, joules)`.
- `consumer_totals`, `consumer_energy_totals`, `device_totals`, `host_totals` (grams,
  embodied_grams, first_record) and `state(key, JSON value)` for whatever else the daemon keeps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from carbond.types import Consumer

log = logging.getLogger("carbond.ledger.ledger")  # one logger for the ledger

LEDGER_FILE = "ledger.db"
LOCK_FILE = "ledger.lock"
SCHEMA_VERSION = 3
COMPONENTS = ("cpu", "dram", "gpu", "platform")

DeviceKey = tuple[str, str, str]  # component, device, source

# Index i moves a database from user_version i to i + 1. Never edit a step once released:
# add one. v1 -> v2 added embodied carbon (the SCI "M") next to operational emissions;
# v2 -> v3 the platform component (the node beyond cpu + dram + gpu) and owner metadata.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
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
        "CREATE TABLE consumer_energy_totals (consumer INTEGER NOT NULL,"
        " component TEXT NOT NULL, joules REAL NOT NULL,"
        " PRIMARY KEY (consumer, component)) WITHOUT ROWID",
        "CREATE TABLE device_totals (component TEXT NOT NULL, device TEXT NOT NULL,"
        " source TEXT NOT NULL, joules REAL NOT NULL,"
        " PRIMARY KEY (component, device, source)) WITHOUT ROWID",
        "CREATE TABLE host_totals (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID",
        "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    ),
    (
        "ALTER TABLE consumer_hours ADD COLUMN embodied_grams REAL NOT NULL DEFAULT 0",
        "ALTER TABLE consumer_totals ADD COLUMN embodied_grams REAL NOT NULL DEFAULT 0",
    ),
    (
        "ALTER TABLE consumer_hours ADD COLUMN platform_joules REAL NOT NULL DEFAULT 0",
        "CREATE TABLE consumer_labels (consumer INTEGER NOT NULL, key TEXT NOT NULL,"
        " value TEXT NOT NULL, PRIMARY KEY (consumer, key)) WITHOUT ROWID",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class LedgerError(Exception):
    """The ledger cannot be used as asked; the message says why and what to do."""


class LedgerLocked(LedgerError):
    """Another process holds the ledger of this state directory."""


@dataclass
class Totals:
    """Running totals as of the last flush (or as recorded since, for `Ledger.restore()`)."""

    consumer_joules: dict[Consumer, dict[str, float]] = field(default_factory=dict)
    consumer_grams: dict[Consumer, float] = field(default_factory=dict)
    consumer_embodied_grams: dict[Consumer, float] = field(default_factory=dict)
    consumer_updated: dict[Consumer, float] = field(default_factory=dict)  # last wall time
    device_joules: dict[DeviceKey, float] = field(default_factory=dict)
    host_grams: float = 0.0
    host_embodied_grams: float = 0.0
    first_record: float | None = None  # wall time the ledger began
    state: dict[str, Any] = field(default_factory=dict)

    def forget(self, consumer: Consumer) -> None:
        for table in (self.consumer_joules, self.consumer_grams,
                      self.consumer_embodied_grams, self.consumer_updated):
            table.pop(consumer, None)

    def copy(self) -> Totals:
        return Totals(
            consumer_joules={c: dict(parts) for c, parts in self.consumer_joules.items()},
            consumer_grams=dict(self.consumer_grams),
            consumer_embodied_grams=dict(self.consumer_embodied_grams),
            consumer_updated=dict(self.consumer_updated),
            device_joules=dict(self.device_joules),
            host_grams=self.host_grams,
            host_embodied_grams=self.host_embodied_grams,
            first_record=self.first_record,
            state=json.loads(json.dumps(self.state)),
        )


def positive(value: float) -> bool:
    """True for a finite amount > 0; NaN, inf and negatives never reach a total."""
    return 0.0 < value < math.inf


def text(value: object) -> str:
    """Text SQLite can store (UTF-8): lone surrogates from undecodable bytes are escaped."""
    result = str(value)
    try:
        result.encode("utf-8")
    except UnicodeEncodeError:
        result = result.encode("utf-8", "backslashreplace").decode("utf-8")
    return result


def uri(path: str, query: str) -> str:
    """A SQLite file URI for any path, also one whose bytes are not UTF-8 (a state directory
    named by undecodable bytes arrives as surrogates, which `quote` of a str refuses)."""
    return f"file:{urllib.parse.quote(os.fsencode(path))}?{query}"


def is_corrupt(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    message = str(exc)
    return "malformed" in message or "not a database" in message


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring a database to SCHEMA_VERSION in one transaction; returns the version found."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise LedgerError(
            f"{path} has ledger schema v{found}, newer than this carbond's v{SCHEMA_VERSION}: "
            "run the newer carbond, or move the file away to start a new ledger"
        )
    if found < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for version in range(found, SCHEMA_VERSION) if found else ():  # one line a step
            log.info("ledger %s migrated from schema v%d to v%d", path, version, version + 1)
    return found


def read_consumer_totals(conn: sqlite3.Connection, totals: Totals, since: float | None = None,
                         only: Iterable[int] | None = None) -> dict[Consumer, int]:
    """Consumer totals into `totals`: all, those updated at or after `since`, or the ids in
    `only`; returns the ids of the consumers read."""
    where: str
    args: tuple[Any, ...] = ()
    if only is not None:
        where = f" WHERE t.consumer IN ({','.join(str(int(i)) for i in only) or 'NULL'})"
        energy_where = where
    elif since is not None:
        where, args = " WHERE t.updated >= ?", (since,)
        energy_where = (" WHERE t.consumer IN (SELECT consumer FROM consumer_totals"
                        " WHERE updated >= ?)")
    else:
        where = energy_where = ""
    ids: dict[Consumer, int] = {}
    for consumer_id, kind, name, grams, embodied, updated in conn.execute(
        "SELECT t.consumer, c.kind, c.name, t.grams, t.embodied_grams, t.updated"
        " FROM consumer_totals t JOIN consumers c ON c.id = t.consumer" + where, args
    ):
        consumer = Consumer(kind, name)
        ids[consumer] = consumer_id
        totals.consumer_grams[consumer] = grams
        totals.consumer_embodied_grams[consumer] = embodied
        totals.consumer_updated[consumer] = updated
    for kind, name, component, joules in conn.execute(
        "SELECT c.kind, c.name, t.component, t.joules FROM consumer_energy_totals t"
        " JOIN consumers c ON c.id = t.consumer" + energy_where, args
    ):
        totals.consumer_joules.setdefault(Consumer(kind, name), {})[component] = joules
    return ids


def read_totals(conn: sqlite3.Connection, since: float | None = None) -> Totals:
    """The stored totals; consumer totals only of those updated at or after `since` (the
    others stay in the file until they return)."""
    totals = Totals()
    read_consumer_totals(conn, totals, since)
    for component, device, source, joules in conn.execute(
        "SELECT component, device, source, joules FROM device_totals"
    ):
        totals.device_joules[(component, device, source)] = joules
    host = dict(conn.execute("SELECT key, value FROM host_totals").fetchall())
    totals.host_grams = host.get("grams", 0.0)
    totals.host_embodied_grams = host.get("embodied_grams", 0.0)
    totals.first_record = host.get("first_record")
    for key, value in conn.execute("SELECT key, value FROM state"):
        with contextlib.suppress(ValueError):
            totals.state[key] = json.loads(value)
    return totals


def read_labels(conn: sqlite3.Connection, ids: dict[Consumer, int]
                ) -> dict[Consumer, dict[str, str]]:
    """The stored owner metadata of the consumers in `ids`."""
    if not ids or "consumer_labels" not in tables(conn):
        return {}
    names = {i: c for c, i in ids.items()}
    found: dict[Consumer, dict[str, str]] = {}
    listed = ",".join(str(int(i)) for i in names)
    for consumer_id, key, value in conn.execute(
        f"SELECT consumer, key, value FROM consumer_labels WHERE consumer IN ({listed})"
    ):
        found.setdefault(names[consumer_id], {})[key] = value
    return found
