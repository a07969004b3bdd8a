"""/metrics, the JSON API and the landing page over the last tick's Snapshot, served by
carbond.web.server (TLS and basic auth from carbond.web.config).

Scrapes never measure anything. The snapshot changes once per tick, so every body (each
exposition format, each JSON document, plain and gzipped) is encoded once per snapshot and then
served from memory; only prometheus_client's small process collector (`process_*`) is rendered
on every scrape, so those values are current. Prometheus scrapes about once per tick, so nearly
every scrape encodes: exporter.exposition does that, byte for byte as prometheus_client's
encoders would, several times faster.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.exposition import generate_latest as generate_text

from carbond import __version__
from carbond.exporter.collectors import SnapshotCollectors
from carbond.exporter.documents import budgets_document, consumers_document, json_bytes
from carbond.exporter.exposition import agrees_with_prometheus_client, fast_encoder
from carbond.exporter.snapshot import Snapshot
from carbond.web.config import WebConfigWatcher
from carbond.web.server import HttpServer, Request, Response, accepts_gzip, listen

log = logging.getLogger(__name__)

# Distinct exposition formats kept per snapshot: the Accept header picks one, and a client
# sending odd versions must not grow the cache without bound.
MAX_FORMATS = 4
GZIP_LEVEL = 6


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


@dataclass(frozen=True)
class _Families:
    """A fixed list of collectors, in the shape prometheus_client's encoders read."""

    collectors: tuple[_Collector, ...]

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


@dataclass
class Encoded:
    """One body for one snapshot: the bytes, and the gzip stream of them made on demand.

    The gzip stream is kept sync-flushed but open, so a short live tail (the process metrics)
    is appended per request by copying the compressor, not by compressing it all again.
    """

    body: bytes
    _gzip: tuple[bytes, Any] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def gzip_prefix(self) -> tuple[bytes, Any]:
        with self._lock:
            if self._gzip is None:
                compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                prefix = compressor.compress(self.body) + compressor.flush(zlib.Z_SYNC_FLUSH)
                self._gzip = (prefix, compressor)
            return self._gzip

    def gzipped(self, tail: bytes = b"") -> bytes:
        prefix, compressor = self.gzip_prefix()
        finisher = compressor.copy()
        return prefix + finisher.compress(tail) + finisher.flush()


class BodyCache:
    """Encoded bodies of the current snapshot, by key; a new snapshot drops them all.

    The snapshot is compared by identity: the daemon publishes a new object every tick.
    Two scrapes that miss at once encode once: the second waits for the first.
    """

    def __init__(self, max_entries: int = MAX_FORMATS + 2) -> None:
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._entries: dict[str, Encoded] = {}

    def _lookup(self, snap: Snapshot, key: str) -> Encoded | None:
        with self._lock:
            if snap is not self._snapshot:
                self._snapshot = snap
                self._entries = {}
            return self._entries.get(key)

    def get(self, snap: Snapshot, key: str, encode: Callable[[], bytes]) -> Encoded:
        found = self._lookup(snap, key)
        if found is not None:
            return found
        with self._encode_lock:
            found = self._lookup(snap, key)
            if found is not None:
                return found
            made = Encoded(encode())
            with self._lock:
                if snap is self._snapshot:
                    if len(self._entries) >= self._max_entries:
                        self._entries.pop(next(iter(self._entries)))
                    self._entries[key] = made
            return made


