"""Prometheus exposition and the JSON API over the last tick's Snapshot.

Scrapes never measure anything. The snapshot changes once per tick, so every body (each
exposition format, each JSON document, plain and gzipped) is encoded once per snapshot and then
served from memory; only prometheus_client's small process collector (`process_*`) is rendered
on every scrape, so those values are current. Prometheus scrapes about once per tick, so nearly
every scrape encodes: exporter.exposition does that, byte for byte as prometheus_client's encoders
would, several times faster. The HTTP side is carbond.web.server; TLS and basic auth come from
carbond.web.config.
"""

from __future__ import annotations

import html
import json
import logging
import math
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.exposition import generate_latest as generate_text

from carbond import __version__
from carbond.exporter.exposition import agrees_with_prometheus_client, fast_encoder
from carbond.exporter.snapshot import Snapshot
from carbond.types import Consumer, name_text
from carbond.web.config import WebConfigWatcher
from carbond.web.server import HttpServer, Request, Response, accepts_gzip, listen

log = logging.getLogger(__name__)

DEVICE_LABELS = ["component", "device", "source"]
CONSUMER_LABELS = ["consumer", "kind", "component"]
API_VERSION = 1
# Distinct exposition formats kept per snapshot: the Accept header picks one, and a client
# sending odd versions must not grow the cache without bound.
MAX_FORMATS = 4
GZIP_LEVEL = 6




def _labels(values: Iterable[str]) -> list[str]:
    return [name_text(v) for v in values]


def _energy_and_power(
    subject: str, per: str, label_names: list[str],
    rows: Iterable[tuple[list[str], float, float]],
) -> Iterator[Metric]:
    """carbond_<subject>_energy_joules_total and carbond_<subject>_power_watts, one row each."""
    energy = CounterMetricFamily(f"carbond_{subject}_energy_joules",
                                 f"Energy {per} since start.", labels=label_names)
    power = GaugeMetricFamily(f"carbond_{subject}_power_watts",
                              f"Mean power {per} over the last tick.", labels=label_names)
    for labels, joules_total, watts in rows:
        values = _labels(labels)
        energy.add_metric(values, joules_total)
        power.add_metric(values, watts)
    yield energy
    yield power


