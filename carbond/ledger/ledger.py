"""The durable ledger: hourly rows and running totals in SQLite (WAL) under the state directory.

The tick only calls `record()`, which adds to memory; a background thread `flush()`es
everything pending in one transaction, so a slow or full disk never delays a tick and a crash
loses at most one flush interval. A failed flush keeps its data in memory and the next one
retries it. Totals are written as absolute values and restored at start, so every exported
`*_total` counter continues across restarts.

Layout (schema v2, `PRAGMA user_version`):
- `consumers(id, kind, name)`: ids keep the hourly rows small (about 1.9 million of them for
  200 consumers over 400 days).
- `consumer_hours(hour, consumer, cpu/dram/gpu_joules, grams, embodied_grams,
  intensity_joules, intensity_weighted, providers)`: `hour` is the UTC hour's start in epoch
  seconds; the mean grid intensity is `intensity_weighted / intensity_joules` (energy-weighted
  g/kWh over the energy that had a figure); `providers` is a bit mask over `providers(id, name)`.
- `host_hours(hour, component, device, source, joules)`.
- `consumer_totals`, `consumer_energy_totals`, `device_totals`, `host_totals` (grams,
  embodied_grams, first_record) and `state(key, JSON value)` for whatever else the daemon keeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from carbond.ledger.periods import SECONDS_PER_HOUR, floor_hour, hour_fraction, spread_over_hours
from carbond.types import Consumer, TickRecord

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.db"
LOCK_FILE = "ledger.lock"
SCHEMA_VERSION = 2
DEFAULT_FLUSH_SECONDS = 30.0
DEFAULT_RETENTION_SECONDS = 400 * 86400.0
RETENTION_EVERY_SECONDS = 3600.0
COMPONENTS = ("cpu", "dram", "gpu")
# Rows kept in memory while the disk refuses writes (about 20 MB): 200 consumers for 20 days.
# Past this the oldest hours are dropped (and logged); the totals in memory stay exact.
MAX_PENDING_ROWS = 100_000

DeviceKey = tuple[str, str, str]  # component, device, source

# Index i moves a database from user_version i to i + 1. Never edit a step once released:
# add one. v1 -> v2 added embodied carbon (the SCI "M") next to operational emissions.
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
)
assert len(MIGRATIONS) == SCHEMA_VERSION

# Positions in a pending hourly row (a list, for speed on the tick path).
CPU, DRAM, GPU, GRAMS, EMBODIED, INTENSITY_JOULES, INTENSITY_WEIGHTED, PROVIDERS = range(8)
_COMPONENT_INDEX = {"cpu": CPU, "dram": DRAM, "gpu": GPU}


class LedgerError(Exception):
    """The ledger cannot be used as asked; the message says why and what to do."""


class LedgerLocked(LedgerError):
    """Another process holds the ledger of this state directory."""


@dataclass
class Totals:
    """Running totals as of the last flush (or as recorded since, for `Ledger.totals()`)."""

    consumer_joules: dict[Consumer, dict[str, float]] = field(default_factory=dict)
    consumer_grams: dict[Consumer, float] = field(default_factory=dict)
    consumer_embodied_grams: dict[Consumer, float] = field(default_factory=dict)
    consumer_updated: dict[Consumer, float] = field(default_factory=dict)  # last wall time
    device_joules: dict[DeviceKey, float] = field(default_factory=dict)
    host_grams: float = 0.0
    host_embodied_grams: float = 0.0
    first_record: float | None = None  # wall time the ledger began
    state: dict[str, Any] = field(default_factory=dict)


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

    @property
    def joules(self) -> float:
        return self.cpu_joules + self.dram_joules + self.gpu_joules

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
        self.grams += other.grams
        self.embodied_grams += other.embodied_grams
        self.intensity_joules += other.intensity_joules
        self.intensity_weighted += other.intensity_weighted
        self.providers |= other.providers


@dataclass
class _Batch:
    """What one flush writes, taken from memory under the lock."""

    hours: dict[tuple[int, Consumer], list[float]]
    devices: dict[tuple[int, str, str, str], float]
    energy: list[tuple[Consumer, str, float]]
    grams: list[tuple[Consumer, float, float, float]]
    device_totals: list[tuple[str, str, str, float]]
    host: list[tuple[str, float]]
    state: list[tuple[str, str]]
    providers: list[tuple[int, str]]

    def empty(self) -> bool:
        return not (self.hours or self.devices or self.energy or self.grams
                    or self.device_totals or self.host or self.state)


def _positive(value: float) -> bool:
    """True for a finite amount > 0; NaN, inf and negatives never reach a total."""
    return 0.0 < value < math.inf


def _text(value: object) -> str:
    """Text SQLite can store (UTF-8): lone surrogates from undecodable bytes are escaped."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _is_corrupt(exc: BaseException) -> bool:
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


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
        if found:
            log.info("ledger %s migrated from schema v%d to v%d", path, found, SCHEMA_VERSION)
    return found


