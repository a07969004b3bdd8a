"""Names for ID consumers, resolved off the tick path: `MetadataResolver.lookup()` never waits.

Each source (CRI, PodResources, Docker, Podman, Slurm) has its own daemon thread. The tick
thread calls `lookup(consumer)`, which answers from what is known now: the named consumer and
its metadata when a source has told it, else the ID consumer (today's name) with what the ID
says. An ID nobody has answered for is handed to its source's thread, once:

- listing sources (CRI, engines, PodResources) list everything in one call, when a new ID is
  asked for (at most once per `min_list_seconds`, so a burst of new containers costs one call)
  and every `relist_seconds`, the slow refresh that also forgets removed containers (an entry
  survives one relist after it vanished, so the last tick of a container that just exited is
  still named);
- per-ID sources (Slurm) look each new job up once; a failed lookup is retried with backoff,
  at most MAX_ATTEMPTS times.

Each call has a total deadline (`timeout_seconds`); a failure (missing socket or command,
refused, deadline, garbage, too large) counts one error of that source, backs the source off
exponentially up to `relist_seconds`, and leaves every name as it was. A source is only ever
asked when a consumer of its kind exists, so a host without Docker never counts Docker errors.
A name, once resolved, stays with its consumer (series do not flap back to IDs).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from carbond.types import Consumer
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import (
    EMPTY,
    Identity,
    Metadata,
    clean,
    id_key,
    id_metadata,
    name_for,
)

log = logging.getLogger(__name__)

SOURCES = ("cri", "podresources", "docker", "podman", "slurm")
"""The `source` label values of carbond_metadata_errors_total, all exported from the start."""

ROUTES = {"pod": "cri", "containerd": "cri", "crio": "cri", "docker": "docker",
          "podman": "podman", "slurm": "slurm"}
"""Which source resolves an ID space (see metadata.id_key)."""

DEFAULT_TIMEOUT_SECONDS = 2.0
DEFAULT_RELIST_SECONDS = 300.0
DEFAULT_MIN_LIST_SECONDS = 1.0
BACKOFF_BASE_SECONDS = 5.0
MAX_ATTEMPTS = 5
MAX_ENTRIES = 65536
_LIST_NOW = ("", "")  # a pending key that only asks for a list (PodResources after the CRI)


class Source(Protocol):
    """One metadata source; `fetch` raises SourceError for anything that is not an answer."""

    name: str
    per_id: bool

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Any: ...


def table_key(key: tuple[str, str]) -> tuple[str, str]:
    """Where a source's table keeps an ID: the CRI keys containers of both runtimes as "cri"."""
    space, ident = key
    return ("cri", ident) if space in ("containerd", "crio") else key


class Prepared(NamedTuple):
    """One table entry as the resolver keeps it: the metadata cleaned for export, and the
    names it gives a pod or a container consumer (None: the ID name stands). Made on the
    source's thread, so a tick's first lookup of an ID only picks them up."""

    metadata: Metadata
    as_pod: Consumer | None
    as_container: Consumer | None


def prepared(table: object) -> Mapping[Any, Any]:
    """A source's table with each Metadata `Prepared`; other values (GPU holders) as they
    are. SourceError if the source returned no table."""
    if not isinstance(table, Mapping):
        raise SourceError("the source returned no table")
    return {key: Prepared(clean(value), name_for("pod", value), name_for("container", value))
            if isinstance(value, Metadata) else value for key, value in table.items()}


def backoff_seconds(failures: int, cap_seconds: float) -> float:
    return min(cap_seconds, BACKOFF_BASE_SECONDS * 2.0 ** min(max(failures, 1) - 1, 20))


