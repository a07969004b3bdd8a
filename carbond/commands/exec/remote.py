"""The running daemon, as `carbond exec` sees it: `/api/v1/consumers` at the `--listen`
address (flag or config file, as `carbond run` uses it), and one project's counters in it."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from carbond.config import Config
from carbond.types import name_text
from carbond.web.client import Client, ClientConfig, Unreachable, daemon_url

PROBE_TIMEOUT_SECONDS = 1.0
API_PATH = "/api/v1/consumers"


class DocumentSource(Protocol):
    """Where the consumers document comes from: the HTTP API (`web.client.Client`) or the
    exec socket (`runs.client.SocketDocuments`)."""

    base: str

    def get_json(self, path: str) -> Any: ...


def daemon_client(config: Config, client: ClientConfig | None = None) -> Client:
    """The daemon on this host, at the `listen` address `carbond run` uses (a wildcard address
    is reached on loopback); probes give up quickly."""
    return Client(daemon_url(config.listen_host, config.listen_port, client), client,
                  PROBE_TIMEOUT_SECONDS)


def fetch_consumers(client: DocumentSource) -> dict[str, Any] | None:
    """The document, or None when no carbond answers there (refused, timeout, TLS or basic
    auth in the way, not carbond's JSON)."""
    try:
        document = client.get_json(API_PATH)
    except Unreachable:
        return None
    if not isinstance(document, dict) or document.get("version") != 1:
        return None
    if not isinstance(document.get("consumers"), list):
        return None
    return document


def timestamp(document: dict[str, Any]) -> float | None:
    value = document.get("timestamp")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class ProjectCounters:
    """A project consumer's cumulative counters in one document (zero when absent), and its
    mean power over that document's tick."""

    joules: dict[str, float]  # per component (cpu, dram, gpu)
    grams: float
    present: bool
    watts: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return 0.0


def _components(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): _number(v) for k, v in value.items() if k != "total"}


def project_counters(document: dict[str, Any], project: str) -> ProjectCounters:
    name = name_text(project)
    for entry in document.get("consumers", []):
        if not isinstance(entry, dict):
            continue
        if entry.get("kind") != "project" or entry.get("name") != name:
            continue
        return ProjectCounters(_components(entry.get("joules")),
                               _number(entry.get("emissions_grams")), True,
                               _components(entry.get("watts")))
    return ProjectCounters({}, 0.0, False)


def _intensity(document: dict[str, Any]) -> float:
    intensity = document.get("intensity")
    return _number(intensity.get("grams_per_kwh")) if isinstance(intensity, dict) else 0.0


def _pue(document: dict[str, Any]) -> float:
    return _number(document.get("pue")) or 1.0


class ProjectBaseline:
    """The project's counters as they stood when the run started.

    Listed in the document fetched before the start: those counters. Not listed: the
    daemon may still hold a total for it (a project seen hours ago continues its counter when
    it comes back, restored from the ledger), so 0 is not safe. Then the daemon is polled
    (a few times per tick) until the project appears, and its counters there less that first
    tick's own energy and grams (its mean power times the time since the previous tick) are the
    baseline.
    """

    def __init__(self, client: DocumentSource, project: str, before: dict[str, Any],
                 interval_seconds: float) -> None:
        self.client = client
        self.project = project
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        start = project_counters(before, project)
        self._baseline: ProjectCounters | None = start if start.present else None
        self._previous = timestamp(before)
        if self._baseline is None:
            self._poll_seconds = min(1.0, max(0.2, interval_seconds / 4.0))
            self._thread = threading.Thread(target=self._poll, name="carbond-exec-daemon",
                                            daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            document = fetch_consumers(self.client)
            if document is not None and self.observe(document):
                return

    def observe(self, document: dict[str, Any]) -> bool:
        """Take one document; True once the baseline is known."""
        stamp = timestamp(document)
        with self._lock:
            if self._baseline is not None:
                return True
            if stamp is None or (self._previous is not None and stamp <= self._previous):
                return False
            seen = project_counters(document, self.project)
            if not seen.present:
                self._previous = stamp
                return False
            seconds = stamp - self._previous if self._previous is not None else 0.0
            tick = {c: seen.watts.get(c, 0.0) * seconds for c in seen.joules}
            tick_grams = (math.fsum(tick.values()) / 3.6e6 * _pue(document)
                          * _intensity(document))
            self._baseline = ProjectCounters(
                {c: j - tick.get(c, 0.0) for c, j in seen.joules.items()},
                seen.grams - tick_grams, True)
            return True

    def result(self, after: dict[str, Any]) -> ProjectCounters:
        """The baseline (taking `after` too, in case the poller has not seen the project yet);
        zero counters when the project never appeared before `after`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.observe(after)
        with self._lock:
            return self._baseline or ProjectCounters({}, 0.0, False)

    def stop(self) -> None:
        self._stop.set()


def wait_for_tick_after(client: DocumentSource, moment: float, deadline_seconds: float,
                        stop: Callable[[], bool] = lambda: False,
                        poll_seconds: float = 0.2) -> dict[str, Any] | None:
    """The first document of a tick that ended after `moment` (wall clock), or None when
    none comes within `deadline_seconds` (or `stop()` says to give up)."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        document = fetch_consumers(client)
        if document is not None:
            stamp = timestamp(document)
            if stamp is not None and stamp > moment:
                return document
        if stop() or time.monotonic() >= deadline:
            return None
        time.sleep(poll_seconds)