def read_totals(conn: sqlite3.Connection) -> Totals:
    totals = Totals()
    for kind, name, component, joules in conn.execute(
        "SELECT c.kind, c.name, t.component, t.joules FROM consumer_energy_totals t"
        " JOIN consumers c ON c.id = t.consumer"
    ):
        totals.consumer_joules.setdefault(Consumer(kind, name), {})[component] = joules
    for kind, name, grams, embodied, updated in conn.execute(
        "SELECT c.kind, c.name, t.grams, t.embodied_grams, t.updated FROM consumer_totals t"
        " JOIN consumers c ON c.id = t.consumer"
    ):
        consumer = Consumer(kind, name)
        totals.consumer_grams[consumer] = grams
        totals.consumer_embodied_grams[consumer] = embodied
        totals.consumer_updated[consumer] = updated
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


def _copy_totals(totals: Totals) -> Totals:
    return Totals(
        consumer_joules={c: dict(parts) for c, parts in totals.consumer_joules.items()},
        consumer_grams=dict(totals.consumer_grams),
        consumer_embodied_grams=dict(totals.consumer_embodied_grams),
        consumer_updated=dict(totals.consumer_updated),
        device_joules=dict(totals.device_joules),
        host_grams=totals.host_grams,
        host_embodied_grams=totals.host_embodied_grams,
        first_record=totals.first_record,
        state=json.loads(json.dumps(totals.state)),
    )