def _counter_by(name: str, help_text: str, label: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([name_text(value)], count)
    return family


def _counter(name: str, help_text: str, value: float) -> Metric:
    family = CounterMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def _gauge(name: str, help_text: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def _per_consumer(name: str, help_text: str,
                  rows: Iterable[tuple[Consumer, float]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=["consumer", "kind"])
    for consumer, grams in rows:
        family.add_metric(_labels((consumer.name, consumer.kind)), grams)
    return family


def snapshot_families(snap: Snapshot) -> Iterator[Metric]:
    """Every carbond_* family of DESIGN.md's metric table, from one snapshot."""
    yield from _energy_and_power(
        "host", "per device", DEVICE_LABELS,
        (([d.component, d.device, d.source], d.joules_total, d.watts) for d in snap.devices),
    )
    up = GaugeMetricFamily("carbond_meter_up", "1 when the meter's last read gave a sample.",
                           labels=["meter"])
    for meter, is_up in sorted(snap.meters_up.items()):
        up.add_metric([name_text(meter)], 1.0 if is_up else 0.0)
    yield up
    yield _counter_by("carbond_meter_errors", "Failed device reads per meter.", "meter",
                      snap.meter_errors_total)
    yield _counter_by("carbond_counter_wraps", "Hardware energy counter wraps handled.",
                      "device", snap.counter_wraps_total)
    yield _counter_by("carbond_counter_resets",
                      "Hardware energy counter resets (a counter that went backwards).",
                      "device", snap.counter_resets_total)

    yield from _energy_and_power(
        "consumer", "per consumer", CONSUMER_LABELS,
        (([c.consumer.name, c.consumer.kind, c.component], c.joules_total, c.watts)
         for c in snap.consumers),
    )
    yield _per_consumer("carbond_consumer_emissions_grams",
                        "CO2e attributed to a consumer since start.", snap.consumer_grams_total)
    yield _per_consumer("carbond_consumer_embodied_grams",
                        "Embodied emissions of the host attributed to a consumer since start.",
                        snap.consumer_embodied_grams_total)
    yield from _carbon(snap)
    yield from _budgets(snap)

    yield _counter("carbond_exited_tasks",
                   "Tasks whose final CPU time came from taskstats exit events.",
                   snap.exited_tasks_total)
    yield _counter("carbond_exit_records_lost",
                   "Taskstats exit records the kernel dropped before carbond read them.",
                   snap.exit_records_lost_total)
    gpu_info = GaugeMetricFamily("carbond_gpu_info", "GPUs seen by NVML (value 1).",
                                 labels=["device", "uuid", "name"])
    for gpu in snap.gpus:
        gpu_info.add_metric(_labels((gpu.device, gpu.uuid, gpu.name)), 1.0)
    yield gpu_info

    tick = HistogramMetricFamily("carbond_tick_duration_seconds",
                                 "Wall time of one measurement tick.")
    tick.add_metric([], list(snap.tick_buckets), snap.tick_seconds_sum)
    yield tick
    yield _counter("carbond_tick_failures", "Ticks that failed and were skipped.",
                   snap.tick_failures_total)
    yield _gauge("carbond_last_tick_timestamp_seconds",
                 "Wall clock (epoch seconds) of the last successful tick.",
                 snap.last_tick_timestamp_seconds)
    yield _counter("carbond_ledger_errors", "Failed ledger writes.", snap.ledger_errors_total)
    info = GaugeMetricFamily("carbond_build_info", "carbond build.", labels=["version"])
    info.add_metric([__version__], 1.0)
    yield info


def _carbon(snap: Snapshot) -> Iterator[Metric]:
    yield _counter("carbond_host_emissions_grams",
                   "CO2e of the attributed host energy since start.", snap.host_grams_total)
    intensity = GaugeMetricFamily(
        "carbond_grid_intensity_grams_per_kwh", "Grid carbon intensity in use.",
        labels=["zone", "provider"],
    )
    age = GaugeMetricFamily(
        "carbond_grid_intensity_age_seconds", "Age of the intensity figure in use.",
        labels=["zone", "provider"],
    )
    if snap.intensity is not None:
        labels = _labels((snap.zone or snap.intensity.zone, snap.intensity.provider))
        intensity.add_metric(labels, snap.intensity.grams_per_kwh)
        age.add_metric(labels, snap.intensity_age_seconds or 0.0)
    yield intensity
    yield age
    yield _counter_by("carbond_intensity_fetch_errors",
                      "Failed or rejected intensity fetches.", "provider",
                      snap.intensity_fetch_errors_total)
    yield _gauge("carbond_pue_ratio", "Power usage effectiveness applied.", snap.pue)


def _budgets(snap: Snapshot) -> Iterator[Metric]:
    limit = GaugeMetricFamily("carbond_budget_limit_grams",
                              "An emission budget's limit for its current period.",
                              labels=["budget"])
    used = GaugeMetricFamily("carbond_budget_used_grams",
                             "CO2e counted against a budget in its current period.",
                             labels=["budget"])
    projected = GaugeMetricFamily("carbond_budget_projected_grams",
                                  "CO2e a budget is projected to reach by its period's end.",
                                  labels=["budget"])
    for budget in snap.budgets:
        name = [name_text(budget.name)]
        limit.add_metric(name, budget.limit_grams)
        used.add_metric(name, budget.used_grams)
        projected.add_metric(name, budget.projected_grams)
    yield limit
    yield used
    yield projected


class SnapshotCollector:
    """The carbond_* families of whatever `latest()` returns, for a prometheus_client registry."""

    def __init__(self, latest: Callable[[], Snapshot]) -> None:
        self._latest = latest

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        return snapshot_families(self._latest())


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


@dataclass(frozen=True)
class _Families:
    """A fixed list of collectors, in the shape prometheus_client's encoders read."""

    collectors: tuple[_Collector, ...]

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


class _FixedSnapshot:
    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        return snapshot_families(self._snap)


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


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity; an undefined figure is null."""
    return value if math.isfinite(value) else None


def _iso(epoch_seconds: float) -> str | None:
    if not epoch_seconds or not math.isfinite(epoch_seconds):
        return None
    try:
        moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat().replace("+00:00", "Z")


def _header(snap: Snapshot) -> dict[str, Any]:
    """What every API document starts with: version, when, and the conditions of that tick."""
    stamp = snap.last_tick_timestamp_seconds
    intensity = None
    if snap.intensity is not None:
        intensity = {
            "grams_per_kwh": _finite(snap.intensity.grams_per_kwh),
            "zone": name_text(snap.zone or snap.intensity.zone),
            "provider": name_text(snap.intensity.provider),
            "age_seconds": (None if snap.intensity_age_seconds is None
                            else _finite(snap.intensity_age_seconds)),
            "marginal": snap.intensity.marginal,
        }
    return {
        "version": API_VERSION,
        "timestamp": _finite(stamp) if stamp else None,
        "time": _iso(stamp),
        "intensity": intensity,
        "pue": _finite(snap.pue),
    }


def _sum(values: Iterable[float]) -> float:
    """A careful sum; NaN (not an exception) when the parts are not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):  # inf - inf, or an intermediate overflow
        return math.nan


def _component_map(values: Mapping[str, float], with_total: bool) -> dict[str, float | None]:
    result: dict[str, float | None] = {k: _finite(v) for k, v in sorted(values.items())}
    if with_total:
        result["total"] = _finite(_sum(values.values()))
    return result


def consumers_document(snap: Snapshot) -> dict[str, Any]:
    """The /api/v1/consumers document (docs/http.md): one entry per exported consumer,
    highest total power first."""
    watts: dict[Consumer, dict[str, float]] = {}
    joules: dict[Consumer, dict[str, float]] = {}
    for sample in snap.consumers:
        watts.setdefault(sample.consumer, {})[sample.component] = sample.watts
        joules.setdefault(sample.consumer, {})[sample.component] = sample.joules_total
    grams = dict(snap.consumer_grams_total)
    embodied = dict(snap.consumer_embodied_grams_total)
    everyone = set(watts) | set(grams) | set(embodied)

    def rank(consumer: Consumer) -> tuple[float, str, str]:
        total = _sum(watts.get(consumer, {}).values())
        return (-total if math.isfinite(total) else 0.0, consumer.kind, consumer.name)

    host_watts: dict[str, float] = {}
    host_joules: dict[str, float] = {}
    for device in snap.devices:
        host_watts[device.component] = host_watts.get(device.component, 0.0) + device.watts
        host_joules[device.component] = (host_joules.get(device.component, 0.0)
                                         + device.joules_total)
    document = _header(snap)
    document["host"] = {
        "watts": _component_map(host_watts, with_total=True),
        "joules": _component_map(host_joules, with_total=True),
        "emissions_grams": _finite(snap.host_grams_total),
        "devices": [
            {"component": name_text(d.component), "device": name_text(d.device),
             "source": name_text(d.source), "watts": _finite(d.watts),
             "joules": _finite(d.joules_total)}
            for d in snap.devices
        ],
    }
    document["consumers"] = [
        {
            "kind": name_text(consumer.kind),
            "name": name_text(consumer.name),
            "watts": _component_map(watts.get(consumer, {}), with_total=True),
            "joules": _component_map(joules.get(consumer, {}), with_total=True),
            "emissions_grams": _finite(grams.get(consumer, 0.0)),
            "embodied_grams": _finite(embodied.get(consumer, 0.0)),
        }
        for consumer in sorted(everyone, key=rank)
    ]
    return document


def budgets_document(snap: Snapshot) -> dict[str, Any]:
    """The /api/v1/budgets document (docs/http.md)."""
    document = _header(snap)
    document["budgets"] = [
        {
            "name": name_text(b.name),
            "limit_grams": _finite(b.limit_grams),
            "used_grams": _finite(b.used_grams),
            "projected_grams": _finite(b.projected_grams),
            "period_start": _finite(b.period_start),
            "period_end": _finite(b.period_end),
            "period_start_time": _iso(b.period_start),
            "period_end_time": _iso(b.period_end),
        }
        for b in snap.budgets
    ]
    return document


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


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
        # The snapshot's body goes through carbond.exporter.exposition unless this prometheus_client
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
        families = _Families((_FixedSnapshot(snap), self._static))
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
        cached = self._cache.get(snap, key, lambda: _json_bytes(build(snap)))
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
        self.registry = CollectorRegistry(auto_describe=False)
        process = ProcessCollector(registry=None)
        platform = PlatformCollector(registry=None)
        for collector in (SnapshotCollector(latest), process, platform):
            self.registry.register(collector)
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

