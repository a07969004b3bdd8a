"""Reading the ledger: budget queries (written rows plus what is still pending) and report
aggregation, by consumer, kind, hour, project or owner (namespace, account, user).

A report opens the file read-only beside a running daemon (WAL readers never block the writer),
so everything here also reads older schemas: a v1 ledger has no embodied grams, a v2 one no
platform energy and no owner metadata (every consumer's owner is then unknown).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from carbond.ledger.pending import HourKey, HourRow
from carbond.ledger.periods import SECONDS_PER_HOUR, floor_hour, hour_fraction
from carbond.ledger.schema import LEDGER_FILE, SCHEMA_VERSION, LedgerError, columns, tables, uri
from carbond.types import Consumer

GROUPINGS = ("consumer", "kind", "hour", "project", "namespace", "account", "user")
OWNER_GROUPINGS = ("namespace", "account", "user")
UNKNOWN_OWNER = "(unknown)"  # the row of consumers whose owner of that kind is not known


@dataclass
class Usage:
    """Sums over ledger rows for one report row (or one budget)."""

    cpu_joules: float = 0.0
    dram_joules: float = 0.0
    gpu_joules: float = 0.0
    grams: float = 0.0
    embodied_grams: float = 0.0
    intensity_joules: float = 0.0
    intensity_weighted: float = 0.0
    providers: set[str] = field(default_factory=set)
    platform_joules: float = 0.0  # the node beyond cpu + dram + gpu (a platform meter's rest)

    @property
    def joules(self) -> float:
        return self.cpu_joules + self.dram_joules + self.gpu_joules + self.platform_joules

    @property
    def grid_grams_per_kwh(self) -> float | None:
        """Energy-weighted mean grid intensity, None when no energy had a figure."""
        if self.intensity_joules <= 0:
            return None
        return self.intensity_weighted / self.intensity_joules

    def add(self, other: Usage) -> None:
        self.cpu_joules += other.cpu_joules
        self.dram_joules += other.dram_joules
        self.gpu_joules += other.gpu_joules
        self.platform_joules += other.platform_joules
        self.grams += other.grams
        self.embodied_grams += other.embodied_grams
        self.intensity_joules += other.intensity_joules
        self.intensity_weighted += other.intensity_weighted
        self.providers |= other.providers


# ---- read-only access (carbond report, while the daemon runs) ------------------------------


def _open_ro(address: str) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(address, uri=True)
    try:
        return conn, conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        conn.close()
        raise


def connect_readonly(state_dir: str) -> sqlite3.Connection:
    """The ledger of `state_dir` opened read-only, without the lock: safe beside a running
    daemon. Raises LedgerError when there is none."""
    path = os.path.join(state_dir, LEDGER_FILE)
    if not os.path.isfile(path):
        raise LedgerError(f"no ledger at {path}")
    try:
        try:
            conn, version = _open_ro(uri(path, "mode=ro"))
        except sqlite3.OperationalError:
            # A read-only directory without the -shm file: read the file as it stands.
            conn, version = _open_ro(uri(path, "immutable=1"))
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} is not a readable ledger: {exc}") from None
    if not 1 <= version <= SCHEMA_VERSION:
        conn.close()
        raise LedgerError(f"{path} has ledger schema v{version}; this carbond reads "
                          f"v1 to v{SCHEMA_VERSION}")
    return conn


# ---- report aggregation ----------------------------------------------------------------------


def _provider_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {index: name for index, name in conn.execute("SELECT id, name FROM providers")}


def _mask_names(masks: str | None, names: Mapping[int, str]) -> set[str]:
    mask = 0
    for part in (masks or "").split(","):
        if part:
            mask |= int(part)
    return {name for index, name in names.items() if mask >> index & 1}


def _owner_key(conn: sqlite3.Connection, by: str) -> tuple[str, str, tuple[Any, ...]]:
    """The SQL key, join and arguments (in statement order) grouping rows by an owner label;
    a consumer of kind `user` is its own user (as budgets match it)."""
    own_name = "CASE WHEN c.kind = 'user' THEN c.name END" if by == "user" else "NULL"
    if "consumer_labels" not in tables(conn):  # a v2 ledger: no owner known
        return f"COALESCE({own_name}, ?)", "", (UNKNOWN_OWNER,)
    join = " LEFT JOIN consumer_labels l ON l.consumer = h.consumer AND l.key = ?"
    return f"COALESCE(l.value, {own_name}, ?)", join, (UNKNOWN_OWNER, by)


def aggregate(
    conn: sqlite3.Connection, since: float, until: float, by: str
) -> list[tuple[tuple[Any, ...], Usage]]:
    """Sums of the hourly rows whose hour starts in [floor_hour(since), until), grouped by
    consumer (name, kind), kind, hour, project (consumers of kind `project`), or an owner
    label as last known (namespace, account, user; one UNKNOWN_OWNER row for the rest)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}")
    present = columns(conn, "consumer_hours")
    embodied = "h.embodied_grams" if "embodied_grams" in present else "0.0"
    platform = "h.platform_joules" if "platform_joules" in present else "0.0"
    args: tuple[Any, ...] = ()
    join = " JOIN consumers c ON c.id = h.consumer"
    if by in OWNER_GROUPINGS:
        keys, owner_join, args = _owner_key(conn, by)
        group = "1"
        join += owner_join
    else:
        keys = group = {"consumer": "c.name, c.kind", "kind": "c.kind", "hour": "h.hour",
                        "project": "c.name"}[by]
        if by == "hour":
            join = ""
    where = "h.hour >= ? AND h.hour < ?" + (" AND c.kind = 'project'" if by == "project" else "")
    sql = (
        f"SELECT {keys}, SUM(h.cpu_joules), SUM(h.dram_joules), SUM(h.gpu_joules),"
        f" SUM(h.grams), SUM({embodied}), SUM(h.intensity_joules), SUM(h.intensity_weighted),"
        f" GROUP_CONCAT(DISTINCT h.providers), SUM({platform}) FROM consumer_hours h{join}"
        f" WHERE {where} GROUP BY {group}"
    )
    names = _provider_names(conn)
    width = 1 if by in OWNER_GROUPINGS else len(keys.split(","))
    rows = []
    for row in conn.execute(sql, (*args, floor_hour(since), until)):
        usage = Usage(*row[width:width + 7], providers=_mask_names(row[width + 7], names),
                      platform_joules=row[width + 8] or 0.0)
        rows.append((tuple(row[:width]), usage))
    return rows


