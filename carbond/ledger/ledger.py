"""The durable ledger: hourly rows and running totals in SQLite (WAL) under the state directory.

The tick only calls `record()`, which adds to memory (`pending.Book`); a background thread
`flush()`es everything pending in one transaction (`store.Store`), so a slow or full disk never
delays a tick and a crash loses at most one flush interval. A failed flush keeps its data in
memory and the next one retries it. Totals are written as absolute values and restored at
start, so every exported `*_total` counter continues across restarts. A ledger file deleted or
replaced under the running daemon is noticed at the next flush, logged, counted, and put back:
copied whole from the deleted file the connection still has open (else every total from
memory). Reading: `queries` (budgets, reports).
The schema and its migrations: `schema`.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from carbond.ledger.pending import MAX_PENDING_ROWS, Batch, Book, HourRow
from carbond.ledger.periods import floor_hour
from carbond.ledger.queries import (
    GROUPINGS,
    OWNER_GROUPINGS,
    UNKNOWN_OWNER,
    Usage,
    aggregate,
    connect_readonly,
    consumer_grams,
    consumer_labels,
    hourly_grams,
)
from carbond.ledger.schema import (
    COMPONENTS,
    LEDGER_FILE,
    LOCK_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    DeviceKey,
    LedgerError,
    LedgerLocked,
    Totals,
    describe,
    is_corrupt,
    migrate,
    read_totals,
)
from carbond.ledger.store import Store
from carbond.types import Consumer, TickRecord

__all__ = [
    "COMPONENTS", "GROUPINGS", "LEDGER_FILE", "LOCK_FILE", "MAX_PENDING_ROWS", "MIGRATIONS",
    "OWNER_GROUPINGS", "SCHEMA_VERSION", "UNKNOWN_OWNER", "DeviceKey", "HourRow", "Ledger",
    "LedgerError", "LedgerLocked", "Totals", "Usage", "aggregate", "connect_readonly",
    "consumer_labels", "migrate", "read_totals",
]

log = logging.getLogger(__name__)

DEFAULT_FLUSH_SECONDS = 30.0
DEFAULT_RETENTION_SECONDS = 400 * 86400.0
RETENTION_EVERY_SECONDS = 3600.0
# Totals of a consumer not booked for this long leave memory (they stay in the file and are
# read back when it returns): memory holds the consumers of the last hours, not of 400 days.
DEFAULT_KEEP_SECONDS = 6 * 3600.0
# ... and at most this many, the most recently booked (under churn, thousands of consumers a
# minute, 6 hours' worth would still grow without bound): about 6 MiB of totals.
DEFAULT_KEEP_CONSUMERS = 10_000
ERRORS_STATE = "ledger_errors_total"  # the error counter continues across restarts too


def _count(value: object) -> int:
    """A stored counter, or 0 for anything that is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Ledger:
    """One state directory's ledger, held exclusively by this process."""

    def __init__(self, state_dir: str, retention_seconds: float,
                 clock: Callable[[], float],
                 keep_seconds: float = DEFAULT_KEEP_SECONDS,
                 keep_consumers: int = DEFAULT_KEEP_CONSUMERS) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LEDGER_FILE)
        self.retention_seconds = retention_seconds
        self.keep_seconds = keep_seconds
        self.keep_consumers = keep_consumers
        self._clock = clock
        self._lock = threading.Lock()  # memory: the book
        self._db_lock = threading.RLock()  # the store; held through a flush
        self._book = Book(self._warn_once)
        self._store = Store(state_dir, self.path, clock)
        self._loaded = False
        self._errors_total = 0
        self._last_error: str | None = None
        self._warned: set[str] = set()
        self._last_retention = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: str,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], float] = time.time,
        keep_seconds: float = DEFAULT_KEEP_SECONDS,
        keep_consumers: int = DEFAULT_KEEP_CONSUMERS,
    ) -> Ledger:
        """Lock the directory, open (create, migrate) the ledger and load its totals.

        Raises LedgerLocked when another process holds it, LedgerError for a ledger written by
        a newer carbond. A corrupt file is moved aside and a fresh one started; a directory
        that cannot be written (read-only, full, missing) is not an error here: the ledger
        works from memory, counts the failure in `errors_total` and retries on every flush.
        """
        ledger = cls(state_dir, retention_seconds, clock, keep_seconds, keep_consumers)
        ledger._store.take_lock()
        try:
            with ledger._db_lock:
                ledger._connect()
        except LedgerError:
            ledger._store.release_lock()
            raise
        except (sqlite3.Error, OSError) as exc:
            ledger._failed(exc)
            ledger._load_readonly()
        return ledger

    def _connect(self) -> None:
        """Open the database into the store; a corrupt one is moved aside (once)."""
        store = self._store
        if store.lock_fd is None:
            store.take_lock()
        try:
            store.open_checked()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            self._salvage()
            store.move_aside(exc)
            with self._lock:
                self._book.rewrite_everything()  # whatever memory holds goes into the new file
            store.open_checked()
        self._load()

    def _load(self) -> None:
        """Provider bits and (the first time) the totals, from the open database."""
        totals, labels, providers = self._store.load(self.keep_seconds, self.keep_consumers)
        with self._lock:
            book = self._book
            for name, index in providers.items():
                book.provider_bits.setdefault(name, index)
            if not self._loaded:
                book.totals, book.labels = totals, labels
                self._loaded = True
                self._errors_total += _count(totals.state.get(ERRORS_STATE))

    def _load_readonly(self) -> None:
        """Totals from a ledger this process cannot write (read-only directory)."""
        if not os.path.exists(self.path):
            return
        try:
            conn = connect_readonly(self.state_dir)
        except (LedgerError, sqlite3.Error, OSError) as exc:
            log.warning("ledger %s unreadable (%s): totals start from zero", self.path,
                        describe(exc))
            return
        try:
            with self._lock:
                if not self._loaded:
                    self._book.totals = read_totals(conn)
                    self._loaded = True
                    self._errors_total += _count(self._book.totals.state.get(ERRORS_STATE))
                for name, index in conn.execute("SELECT name, id FROM providers"):
                    self._book.provider_bits.setdefault(name, index)
        except sqlite3.Error as exc:
            log.warning("ledger %s unreadable (%s): totals start from zero", self.path,
                        describe(exc))
        finally:
            conn.close()

    def _salvage(self) -> None:
        """Keep the totals of a corrupt ledger when its totals pages still read."""
        if self._loaded:
            return
        totals = self._store.salvage()
        if totals is not None:
            with self._lock:
                self._book.totals = totals
                self._loaded = True
                self._errors_total += _count(totals.state.get(ERRORS_STATE))

    # ---- the tick path: memory only ---------------------------------------------------------

    def restore(self) -> Totals:
        """The totals as loaded at open (and recorded since): exported counters start here.
        Consumers not booked within `keep_seconds` of the newest stay in the file."""
        with self._lock:
            return self._book.totals.copy()

    def record(self, record: TickRecord) -> None:
        """Book one tick: energy per consumer and component, its operational and embodied
        grams, host energy per device, the intensity (with its provider) it used, and each
        consumer's owner metadata (written only when it changes).

        Memory only and O(consumers); never raises (a bad value is skipped and logged once).
        """
        try:
            with self._lock:
                self._book.book(record)
        except Exception as exc:
            self._warn_once(f"record: {exc!r}", "ledger record skipped a tick: %r", exc)

    def put_state(self, key: str, value: Any) -> None:
        """Keep a JSON-serialisable value (counters, learned baselines) across restarts."""
        with self._lock:
            if self._book.totals.state.get(key) == value:
                return  # the daemon puts its counters every tick; most ticks change none
        text = json.dumps(value, allow_nan=False)
        with self._lock:
            self._book.put_state(key, json.loads(text))

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._book.totals.state.get(key, default)

    @property
    def errors_total(self) -> int:
        """Failed flushes and opens, ledger files found deleted: carbond_ledger_errors_total."""
        return self._errors_total

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def pending_rows(self) -> int:
        with self._lock:
            return len(self._book.hours)

    @property
    def consumers_in_memory(self) -> int:
        """How many consumers' totals memory holds (the rest are in the file)."""
        with self._lock:
            return len(self._book.totals.consumer_updated)

    @property
    def first_record(self) -> float | None:
        with self._lock:
            return self._book.totals.first_record

    # ---- flushing ----------------------------------------------------------------------------

    def flush(self) -> bool:
        """Write everything pending in one transaction; False (and the data kept for the
        next try) when the disk refuses. Never raises for I/O or database errors."""
        with self._db_lock:
            if self._closed and self._store.lock_fd is None:
                return False  # closed: never reopen the file behind the caller's back
            batch: Batch | None = None
            try:
                if self._store.replaced():
                    self._recreate()
                if self._store.conn is None:
                    self._connect()
                self._resolve_returning()
                with self._lock:
                    if self._book.totals.state.get(ERRORS_STATE, 0) != self._errors_total:
                        self._book.put_state(ERRORS_STATE, self._errors_total)
                    batch = self._book.take()
                if not batch.empty():
                    self._store.write(batch)
            except (sqlite3.Error, OSError, LedgerError) as exc:
                if batch is not None:
                    with self._lock:
                        self._book.put_back(batch)
                self._failed(exc)
                if isinstance(exc, sqlite3.DatabaseError) and is_corrupt(exc):
                    self._recover_corrupt(exc)
                return False
            if self._last_error is not None:
                log.info("ledger %s: writes resumed", self.path)
                self._last_error = None
            self._evict()
            self._retention()
            return True

    def _resolve_returning(self) -> None:
        """Consumers booked that memory held no totals for: add what the file holds."""
        with self._lock:
            asked = list(self._book.unresolved)
        if not asked:
            return
        stored, labels = self._store.stored(asked)
        with self._lock:
            self._book.resolve(stored, labels, asked)

    def _evict(self) -> None:
        with self._lock:
            updated = self._book.totals.consumer_updated
            newest = max(updated.values(), default=None)
            if newest is None:
                return
            before = newest - self.keep_seconds
            if len(updated) > self.keep_consumers:
                before = max(before, heapq.nlargest(self.keep_consumers, updated.values())[-1])
            gone = self._book.evict(before)
        self._store.forget(gone)

    def _recreate(self) -> None:
        """The file at the path is not the one open (deleted, or another put there): say so,
        count it, and put a ledger there again: a copy of the open (deleted) file, whole;
        failing that, one written from memory (every total; the hourly rows are lost)."""
        self._errors_total += 1
        try:
            aside = self._store.rescue()
            how = "copied it whole from the file still open"
        except (sqlite3.Error, OSError) as exc:
            self._store.close_conn()
            aside = self._store.set_aside("replaced")
            with self._lock:
                self._book.rewrite_everything()
            how = f"could not copy the open file ({describe(exc)}): writing every total " \
                "from memory, the hourly rows written so far are lost"
        log.error("ledger %s was deleted or replaced while open: %s%s", self.path, how,
                  f"; what was at the path is now {aside}" if aside else "")

    def _recover_corrupt(self, exc: BaseException) -> None:
        """Corruption found while running: start a fresh file; memory holds the totals."""
        store = self._store
        store.close_conn()
        try:
            store.move_aside(exc)
            with self._lock:
                self._book.rewrite_everything()
            store.open_checked()
            self._load()
        except (sqlite3.Error, OSError, LedgerError) as again:
            store.close_conn()
            self._failed(again)

    def _retention(self) -> None:
        """Drop rows older than the retention, at most once an hour; cheap when nothing is
        due (the hour is the leading key)."""
        now = self._clock()
        if now - self._last_retention < RETENTION_EVERY_SECONDS or self._store.conn is None:
            return
        self._last_retention = now
        cutoff = floor_hour(now - self.retention_seconds)
        try:
            gone = self._store.retention(cutoff)
        except sqlite3.Error as exc:
            self._failed(exc)
            return
        if gone:
            with self._lock:
                totals = self._book.totals
                for consumer in [c for c, u in totals.consumer_updated.items() if u < cutoff]:
                    totals.forget(consumer)
                    self._book.labels.pop(consumer, None)

    def _failed(self, exc: BaseException) -> None:
        self._errors_total += 1
        text = describe(exc)
        if text != self._last_error:
            log.warning("ledger %s: write failed (%s); keeping data in memory and retrying",
                        self.path, text)
        self._last_error = text

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned and len(self._warned) < 100:
            self._warned.add(key)
            log.warning(message, *args)

    # ---- background thread and shutdown ------------------------------------------------------

    def start(self, flush_seconds: float = DEFAULT_FLUSH_SECONDS) -> None:
        """Flush every `flush_seconds` on a thread of its own, off the tick path."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(flush_seconds,),
                                        name="carbond-ledger", daemon=True)
        self._thread.start()

    def _run(self, flush_seconds: float) -> None:
        while not self._stop.wait(flush_seconds):
            try:
                self.flush()
            except Exception:  # a bug must not end the flushing: log it and go on
                log.exception("ledger flush failed")

    def close(self) -> None:
        """Stop the thread, flush what is pending and release the directory."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        except Exception:
            log.exception("ledger flush at close failed")
        with self._db_lock:
            self._store.checkpoint()
            self._store.close_conn()
        self._store.release_lock()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- queries (budgets): flushed rows plus what is still pending --------------------------

    def consumer_grams(self, since: float, until: float) -> dict[Consumer, float]:
        """Operational grams per consumer in [since, until), written or pending.

        Hours cut by the range count in proportion (see `periods.hour_fraction`).
        """
        now = self._clock()
        with self._db_lock:
            try:
                with self._lock:  # under the db lock too: no flush moves rows in between
                    pending = {k: r.copy() for k, r in self._book.hours.items()}
                return consumer_grams(self._store.conn, pending, since, until, now)
            except sqlite3.Error as exc:
                self._warn_once(f"query {exc}", "ledger query failed: %s", exc)
                return consumer_grams(None, pending, since, until, now)

    def hourly_grams(self, since: float, until: float) -> dict[int, dict[Consumer, float]]:
        """Operational grams per hour row and consumer for the hours touching [since, until),
        written or pending (for burn rates over the last day)."""
        with self._db_lock:
            with self._lock:
                pending = {k: r.copy() for k, r in self._book.hours.items()}
            try:
                return hourly_grams(self._store.conn, pending, since, until)
            except sqlite3.Error as exc:
                self._warn_once(f"query {exc}", "ledger query failed: %s", exc)
                return hourly_grams(None, pending, since, until)

    def labels(self, consumer: Consumer) -> dict[str, str]:
        """The owner metadata memory holds for `consumer` (as last booked)."""
        with self._lock:
            return dict(self._book.labels.get(consumer, {}))

    def stored_labels(self) -> dict[Consumer, dict[str, str]]:
        """Every consumer's owner metadata as last known, written or not: for seeding owner
        budgets at start, when the resolvers no longer know jobs and pods that have ended."""
        with self._db_lock:
            found: dict[Consumer, dict[str, str]] = {}
            if self._store.conn is not None:
                try:
                    found = consumer_labels(self._store.conn)
                except sqlite3.Error as exc:
                    self._warn_once(f"query {exc}", "ledger query failed: %s", exc)
            with self._lock:
                found.update({c: dict(m) for c, m in self._book.labels.items()})
        return found

