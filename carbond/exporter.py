"""Prometheus exposition over the last tick's Snapshot.

A custom collector turns the snapshot into metric families at scrape time; the scrape never
measures anything. A small HTTP server serves /metrics and a landing page at /.
"""

from __future__ import annotations

import html
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
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
CONSUMER_LABELS = ["consumer", "kind", "component"]


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
        energy.add_metric(labels, joules_total)
        power.add_metric(labels, watts)
    yield energy
    yield power


def _counter_by(name: str, help_text: str, label: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


class SnapshotCollector:
    def __init__(self, latest: Callable[[], Snapshot]) -> None:
        self._latest = latest

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        snap = self._latest()
        yield from _energy_and_power(
            "host", "per device", DEVICE_LABELS,
            (([d.component, d.device, d.source], d.joules_total, d.watts) for d in snap.devices),
        )

        up = GaugeMetricFamily("carbond_meter_up", "1 when the meter's last read gave a sample.",
                               labels=["meter"])
        for meter, is_up in sorted(snap.meters_up.items()):
            up.add_metric([meter], 1.0 if is_up else 0.0)
        yield up
        yield _counter_by("carbond_meter_errors", "Failed device reads per meter.", "meter",
                          snap.meter_errors_total)
        yield _counter_by("carbond_counter_wraps", "Hardware counter wraps and resets handled.",
                          "device", snap.counter_wraps_total)

        yield from self._consumers(snap)
        yield from self._carbon(snap)
        exited = CounterMetricFamily(
            "carbond_exited_tasks", "Tasks whose final CPU time came from taskstats exit events."
        )
        exited.add_metric([], snap.exited_tasks_total)
        yield exited
        gpu_info = GaugeMetricFamily("carbond_gpu_info", "GPUs seen by NVML (value 1).",
                                     labels=["device", "uuid", "name"])
        for gpu in snap.gpus:
            gpu_info.add_metric([gpu.device, gpu.uuid, gpu.name], 1.0)
        yield gpu_info

        tick = HistogramMetricFamily("carbond_tick_duration_seconds",
                                     "Wall time of one measurement tick.")
        tick.add_metric([], list(snap.tick_buckets), snap.tick_seconds_sum)
        yield tick
        info = GaugeMetricFamily("carbond_build_info", "carbond build.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info


    @staticmethod
    def _consumers(snap: Snapshot) -> Iterator[Metric]:
        yield from _energy_and_power(
            "consumer", "per consumer", CONSUMER_LABELS,
            (([c.consumer.name, c.consumer.kind, c.component], c.joules_total, c.watts)
             for c in snap.consumers),
        )
        emissions = CounterMetricFamily(
            "carbond_consumer_emissions_grams", "CO2e attributed to a consumer since start.",
            labels=["consumer", "kind"],
        )
        for consumer, grams in snap.consumer_grams_total:
            emissions.add_metric([consumer.name, consumer.kind], grams)
        yield emissions

    @staticmethod
    def _carbon(snap: Snapshot) -> Iterator[Metric]:
        host = CounterMetricFamily(
            "carbond_host_emissions_grams", "CO2e of the attributed host energy since start."
        )
        host.add_metric([], snap.host_grams_total)
        yield host
        intensity = GaugeMetricFamily(
            "carbond_grid_intensity_grams_per_kwh", "Grid carbon intensity in use.",
            labels=["zone", "provider"],
        )
        age = GaugeMetricFamily(
            "carbond_grid_intensity_age_seconds", "Age of the intensity figure in use.",
            labels=["zone", "provider"],
        )
        if snap.intensity is not None:
            labels = [snap.intensity.zone, snap.intensity.provider]
            intensity.add_metric(labels, snap.intensity.grams_per_kwh)
            age.add_metric(labels, snap.intensity_age_seconds or 0.0)
        yield intensity
        yield age
        yield _counter_by("carbond_intensity_fetch_errors",
                          "Failed or rejected intensity fetches.", "provider",
                          snap.intensity_fetch_errors_total)
        pue = GaugeMetricFamily("carbond_pue_ratio", "Power usage effectiveness applied.")
        pue.add_metric([], snap.pue)
        yield pue


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
    """The HTTP endpoint on its own thread; `stop()` returns within a second.

    The accept loop wakes every `POLL_SECONDS` only to notice `stop()`: each wake-up costs
    CPU on an idle host, so it is as long as that promise allows.
    """

    POLL_SECONDS = 0.5

    def __init__(self, host: str, port: int, latest: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(latest))
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), make_handler(self.registry))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": self.POLL_SECONDS},
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