LANDING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>carbond</title></head>
<body><h1>carbond {version}</h1>
<p>Energy and carbon accounting for this host.</p>
<ul>
<li><a href="/metrics">Metrics</a> (Prometheus text and OpenMetrics)</li>
<li><a href="/api/v1/consumers">/api/v1/consumers</a> (JSON)</li>
<li><a href="/api/v1/budgets">/api/v1/budgets</a> (JSON)</li>
</ul></body></html>
"""

JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


def _safe_accept(value: str) -> str:
    """The Accept header as choose_encoder may see it: its version ends up in our reply's
    Content-Type, so anything but printable ASCII falls back to the text format."""
    return value if value.isascii() and value.isprintable() else ""


class MetricsApp:
    """Request -> Response for every endpoint; runs on the HTTP server's worker threads."""

    def __init__(self, latest: Callable[[], Snapshot], live: _Collector,
                 static: _Collector) -> None:
        self._latest = latest
        self._live = _Families((live,))
        self._static = static
        self._cache = BodyCache()
        self._landing = LANDING_PAGE.format(version=html.escape(__version__)).encode()
        # The snapshot's body goes through exporter.exposition unless this prometheus_client
        # writes something it does not (a release that changed a format).
        self._fast = agrees_with_prometheus_client()
        if not self._fast:
            log.warning("this prometheus_client formats differently from exporter.exposition; "
                        "/metrics is encoded by prometheus_client alone")

    def __call__(self, request: Request) -> Response:
        path = request.path
        if path == "/metrics":
            return self.metrics(request)
        if path == "/api/v1/consumers":
            return self._document(request, "consumers", consumers_document)
        if path == "/api/v1/budgets":
            return self._document(request, "budgets", budgets_document)
        if path == "/":
            return Response(200, HTML_TYPE, self._landing)
        return Response(404, TEXT_TYPE, b"not found\n")

    def metrics(self, request: Request) -> Response:
        snap = self._latest()
        try:
            encoder, content_type = choose_encoder(_safe_accept(request.header("accept")))
        except Exception:  # a version prometheus_client cannot parse
            encoder, content_type = generate_text, CONTENT_TYPE_PLAIN_0_0_4
        families = _Families((SnapshotCollectors(snap), self._static))
        # Same bytes as `encoder`, several times faster; the live tail keeps `encoder`.
        snapshot_encoder = fast_encoder(encoder) if self._fast else encoder

        def encode() -> bytes:
            return _without_eof(snapshot_encoder(families))

        cached = self._cache.get(snap, "metrics " + content_type, encode)
        live = encoder(self._live)
        if accepts_gzip(request.header("accept-encoding")):
            return Response(200, content_type, cached.gzipped(live), gzip=True)
        return Response(200, content_type, cached.body + live)

    def _document(self, request: Request, key: str,
                  build: Callable[[Snapshot], Mapping[str, Any]]) -> Response:
        snap = self._latest()
        cached = self._cache.get(snap, key, lambda: json_bytes(build(snap)))
        if accepts_gzip(request.header("accept-encoding")):
            return Response(200, JSON_TYPE, cached.gzipped(), gzip=True)
        return Response(200, JSON_TYPE, cached.body)


def _without_eof(body: bytes) -> bytes:
    """OpenMetrics ends with one `# EOF`: the live tail, encoded after, brings its own."""
    eof = b"# EOF\n"
    return body[: -len(eof)] if body.endswith(eof) else body


class MetricsServer:
    """carbond's HTTP endpoint on its own threads; `stop()` returns within a second.

    `web_config` is an exporter-toolkit web configuration file (TLS, basic auth), reloaded when
    it changes; an invalid one raises ConfigError naming --web.config.file. Binding happens
    here, so a port in use raises OSError before anything starts.
    """

    def __init__(
        self,
        host: str,
        port: int,
        latest: Callable[[], Snapshot],
        *,
        web_config: str | None = None,
        workers: int = 4,
        backlog: int = 1024,
        header_timeout_seconds: float = 10.0,
        idle_timeout_seconds: float = 120.0,
        write_timeout_seconds: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        process = ProcessCollector(registry=None)
        platform = PlatformCollector(registry=None)
        watcher = WebConfigWatcher(web_config) if web_config else None
        app = MetricsApp(latest, live=process, static=platform)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = listen(host, port, family, backlog)
        try:
            self._server = HttpServer(
                sock, app, web_config=watcher, workers=workers, backlog=backlog,
                header_timeout_seconds=header_timeout_seconds,
                idle_timeout_seconds=idle_timeout_seconds,
                write_timeout_seconds=write_timeout_seconds,
                max_connections=max_connections,
            )
        except BaseException:
            sock.close()
            raise

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