class Ledger:
    """One state directory's ledger, held exclusively by this process."""

    def __init__(self, state_dir: str, retention_seconds: float,
                 clock: Callable[[], float]) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LEDGER_FILE)
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()  # memory: pending rows, totals, dirty sets
        self._db_lock = threading.RLock()  # the connection; held through a flush
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._totals = Totals()
        self._hours: dict[tuple[int, Consumer], list[float]] = {}
        self._devices: dict[tuple[int, str, str, str], float] = {}
        self._dirty_consumers: set[Consumer] = set()
        self._dirty_devices: set[DeviceKey] = set()
        self._dirty_state: set[str] = set()
        self._host_dirty = False
        self._ids: dict[Consumer, int] = {}
        self._provider_bits: dict[str, int] = {}
        self._keys: dict[object, Consumer] = {}
        self._errors_total = 0
        self._last_error: str | None = None
        self._warned: set[str] = set()
        self._last_retention = 0.0
        self._dropped_rows = 0
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
    ) -> Ledger:
        """Lock the directory, open (create, migrate) the ledger and load its totals.

        Raises LedgerLocked when another process holds it, LedgerError for a ledger written by
        a newer carbond. A corrupt file is moved aside and a fresh one started; a directory
        that cannot be written (read-only, full, missing) is not an error here: the ledger
        works from memory, counts the failure in `errors_total` and retries on every flush.
        """
        ledger = cls(state_dir, retention_seconds, clock)
        ledger._take_lock()
        try:
            with ledger._db_lock:
                ledger._connect()
        except LedgerError:
            ledger._release_lock()
            raise
        except (sqlite3.Error, OSError) as exc:
            ledger._failed(exc)
            ledger._load_readonly()
        return ledger

    def _take_lock(self) -> None:
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
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _open_checked(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
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
        return conn

    def _connect(self) -> None:
        """Open the database into `self._conn`; a corrupt one is moved aside (once)."""
        if self._lock_fd is None:
            self._take_lock()
        try:
            conn = self._open_checked()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            self._salvage()
            self._move_aside(exc)
            self._mark_all_dirty()  # whatever memory holds goes into the fresh file
            conn = self._open_checked()
        self._conn = conn
        self._load(conn)

    def _load(self, conn: sqlite3.Connection) -> None:
        """Ids, provider bits and (the first time) the totals, from an open database."""
        self._ids = {Consumer(k, n): i for i, k, n in conn.execute(
            "SELECT id, kind, name FROM consumers")}
        stored = dict(conn.execute("SELECT name, id FROM providers").fetchall())
        with self._lock:
            for name, index in stored.items():
                self._provider_bits.setdefault(name, index)
            if not self._totals_loaded():
                self._totals = read_totals(conn)

    def _totals_loaded(self) -> bool:
        t = self._totals
        return bool(t.consumer_grams or t.consumer_joules or t.device_joules or t.state
                    or t.first_record is not None)

    def _load_readonly(self) -> None:
        """Totals from a ledger this process cannot write (read-only directory)."""
        if not os.path.exists(self.path):
            return
        try:
            conn = connect_readonly(self.state_dir)
        except (LedgerError, sqlite3.Error, OSError) as exc:
            log.warning("ledger %s unreadable (%s): totals start from zero", self.path,
                        _describe(exc))
            return
        try:
            with self._lock:
                if not self._totals_loaded():
                    self._totals = read_totals(conn)
                for name, index in conn.execute("SELECT name, id FROM providers"):
                    self._provider_bits.setdefault(name, index)
        except sqlite3.Error as exc:
            log.warning("ledger %s unreadable (%s): totals start from zero", self.path,
                        _describe(exc))
        finally:
            conn.close()

    def _salvage(self) -> None:
        """Keep the totals of a corrupt ledger when its totals pages still read."""
        if self._totals_loaded():
            return
        with contextlib.suppress(sqlite3.Error, OSError):
            conn = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True)
            try:
                totals = read_totals(conn)
            finally:
                conn.close()
            with self._lock:
                self._totals = totals

    def _move_aside(self, exc: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = f"{self.path}.corrupt-{stamp}"
        serial = 1
        while os.path.exists(target):  # never overwrite an earlier one
            target = f"{self.path}.corrupt-{stamp}.{serial}"
            serial += 1
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                if suffix == "-wal":
                    os.replace(self.path + suffix, target + suffix)
                else:
                    os.unlink(self.path + suffix)
        log.error("ledger %s is corrupt (%s): moved to %s, starting a fresh ledger",
                  self.path, _describe(exc), target)

    def _mark_all_dirty(self) -> None:
        with self._lock:
            t = self._totals
            self._dirty_consumers.update(t.consumer_grams, t.consumer_joules)
            self._dirty_devices.update(t.device_joules)
            self._dirty_state.update(t.state)
            self._host_dirty = True

    # ---- the tick path: memory only ---------------------------------------------------------

    def restore(self) -> Totals:
        """The totals as loaded at open (and recorded since): exported counters start here."""
        with self._lock:
            return _copy_totals(self._totals)

    def _consumer(self, key: object) -> Consumer:
        consumer = self._keys.get(key)
        if consumer is None:
            kind, name = key  # type: ignore[misc]
            consumer = Consumer(_text(kind), _text(name))
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[key] = consumer
        return consumer

    def _provider_bit(self, provider: str) -> int:
        index = self._provider_bits.get(provider)
        if index is None:
            index = max(self._provider_bits.values(), default=-1) + 1
            if index > 62:
                return 0  # more provider names than bits: stop tracking new ones
            self._provider_bits[provider] = index
        return 1 << index

    def record(self, record: TickRecord) -> None:
        """Book one tick: energy per consumer and component, its operational and embodied
        grams, host energy per device, and the intensity (with its provider) it used.

        Memory only and O(consumers); never raises (a bad value is skipped and logged once).
        """
        try:
            with self._lock:
                self._record(record)
        except Exception as exc:
            self._warn_once(f"record: {exc!r}", "ledger record skipped a tick: %r", exc)

    def _record(self, record: TickRecord) -> None:
        wall_time, seconds = record.wall_time, record.seconds
        consumers, grams, embodied_grams = record.energy, record.grams, record.embodied_grams
        intensity, provider = record.grams_per_kwh, record.provider
        devices: dict[DeviceKey, float] = {}
        for d in record.devices:
            key = (d.component, d.device, d.source)
            devices[key] = devices.get(key, 0.0) + d.joules
        if not math.isfinite(wall_time):
            return
        totals = self._totals
        if totals.first_record is None:
            totals.first_record = wall_time
        shares = spread_over_hours(wall_time, seconds)
        weight = intensity if intensity is not None and 0.0 <= intensity < math.inf else None
        bit = self._provider_bit(_text(provider)) if provider and weight is not None else 0
        hours = self._hours
        touched = set(consumers) | set(grams) | set(embodied_grams)
        for key in touched:
            parts = [(c, j) for c, j in consumers.get(key, {}).items() if _positive(j)]
            consumer_grams = grams.get(key, 0.0)
            consumer_grams = consumer_grams if _positive(consumer_grams) else 0.0
            embodied = embodied_grams.get(key, 0.0)
            embodied = embodied if _positive(embodied) else 0.0
            if not parts and not consumer_grams and not embodied:
                continue  # an idle cgroup: nothing to book, no row to write
            consumer = self._consumer(key)
            energy_total = totals.consumer_joules.setdefault(consumer, {})
            joules_by_index = []
            joules_sum = 0.0
            for component, joules in parts:
                energy_total[component] = energy_total.get(component, 0.0) + joules
                index = _COMPONENT_INDEX.get(component)
                if index is None:
                    self._warn_once(f"component {component}", "ledger: component %r has no "
                                    "hourly column; kept in totals only", component)
                    continue
                joules_by_index.append((index, joules))
                joules_sum += joules
            totals.consumer_grams[consumer] = (
                totals.consumer_grams.get(consumer, 0.0) + consumer_grams)
            totals.consumer_embodied_grams[consumer] = (
                totals.consumer_embodied_grams.get(consumer, 0.0) + embodied)
            totals.consumer_updated[consumer] = wall_time
            totals.host_grams += consumer_grams
            totals.host_embodied_grams += embodied
            self._dirty_consumers.add(consumer)
            for hour, share in shares:
                row = hours.get((hour, consumer))
                if row is None:
                    row = hours[(hour, consumer)] = [0.0] * 7 + [0]
                for index, joules in joules_by_index:
                    row[index] += joules * share
                row[GRAMS] += consumer_grams * share
                row[EMBODIED] += embodied * share
                if weight is not None and joules_sum > 0:
                    row[INTENSITY_JOULES] += joules_sum * share
                    row[INTENSITY_WEIGHTED] += joules_sum * share * weight
                    row[PROVIDERS] = int(row[PROVIDERS]) | bit
        for device_key, joules in devices.items():
            if not _positive(joules):
                continue
            device_key = (_text(device_key[0]), _text(device_key[1]), _text(device_key[2]))
            totals.device_joules[device_key] = totals.device_joules.get(device_key, 0.0) + joules
            self._dirty_devices.add(device_key)
            for hour, share in shares:
                slot = (hour, *device_key)
                self._devices[slot] = self._devices.get(slot, 0.0) + joules * share
        self._host_dirty = True
        if len(hours) > MAX_PENDING_ROWS:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest = min(hour for hour, _ in self._hours)
        dropped = [key for key in self._hours if key[0] == oldest]
        for key in dropped:
            del self._hours[key]
        for slot in [slot for slot in self._devices if slot[0] == oldest]:
            del self._devices[slot]
        self._dropped_rows += len(dropped)
        self._warn_once("dropped", "ledger: writes failing for long; hourly rows from %s on "
                        "are being dropped (totals stay exact)",
                        time.strftime("%Y-%m-%d %H:00Z", time.gmtime(oldest)))

    def put_state(self, key: str, value: Any) -> None:
        """Keep a JSON-serialisable value (counters, learned baselines) across restarts."""
        with self._lock:
            if self._totals.state.get(key) == value:
                return  # the daemon puts its counters every tick; most ticks change none
        text = json.dumps(value, allow_nan=False)
        with self._lock:
            self._totals.state[key] = json.loads(text)
            self._dirty_state.add(key)

    def get_state(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._totals.state.get(key, default)

    @property
    def errors_total(self) -> int:
        """Failed flushes (and opens): carbond_ledger_errors_total."""
        return self._errors_total

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def pending_rows(self) -> int:
        with self._lock:
            return len(self._hours)

    @property
    def first_record(self) -> float | None:
        with self._lock:
            return self._totals.first_record

    # ---- flushing ----------------------------------------------------------------------------

    def _take(self) -> _Batch:
        t = self._totals
        batch = _Batch(
            hours=self._hours,
            devices=self._devices,
            energy=[(c, component, joules) for c in self._dirty_consumers
                    for component, joules in t.consumer_joules.get(c, {}).items()],
            grams=[(c, t.consumer_grams.get(c, 0.0), t.consumer_embodied_grams.get(c, 0.0),
                    t.consumer_updated.get(c, 0.0)) for c in self._dirty_consumers],
            device_totals=[(*key, t.device_joules[key]) for key in self._dirty_devices],
            host=self._host_rows() if self._host_dirty else [],
            state=[(key, json.dumps(t.state[key])) for key in self._dirty_state
                   if key in t.state],
            providers=[(index, name) for name, index in self._provider_bits.items()],
        )
        self._hours, self._devices = {}, {}
        self._dirty_consumers, self._dirty_devices, self._dirty_state = set(), set(), set()
        self._host_dirty = False
        return batch

    def _host_rows(self) -> list[tuple[str, float]]:
        t = self._totals
        rows = [("grams", t.host_grams), ("embodied_grams", t.host_embodied_grams)]
        if t.first_record is not None:
            rows.append(("first_record", t.first_record))
        return rows

    def _put_back(self, batch: _Batch) -> None:
        """A failed flush: its rows rejoin what was recorded since, its totals stay dirty."""
        for key, row in batch.hours.items():
            mine = self._hours.get(key)
            if mine is None:
                self._hours[key] = row
            else:
                for index in range(PROVIDERS):
                    mine[index] += row[index]
                mine[PROVIDERS] = int(mine[PROVIDERS]) | int(row[PROVIDERS])
        for slot, joules in batch.devices.items():
            self._devices[slot] = self._devices.get(slot, 0.0) + joules
        self._dirty_consumers.update(c for c, *_ in batch.grams)
        self._dirty_devices.update(tuple(row[:3]) for row in batch.device_totals)
        self._dirty_state.update(key for key, _ in batch.state)
        self._host_dirty = self._host_dirty or bool(batch.host)
        while len(self._hours) > MAX_PENDING_ROWS:
            self._drop_oldest()

    def flush(self) -> bool:
        """Write everything pending in one transaction; False (and the data kept for the
        next try) when the disk refuses. Never raises for I/O or database errors."""
        with self._db_lock:
            if self._closed and self._lock_fd is None:
                return False  # closed: never reopen the file behind the caller's back
            with self._lock:
                batch = self._take()
            try:
                if self._conn is None:
                    self._connect()
                if not batch.empty():
                    self._write(batch)
            except (sqlite3.Error, OSError, LedgerError) as exc:
                with self._lock:
                    self._put_back(batch)
                self._failed(exc)
                if isinstance(exc, sqlite3.DatabaseError) and _is_corrupt(exc):
                    self._recover_corrupt(exc)
                return False
            if self._last_error is not None:
                log.info("ledger %s: writes resumed", self.path)
                self._last_error = None
            self._retention()
            return True

    def _recover_corrupt(self, exc: BaseException) -> None:
        """Corruption found while running: start a fresh file; memory holds the totals."""
        self._close_conn()
        try:
            self._move_aside(exc)
            self._mark_all_dirty()
            self._conn = self._open_checked()
            self._load(self._conn)
        except (sqlite3.Error, OSError, LedgerError) as again:
            self._close_conn()
            self._failed(again)

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _resolve_ids(self, conn: sqlite3.Connection, consumers: Iterable[Consumer],
                     staged: dict[Consumer, int]) -> None:
        for consumer in consumers:
            if consumer in self._ids or consumer in staged:
                continue
            conn.execute("INSERT OR IGNORE INTO consumers (kind, name) VALUES (?, ?)", consumer)
            staged[consumer] = conn.execute(
                "SELECT id FROM consumers WHERE kind = ? AND name = ?", consumer).fetchone()[0]

    def _write(self, batch: _Batch) -> None:
        conn = self._conn
        assert conn is not None
        staged: dict[Consumer, int] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._resolve_ids(conn, (c for _, c in batch.hours), staged)
            self._resolve_ids(conn, (row[0] for row in batch.grams), staged)
            self._resolve_ids(conn, (row[0] for row in batch.energy), staged)
            ids = self._ids | staged if staged else self._ids
            conn.executemany("INSERT OR IGNORE INTO providers (id, name) VALUES (?, ?)",
                             batch.providers)
            conn.executemany(
                "INSERT INTO consumer_hours (hour, consumer, cpu_joules, dram_joules,"
                " gpu_joules, grams, embodied_grams, intensity_joules, intensity_weighted,"
                " providers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (hour, consumer) DO UPDATE SET"
                " cpu_joules = cpu_joules + excluded.cpu_joules,"
                " dram_joules = dram_joules + excluded.dram_joules,"
                " gpu_joules = gpu_joules + excluded.gpu_joules,"
                " grams = grams + excluded.grams,"
                " embodied_grams = embodied_grams + excluded.embodied_grams,"
                " intensity_joules = intensity_joules + excluded.intensity_joules,"
                " intensity_weighted = intensity_weighted + excluded.intensity_weighted,"
                " providers = providers | excluded.providers",
                [(hour, ids[c], *row[:PROVIDERS], int(row[PROVIDERS]))
                 for (hour, c), row in batch.hours.items()],
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
        self._ids.update(staged)

    def _retention(self) -> None:
        """Drop rows older than the retention, at most once an hour; cheap when nothing is
        due (the hour is the leading key)."""
        now = self._clock()
        if now - self._last_retention < RETENTION_EVERY_SECONDS or self._conn is None:
            return
        self._last_retention = now
        cutoff = floor_hour(now - self.retention_seconds)
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM consumer_hours WHERE hour < ?", (cutoff,))
            conn.execute("DELETE FROM host_hours WHERE hour < ?", (cutoff,))
            gone = conn.execute("DELETE FROM consumer_totals WHERE updated < ?",
                                (cutoff,)).rowcount
            if gone:
                conn.execute("DELETE FROM consumer_energy_totals WHERE consumer NOT IN"
                             " (SELECT consumer FROM consumer_totals)")
                conn.execute("DELETE FROM consumers WHERE id NOT IN"
                             " (SELECT consumer FROM consumer_totals)")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._failed(exc)
            return
        if gone:
            self._ids = {Consumer(k, n): i for i, k, n in conn.execute(
                "SELECT id, kind, name FROM consumers")}
            with self._lock:
                t = self._totals
                for consumer in [c for c, u in t.consumer_updated.items() if u < cutoff]:
                    for table in (t.consumer_joules, t.consumer_grams,
                                  t.consumer_embodied_grams, t.consumer_updated):
                        table.pop(consumer, None)

    def _failed(self, exc: BaseException) -> None:
        self._errors_total += 1
        text = _describe(exc)
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
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._close_conn()
        self._release_lock()

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
        with self._db_lock:
            conn = self._conn
            if conn is not None:
                try:
                    names = {i: c for c, i in self._ids.items()}
                    for consumer_id, grams in conn.execute(
                        "SELECT consumer, SUM(grams) FROM consumer_hours"
                        " WHERE hour >= ? AND hour < ? GROUP BY consumer",
                        (first_full, last_full),
                    ):
                        if consumer_id in names:
                            add(names[consumer_id], grams)
                    for hour in edges:
                        fraction = hour_fraction(hour, since, until, now)
                        if fraction <= 0:
                            continue
                        for consumer_id, grams in conn.execute(
                            "SELECT consumer, grams FROM consumer_hours WHERE hour = ?", (hour,)
                        ):
                            if consumer_id in names:
                                add(names[consumer_id], grams * fraction)
                except sqlite3.Error as exc:
                    self._warn_once(f"query {exc}", "ledger query failed: %s", exc)
            with self._lock:  # under the db lock too: no flush moves rows in between
                for (hour, consumer), row in self._hours.items():
                    fraction = hour_fraction(hour, since, until, now)
                    if fraction > 0:
                        add(consumer, row[GRAMS] * fraction)
        return result

    def hourly_grams(self, since: float, until: float) -> dict[int, dict[Consumer, float]]:
        """Operational grams per hour row and consumer for the hours touching [since, until),
        written or pending (for burn rates over the last day)."""
        result: dict[int, dict[Consumer, float]] = {}
        with self._db_lock:
            conn = self._conn
            if conn is not None:
                try:
                    names = {i: c for c, i in self._ids.items()}
                    for hour, consumer_id, grams in conn.execute(
                        "SELECT hour, consumer, grams FROM consumer_hours"
                        " WHERE hour >= ? AND hour < ?", (floor_hour(since), until),
                    ):
                        if consumer_id in names:
                            slot = result.setdefault(hour, {})
                            consumer = names[consumer_id]
                            slot[consumer] = slot.get(consumer, 0.0) + grams
                except sqlite3.Error as exc:
                    self._warn_once(f"query {exc}", "ledger query failed: %s", exc)
            with self._lock:
                for (hour, consumer), row in self._hours.items():
                    if floor_hour(since) <= hour < until:
                        slot = result.setdefault(hour, {})
                        slot[consumer] = slot.get(consumer, 0.0) + row[GRAMS]
        return result


# ---- read-only access (carbond report, while the daemon runs) ------------------------------


def _open_ro(uri: str) -> tuple[sqlite3.Connection, int]:
    conn = sqlite3.connect(uri, uri=True)
    try:
        return conn, conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        conn.close()
        raise


def connect_readonly(state_dir: str) -> sqlite3.Connection:
    """The ledger of `state_dir` opened read-only, without the lock: safe beside a running
    daemon (WAL readers never block the writer). Raises LedgerError when there is none."""
    path = os.path.join(state_dir, LEDGER_FILE)
    if not os.path.isfile(path):
        raise LedgerError(f"no ledger at {path}")
    base = f"file:{urllib.parse.quote(path)}"
    try:
        try:
            conn, version = _open_ro(f"{base}?mode=ro")
        except sqlite3.OperationalError:
            # A read-only directory without the -shm file: read the file as it stands.
            conn, version = _open_ro(f"{base}?immutable=1")
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} is not a readable ledger: {exc}") from None
    if not 1 <= version <= SCHEMA_VERSION:
        conn.close()
        raise LedgerError(f"{path} has ledger schema v{version}; this carbond reads "
                          f"v1 to v{SCHEMA_VERSION}")
    return conn


GROUPINGS = ("consumer", "kind", "hour", "project")


def _provider_names(conn: sqlite3.Connection) -> dict[int, str]:
    return {index: name for index, name in conn.execute("SELECT id, name FROM providers")}


def _mask_names(masks: str | None, names: Mapping[int, str]) -> set[str]:
    mask = 0
    for part in (masks or "").split(","):
        if part:
            mask |= int(part)
    return {name for index, name in names.items() if mask >> index & 1}


def aggregate(
    conn: sqlite3.Connection, since: float, until: float, by: str
) -> list[tuple[tuple[Any, ...], Usage]]:
    """Sums of the hourly rows whose hour starts in [floor_hour(since), until), grouped by
    consumer (name, kind), kind, hour, or project (consumers of kind `project`)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}")
    embodied = ("h.embodied_grams" if "embodied_grams" in _columns(conn, "consumer_hours")
                else "0.0")
    keys = {"consumer": "c.name, c.kind", "kind": "c.kind", "hour": "h.hour",
            "project": "c.name"}[by]
    where = "h.hour >= ? AND h.hour < ?" + (" AND c.kind = 'project'" if by == "project" else "")
    join = "" if by == "hour" else " JOIN consumers c ON c.id = h.consumer"
    sql = (
        f"SELECT {keys}, SUM(h.cpu_joules), SUM(h.dram_joules), SUM(h.gpu_joules),"
        f" SUM(h.grams), SUM({embodied}), SUM(h.intensity_joules), SUM(h.intensity_weighted),"
        f" GROUP_CONCAT(DISTINCT h.providers) FROM consumer_hours h{join}"
        f" WHERE {where} GROUP BY {keys}"
    )
    names = _provider_names(conn)
    width = len(keys.split(","))
    rows = []
    for row in conn.execute(sql, (floor_hour(since), until)):
        usage = Usage(*row[width:width + 7], providers=_mask_names(row[width + 7], names))
        rows.append((tuple(row[:width]), usage))
    return rows