@dataclass
class _State:
    source: Source
    table: Mapping[Any, Any] = field(default_factory=dict)  # published whole, never mutated
    previous: Mapping[Any, Any] = field(default_factory=dict)  # the table before the last list
    pending: set[tuple[str, str]] = field(default_factory=set)
    asked: set[tuple[str, str]] = field(default_factory=set)
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    used: bool = False
    errors: int = 0
    failures: int = 0  # consecutive, for backoff
    last_list: float = -math.inf
    next_try: float = -math.inf
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class MetadataResolver:
    """`lookup()` and `gpu_holders()` for the tick thread (one caller thread); `errors()` for
    the exporter; `start()`/`stop()` like the other parts of the daemon."""

    def __init__(
        self,
        sources: Collection[Source],
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        relist_seconds: float = DEFAULT_RELIST_SECONDS,
        min_list_seconds: float = DEFAULT_MIN_LIST_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.relist_seconds = relist_seconds
        self.min_list_seconds = min_list_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._states = {s.name: _State(s) for s in sources}
        unknown = set(self._states) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown metadata source {sorted(unknown)[0]!r}")
        self._generation = 0  # bumped whenever any table changes
        self._resolved: dict[Consumer, Identity] = {}
        self._unresolved: dict[Consumer, tuple[int, Identity]] = {}
        self._stop = threading.Event()

    # ------------------------------------------------------------ the tick thread

    def lookup(self, consumer: Consumer) -> Identity:
        """The consumer as it is known now; never blocks, never raises for any consumer."""
        known = self._resolved.get(consumer)
        if known is not None:
            return known
        missed = self._unresolved.get(consumer)
        generation = self._generation
        if missed is not None and missed[0] == generation:
            return missed[1]
        key = id_key(consumer)
        if key is None:
            return self._remember(consumer, Identity(consumer, EMPTY))
        found = self._find(key)
        base = id_metadata(key)
        if found is not None:
            name = found.as_pod if consumer.kind == "pod" else found.as_container
            return self._remember(consumer, Identity(name or consumer,
                                                     base.merged(found.metadata)))
        self._request(key)
        identity = Identity(consumer, base)
        if len(self._unresolved) >= self._max_entries:
            self._unresolved.clear()
        self._unresolved[consumer] = (generation, identity)
        return identity

    def settled(self, consumer: Consumer) -> bool:
        """Whether `lookup(consumer)` will answer as now for the life of the daemon (a
        source has answered for it, or nothing can): its caller may stop asking."""
        return consumer in self._resolved

    def gpu_holders(self) -> Mapping[str, tuple[Consumer, ...]]:
        """GPU device ID -> the containers the kubelet gave it to (podresources.Holders), as
        last listed; asking starts the listing, so hosts without GPUs never ask the kubelet."""
        state = self._states.get("podresources")
        if state is None:
            return {}
        if not state.used:
            with state.lock:
                state.used = True
                state.pending.add(_LIST_NOW)
            state.wake.set()
        return state.table

    def errors(self) -> dict[str, int]:
        """Failed calls per source since start, every source of SOURCES present."""
        return {name: self._states[name].errors if name in self._states else 0
                for name in SOURCES}

    def _remember(self, consumer: Consumer, identity: Identity) -> Identity:
        if len(self._resolved) >= self._max_entries:
            self._resolved.clear()  # churn: bounded memory beats a perfect hit rate
        self._resolved[consumer] = identity
        self._unresolved.pop(consumer, None)
        return identity

    def _find(self, key: tuple[str, str]) -> Prepared | None:
        state = self._states.get(ROUTES[key[0]])
        if state is None:
            return None
        where = table_key(key)
        found = state.table.get(where)
        if found is None:
            found = state.previous.get(where)
        return found if isinstance(found, Prepared) else None

    def _request(self, key: tuple[str, str]) -> None:
        state = self._states.get(ROUTES[key[0]])
        if state is None or key in state.asked:
            return
        with state.lock:
            if len(state.asked) >= self._max_entries:
                state.asked.clear()
            state.asked.add(key)
            state.pending.add(key)
            state.used = True
        state.wake.set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        for name, state in self._states.items():
            if state.thread is None:
                state.thread = threading.Thread(target=self._run, args=(state,), daemon=True,
                                                name=f"carbond-metadata-{name}")
                state.thread.start()

    def stop(self, timeout_seconds: float = 2.0) -> None:
        """Ask every thread to end and wait up to `timeout_seconds` in all; a call in flight
        ends at its own deadline, and the threads are daemons, so exit never hangs on one."""
        self._stop.set()
        end = time.monotonic() + timeout_seconds
        for state in self._states.values():
            state.wake.set()
        for state in self._states.values():
            thread, state.thread = state.thread, None
            if thread is not None:
                thread.join(max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------ the source threads

    def _run(self, state: _State) -> None:
        while not self._stop.is_set():
            state.wake.clear()
            try:
                self._round(state)
            except Exception:  # a bug in a source must not end its thread unseen
                log.exception("metadata source %s failed unexpectedly", state.source.name)
                self._failed(state, self._clock())
            state.wake.wait(self._sleep_seconds(state))

    def round_now(self, name: str) -> None:
        """One round of a source's work on the calling thread (tests, benchmarks)."""
        self._round(self._states[name])

    def _round(self, state: _State) -> None:
        now = self._clock()
        if now < state.next_try:
            return
        if state.source.per_id:
            self._round_per_id(state, now)
        elif state.used and (state.pending or now - state.last_list >= self.relist_seconds) \
                and now - state.last_list >= self.min_list_seconds:
            self._list(state, now)

    def _list(self, state: _State, now: float) -> None:
        with state.lock:
            asked, state.pending = state.pending, set()
        try:
            table = prepared(state.source.fetch(asked - {_LIST_NOW}, self.timeout_seconds))
        except SourceError as exc:
            with state.lock:
                state.pending |= asked
            self._failed(state, now, str(exc))
            return
        state.previous, state.table = state.table, table
        state.last_list, state.failures = now, 0
        self._generation += 1
        if state.source.name == "cri" and "podresources" in self._states:
            follower = self._states["podresources"]
            if follower.used:  # new pods may hold GPUs: list their allocations too
                with follower.lock:
                    follower.pending.add(_LIST_NOW)
                follower.wake.set()

    def _round_per_id(self, state: _State, now: float) -> None:
        with state.lock:
            keys = sorted(state.pending)
        deadline = time.monotonic() + self.timeout_seconds
        for key in keys:
            if self._stop.is_set():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return  # the rest next round
            try:
                found = prepared(state.source.fetch([key], remaining))
            except SourceError as exc:
                attempts = state.attempts.get(key, 0) + 1
                with state.lock:
                    if attempts >= MAX_ATTEMPTS:
                        state.pending.discard(key)
                        state.attempts.pop(key, None)
                    else:
                        state.attempts[key] = attempts
                self._failed(state, now, str(exc))
                return
            with state.lock:
                state.pending.discard(key)
                state.attempts.pop(key, None)
            state.failures = 0
            if found:
                table = dict(state.table)
                if len(table) >= self._max_entries:
                    table.clear()
                table.update(found)
                state.table = table
                self._generation += 1

    def _failed(self, state: _State, now: float, reason: str = "internal error") -> None:
        state.errors += 1
        state.failures += 1
        delay = backoff_seconds(state.failures, self.relist_seconds)
        state.next_try = now + delay
        log.warning("metadata source %s: %s; ID names stand, next try in %.0fs",
                    state.source.name, reason, delay)

    def _sleep_seconds(self, state: _State) -> float:
        """Until this source next has something to do (a wake-up cuts it short)."""
        now = self._clock()
        if not state.used:
            return 60.0
        due = state.last_list + self.relist_seconds if not state.source.per_id else math.inf
        if state.pending:
            due = min(due, state.last_list + self.min_list_seconds
                      if not state.source.per_id else now)
        due = max(due, state.next_try)
        return min(60.0, max(0.01, due - now))
