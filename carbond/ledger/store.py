"""The ledger file: the state directory's lock, opening (create, migrate, check), salvage of a
corrupt file, the one transaction a flush writes, retention, and noticing that the file at the
path is no longer the one open (deleted or replaced under a running daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable

from carbond.ledger.pending import Batch
from carbond.ledger.schema import (
    LOCK_FILE,
    LedgerLocked,
    Totals,
    describe,
    migrate,
    read_consumer_totals,
    read_labels,
    read_totals,
    uri,
)
from carbond.types import Consumer

log = logging.getLogger("carbond.ledger.ledger")  # one logger for the ledger's messages

FileIdentity = tuple[int, int]  # st_dev, st_ino


def file_identity(path: str) -> FileIdentity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Store:
    """One state directory's lock and ledger connection. The Ledger serialises calls."""

    def __init__(self, state_dir: str, path: str, clock: Callable[[], float]) -> None:
        self.state_dir = state_dir
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.lock_fd: int | None = None
        self.identity: FileIdentity | None = None  # of the file `conn` has open
        self.wal_identity: FileIdentity | None = None  # of its write-ahead log, once written
        self.ids: dict[Consumer, int] = {}  # of the consumers memory holds
        self._clock = clock

    # ---- the lock --------------------------------------------------------------------------

    def take_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
        path = os.path.join(self.state_dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError:
            try:  # a read-only directory: lock the file that is there, if any
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return  # nothing to lock and nothing we could write either; retried later
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                pid = int(os.pread(fd, 32, 0).decode().strip())
                holder = f" (pid {pid})"
            os.close(fd)
            raise LedgerLocked(
                f"another carbond{holder} holds the ledger in {self.state_dir} "
                f"(lock {path}); give each daemon its own --state-dir"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def release_lock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = None

    # ---- the connection --------------------------------------------------------------------

    def open_checked(self) -> sqlite3.Connection:
        """Open (create, migrate) the file and check it; sets `conn` and its identity."""
        conn = sqlite3.connect(os.fsencode(self.path), timeout=5.0, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses nothing
            if conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
            migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.identity = file_identity(self.path)
        self.wal_identity = None
        self.ids = {}
        return conn

    def replaced(self) -> bool:
        """True when the file at the path is no longer the one open: deleted (`rm
        ledger.db*`), or replaced by another file; the same for its write-ahead log, which
        holds the latest commits until a checkpoint. Checked before every flush."""
        if self.conn is None:
            return False
        if file_identity(self.path) != self.identity:
            return True
        return self.wal_identity is not None and \
            file_identity(self.path + "-wal") != self.wal_identity

    def close_conn(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None
            self.identity = self.wal_identity = None
            self.ids = {}

    def checkpoint(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- reading ---------------------------------------------------------------------------

    def load(self, keep_since: float | None, keep_consumers: int | None = None
             ) -> tuple[Totals, dict[Consumer, dict[str, str]], dict[str, int]]:
        """Totals (consumers booked within `keep_since` of the newest, at most the
        `keep_consumers` most recent), their labels and the stored provider bits."""
        conn = self.conn
        assert conn is not None
        newest = conn.execute("SELECT MAX(updated) FROM consumer_totals").fetchone()[0]
        since = newest - keep_since if newest is not None and keep_since is not None else None
        if newest is not None and keep_consumers is not None:
            nth = conn.execute("SELECT updated FROM consumer_totals ORDER BY updated DESC"
                               " LIMIT 1 OFFSET ?", (keep_consumers - 1,)).fetchone()
            if nth is not None:
                since = nth[0] if since is None else max(since, nth[0])
        totals = read_totals(conn, since)
        self.ids = read_consumer_totals(conn, Totals(), since)
        labels = read_labels(conn, self.ids)
        providers = dict(conn.execute("SELECT name, id FROM providers").fetchall())
        return totals, labels, providers

    def stored(self, consumers: Iterable[Consumer]
               ) -> tuple[Totals, dict[Consumer, dict[str, str]]]:
        """The stored totals and labels of `consumers` (those back after leaving memory)."""
        conn = self.conn
        assert conn is not None
        found: dict[Consumer, int] = {}
        for consumer in consumers:  # one indexed lookup each (a row-value IN scans the table)
            row = conn.execute("SELECT id FROM consumers WHERE kind = ? AND name = ?",
                               consumer).fetchone()
            if row is not None:
                found[consumer] = row[0]
        totals = Totals()
        if found:
            read_consumer_totals(conn, totals, only=found.values())
        self.ids.update(found)
        return totals, read_labels(conn, found)

    def forget(self, consumers: Iterable[Consumer]) -> None:
        for consumer in consumers:
            self.ids.pop(consumer, None)

    def rescue(self) -> str | None:
        """The file at the path is not the one open (deleted, or replaced): copy what the
        open connection still reads (the deleted file and its log, whole) to a new file at
        the path, setting aside whatever is there now. Returns the name it was set aside to;
        raises sqlite3.Error or OSError when the copy fails (then nothing was moved)."""
        old = self.conn
        assert old is not None
        copy = self.path + ".rescue"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
        new = sqlite3.connect(os.fsencode(copy))
        try:
            old.backup(new)
            new.execute("PRAGMA journal_mode=DELETE")
        except BaseException:
            new.close()
            with contextlib.suppress(OSError):
                os.unlink(copy)
            raise
        new.close()
        self.close_conn()
        aside = self.set_aside("replaced")
        os.replace(copy, self.path)
        return aside

    # ---- corruption ------------------------------------------------------------------------

    def salvage(self) -> Totals | None:
        """The totals of a corrupt ledger when its totals pages still read."""
        with contextlib.suppress(sqlite3.Error, OSError):
            conn = sqlite3.connect(uri(self.path, "mode=ro"), uri=True)
            try:
                return read_totals(conn)
            finally:
                conn.close()
        return None

    def move_aside(self, exc: BaseException) -> None:
        target = self.set_aside("corrupt")
        log.error("ledger %s is corrupt (%s): moved to %s, starting a fresh ledger",
                  self.path, describe(exc), target)

    def set_aside(self, tag: str) -> str | None:
        """Rename the file at the path (with its log) to `PATH.TAG-STAMP`, never overwriting
        an earlier one; the name it got, or None when there was no file."""
        if not os.path.lexists(self.path):
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = f"{self.path}.{tag}-{stamp}"
        serial = 1
        while os.path.exists(target):
            target = f"{self.path}.{tag}-{stamp}.{serial}"
            serial += 1
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                if suffix == "-wal":
                    os.replace(self.path + suffix, target + suffix)
                else:
                    os.unlink(self.path + suffix)
        return target

    # ---- writing ---------------------------------------------------------------------------

    def _resolve_ids(self, conn: sqlite3.Connection, consumers: Iterable[Consumer],
                     staged: dict[Consumer, int]) -> None:
        for consumer in consumers:
            if consumer in self.ids or consumer in staged:
                continue
            conn.execute("INSERT OR IGNORE INTO consumers (kind, name) VALUES (?, ?)", consumer)
            staged[consumer] = conn.execute(
                "SELECT id FROM consumers WHERE kind = ? AND name = ?", consumer).fetchone()[0]

    def write(self, batch: Batch) -> None:
        """The batch in one transaction: all of it or (on any error) none."""
        conn = self.conn
        assert conn is not None
        staged: dict[Consumer, int] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._resolve_ids(conn, batch.consumers(), staged)
            ids = self.ids | staged if staged else self.ids
            conn.executemany("INSERT OR IGNORE INTO providers (id, name) VALUES (?, ?)",
                             batch.providers)
            conn.executemany(
                "INSERT INTO consumer_hours (hour, consumer, cpu_joules, dram_joules,"
                " gpu_joules, platform_joules, grams, embodied_grams, intensity_joules,"
                " intensity_weighted, providers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (hour, consumer) DO UPDATE SET"
                " cpu_joules = cpu_joules + excluded.cpu_joules,"
                " dram_joules = dram_joules + excluded.dram_joules,"
                " gpu_joules = gpu_joules + excluded.gpu_joules,"
                " platform_joules = platform_joules + excluded.platform_joules,"
                " grams = grams + excluded.grams,"
                " embodied_grams = embodied_grams + excluded.embodied_grams,"
                " intensity_joules = intensity_joules + excluded.intensity_joules,"
                " intensity_weighted = intensity_weighted + excluded.intensity_weighted,"
                " providers = providers | excluded.providers",
                [(hour, ids[c], r.cpu_joules, r.dram_joules, r.gpu_joules, r.platform_joules,
                  r.grams, r.embodied_grams, r.intensity_joules, r.intensity_weighted,
                  r.providers) for (hour, c), r in batch.hours.items()],
            )
            conn.executemany(
                "INSERT INTO host_hours (hour, component, device, source, joules)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (hour, component, device, source)"
                " DO UPDATE SET joules = joules + excluded.joules",
                [(*slot, joules) for slot, joules in batch.devices.items()],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO consumer_energy_totals (consumer, component, joules)"
                " VALUES (?, ?, ?)", [(ids[c], comp, j) for c, comp, j in batch.energy])
            conn.executemany(
                "INSERT OR REPLACE INTO consumer_totals (consumer, grams, embodied_grams,"
                " updated) VALUES (?, ?, ?, ?)", [(ids[c], *rest) for c, *rest in batch.grams])
            for consumer, labels in batch.labels:
                conn.execute("DELETE FROM consumer_labels WHERE consumer = ?", (ids[consumer],))
                conn.executemany(
                    "INSERT INTO consumer_labels (consumer, key, value) VALUES (?, ?, ?)",
                    [(ids[consumer], key, value) for key, value in sorted(labels.items())])
            conn.executemany(
                "INSERT OR REPLACE INTO device_totals (component, device, source, joules)"
                " VALUES (?, ?, ?, ?)", batch.device_totals)
            conn.executemany("INSERT OR REPLACE INTO host_totals (key, value) VALUES (?, ?)",
                             batch.host)
            conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                             batch.state)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self.ids.update(staged)
        if self.wal_identity is None:  # the log exists while the connection is open
            self.wal_identity = file_identity(self.path + "-wal")

    def retention(self, cutoff: int) -> bool:
        """Drop rows and consumers older than `cutoff`; True when consumers went."""
        conn = self.conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM consumer_hours WHERE hour < ?", (cutoff,))
            conn.execute("DELETE FROM host_hours WHERE hour < ?", (cutoff,))
            gone = conn.execute("DELETE FROM consumer_totals WHERE updated < ?",
                                (cutoff,)).rowcount
            if gone:
                conn.execute("DELETE FROM consumer_energy_totals WHERE consumer NOT IN"
                             " (SELECT consumer FROM consumer_totals)")
                conn.execute("DELETE FROM consumer_labels WHERE consumer NOT IN"
                             " (SELECT consumer FROM consumer_totals)")
                conn.execute("DELETE FROM consumers WHERE id NOT IN"
                             " (SELECT consumer FROM consumer_totals)")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if gone:
            self.ids = {}  # ids are looked up again as they are needed
        return bool(gone)