def consumer_labels(conn: sqlite3.Connection) -> dict[Consumer, dict[str, str]]:
    """Every consumer's owner metadata as last known."""
    if "consumer_labels" not in tables(conn):
        return {}
    found: dict[Consumer, dict[str, str]] = {}
    for kind, name, key, value in conn.execute(
        "SELECT c.kind, c.name, l.key, l.value FROM consumer_labels l"
        " JOIN consumers c ON c.id = l.consumer"
    ):
        found.setdefault(Consumer(kind, name), {})[key] = value
    return found


# ---- budget queries: written rows plus what is still pending ----------------------------------


def consumer_grams(conn: sqlite3.Connection | None, pending: Mapping[HourKey, HourRow],
                   since: float, until: float, now: float) -> dict[Consumer, float]:
    """Operational grams per consumer in [since, until), written or pending. Hours cut by
    the range count in proportion (see `periods.hour_fraction`). The caller holds both locks:
    no flush moves rows between the file and `pending` while this reads."""
    result: dict[Consumer, float] = {}

    def add(consumer: Consumer, grams: float) -> None:
        result[consumer] = result.get(consumer, 0.0) + grams

    first_full = floor_hour(since)
    if first_full < since:
        first_full += SECONDS_PER_HOUR
    last_full = floor_hour(until)  # hours in [first_full, last_full) lie wholly inside
    edges = {hour for hour, cut in ((floor_hour(since), since > floor_hour(since)),
                                    (last_full, until > last_full))
             if cut and not first_full <= hour < last_full}
    if conn is not None:
        for kind, name, grams in conn.execute(
            "SELECT c.kind, c.name, SUM(h.grams) FROM consumer_hours h"
            " JOIN consumers c ON c.id = h.consumer"
            " WHERE h.hour >= ? AND h.hour < ? GROUP BY h.consumer", (first_full, last_full),
        ):
            add(Consumer(kind, name), grams)
        for hour in edges:
            fraction = hour_fraction(hour, since, until, now)
            if fraction <= 0:
                continue
            for kind, name, grams in conn.execute(
                "SELECT c.kind, c.name, h.grams FROM consumer_hours h"
                " JOIN consumers c ON c.id = h.consumer WHERE h.hour = ?", (hour,)
            ):
                add(Consumer(kind, name), grams * fraction)
    for (hour, consumer), row in pending.items():
        fraction = hour_fraction(hour, since, until, now)
        if fraction > 0:
            add(consumer, row.grams * fraction)
    return result


def hourly_grams(conn: sqlite3.Connection | None, pending: Mapping[HourKey, HourRow],
                 since: float, until: float) -> dict[int, dict[Consumer, float]]:
    """Operational grams per hour row and consumer for the hours touching [since, until),
    written or pending (for burn rates over the last day)."""
    result: dict[int, dict[Consumer, float]] = {}

    def add(hour: int, consumer: Consumer, grams: float) -> None:
        slot = result.setdefault(hour, {})
        slot[consumer] = slot.get(consumer, 0.0) + grams

    start = floor_hour(since)
    if conn is not None:
        for hour, kind, name, grams in conn.execute(
            "SELECT h.hour, c.kind, c.name, h.grams FROM consumer_hours h"
            " JOIN consumers c ON c.id = h.consumer WHERE h.hour >= ? AND h.hour < ?",
            (start, until),
        ):
            add(hour, Consumer(kind, name), grams)
    for (hour, consumer), row in pending.items():
        if start <= hour < until:
            add(hour, consumer, row.grams)
    return result
