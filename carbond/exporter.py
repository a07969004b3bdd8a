"""Prometheus exposition over the last tick's Snapshot.

A custom collector turns the snapshot into metric families at scrape time; the scrape never
measures anything. A small HTTP server serves /metrics and a landing page at /.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from carbond import __version__
from carbond.snapshot import Snapshot

log = logging.getLogger(__name__)

DEVICE_LABELS = ["component", "device", "source"]


class SnapshotCollector:
    def __init__(self, latest: Callable[[], Snapshot]) -> None:
        self._latest = latest

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        energy = CounterMetricFamily(
            "carbond_host_energy_joules", "Energy measured per device since start.",
            labels=DEVICE_LABELS,
        )
        power = GaugeMetricFamily(
            "carbond_host_power_watts", "Mean power per device over the last tick.",
            labels=DEVICE_LABELS,
        )
        for series in snap.devices:
            labels = [series.component, series.device, series.source]
            energy.add_metric(labels, series.joules_total)
            power.add_metric(labels, series.watts)
        yield energy
        yield power

        up = GaugeMetricFamily("carbond_meter_up", "1 when the meter's last read gave a sample.",
                               labels=["meter"])
        for meter, is_up in sorted(snap.meters_up.items()):
            up.add_metric([meter], 1.0 if is_up else 0.0)
        yield up
        errors = CounterMetricFamily("carbond_meter_errors", "Failed device reads per meter.",
                                     labels=["meter"])
        for meter, count in sorted(snap.meter_errors_total.items()):
            errors.add_metric([meter], count)
        yield errors
        wraps = CounterMetricFamily(
            "carbond_counter_wraps", "Hardware counter wraps and resets handled.",
            labels=["device"],
        )
        for device, count in sorted(snap.counter_wraps_total.items()):
            wraps.add_metric([device], count)
        yield wraps

        tick = HistogramMetricFamily("carbond_tick_duration_seconds",
                                     "Wall time of one measurement tick.")
        tick.add_metric([], list(snap.tick_buckets), snap.tick_seconds_sum)
        yield tick
        info = GaugeMetricFamily("carbond_build_info", "carbond build.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info


LANDING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>carbond</title></head>
<body><h1>carbond {version}</h1>
<p>Energy and carbon accounting for this host.</p>
<p><a href="/metrics">Metrics</a></p></body></html>
"""


def make_handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"carbond/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, content_type, encoder(registry))
            elif path == "/":
                page = LANDING_PAGE.format(version=html.escape(__version__))
                self._send(200, "text/html; charset=utf-8", page.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http %s", format % args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint on its own thread; `stop()` returns within a second."""

    def __init__(self, host: str, port: int, latest: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(latest))
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), make_handler(self.registry))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="carbond-http", daemon=True,
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
