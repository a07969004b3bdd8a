"""A local HTTP server on 127.0.0.1 that answers like Electricity Maps v3, WattTime v3 and the
GB Carbon Intensity API, and misbehaves on request (500, timeouts, 429, garbage, HTML pages,
truncated JSON, wrong zone or units, out-of-range values, redirects elsewhere, answers dripped a
byte at a time, endless chunked bodies).

Each route has its own mode (`server.modes["em_latest"] = "500"`), so one server can play a
healthy API and a broken one at the same time. Every request is recorded for assertions.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

EM_TOKEN = "em-token-5f1e9c0d7a3b4e2f"  # distinctive, so tests can grep logs for it
WT_USERNAME = "carbond-test"
WT_PASSWORD = "wt-password-8c2d4e6f0a1b"
WT_TOKEN_PREFIX = "wt-session-token-"

MODES = (
    "ok", "500", "timeout", "429", "garbage", "html", "truncated", "short_read", "wrong_zone",
    "wrong_units", "negative", "nan", "huge", "string_value", "missing", "401", "empty",
    "redirect", "drip", "drip_body", "endless_chunked",
)  # fmt: skip
# "redirect": 302 to `redirect_location`, except requests whose query has `hop` (the
#   redirected one, when it points back here), which are answered normally.
# "drip": the whole answer, status line first, one byte every `drip_seconds`.
# "drip_body": status and headers at once, then a chunked body one byte every `drip_seconds`.
# "endless_chunked": a chunked body that never ends, as fast as the client reads.


class QuietHTTPServer(ThreadingHTTPServer):
    """socketserver prints a traceback for every handler that raises, typically a client
    leaving mid-answer (which the hostile tests do on purpose). Keep them, unprinted, for
    tests to look at."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler_errors: list[BaseException] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None:
            self.handler_errors.append(error)


@dataclass
class Recorded:
    route: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


def iso(epoch: float, minutes: bool = False) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    if minutes:
        return moment.strftime("%Y-%m-%dT%H:%MZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class FakeIntensityServer:
    """Start with `start()`, stop with `stop()`; `url` is the base for every API."""

    now: float = field(default_factory=time.time)  # what "now" means in the answers
    modes: dict[str, str] = field(default_factory=dict)  # route -> mode; default "ok"
    em_grams_per_kwh: float = 123.0
    em_is_estimated: bool = False
    em_observed_at: float | None = None  # Electricity Maps' `datetime`; None: the current hour
    wt_lbs_per_mwh: float = 1000.0
    wt_region_override: str | None = None
    uk_actual: float | None = 180.0
    uk_forecast: float = 190.0
    uk_regional_forecast: float = 95.0
    retry_after: str = "7"
    hang_seconds: float = 3.0
    redirect_location: str = "/"
    drip_seconds: float = 2.0
    forecast_values: list[float] = field(default_factory=lambda: [300, 250, 120, 140, 260, 310])
    requests: list[Recorded] = field(default_factory=list)
    tokens_issued: int = 0

    def __post_init__(self) -> None:
        self._release = threading.Event()
        self._server: QuietHTTPServer | None = None
        self._scheme = "http"
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    def start(self, tls: ssl.SSLContext | None = None) -> FakeIntensityServer:
        """Serve on 127.0.0.1; over TLS with `tls` (a server-side context), then `url` is
        https://."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        self._release.clear()
        self._server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # let hanging handlers go
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def handler_errors(self) -> list[BaseException]:
        """What the handlers raised (a client gone mid-answer), kept off stderr."""
        return self._server.handler_errors if self._server is not None else []

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def set_all(self, mode: str) -> None:
        for route in ALL_ROUTES:
            self.modes[route] = mode

    def routes_hit(self) -> list[str]:
        with self._lock:
            return [r.route for r in self.requests]

    # ---------------------------------------------------------------- dispatch

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = _route(parts.path)
        with self._lock:
            self.requests.append(
                Recorded(
                    route, parts.path, query, {k.lower(): v for k, v in handler.headers.items()}
                )
            )
        mode = self.modes.get(route, "ok")
        if route == "unknown":
            return _send(handler, 404, b'{"error":"not found"}')
        if mode == "redirect" and "hop" not in query:
            return _send(handler, 302, b"", {"Location": self.redirect_location})
        if mode == "drip":
            body = json.dumps(self.answer(route, query, parts.path)).encode()
            head = _head(
                200,
                {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                    "Connection": "close",
                },
            )
            return self._drip(handler, head + body)
        if mode == "drip_body":
            body = json.dumps(self.answer(route, query, parts.path)).encode()
            head = _head(
                200,
                {
                    "Content-Type": "application/json",
                    "Transfer-Encoding": "chunked",
                    "Connection": "close",
                },
            )
            if not _write(handler, head):
                return None
            return self._drip(
                handler, b"".join(_chunk(body[i : i + 1]) for i in range(len(body))) + _chunk(b"")
            )
        if mode == "endless_chunked":
            return self._endless(handler)
        if mode == "timeout":
            self._release.wait(self.hang_seconds)
            mode = "ok"
        if mode == "500":
            return _send(handler, 500, b'{"error":"Internal Server Error"}')
        if mode == "429":
            return _send(
                handler, 429, b'{"error":"rate limited"}', {"Retry-After": self.retry_after}
            )
        if mode == "401":
            return _send(handler, 401, b'{"error":"unauthorized"}')
        if mode == "garbage":
            return _send(handler, 200, b"\x00\x17 not json at all {{{")
        if mode == "html":
            page = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
            return _send(handler, 200, page, {"Content-Type": "text/html"})
        if mode == "empty":
            return _send(handler, 200, b"")
        if not self._authorised(route, handler, query):
            return _send(handler, 401, b'{"error":"unauthorized"}')
        body = self._answer(route, mode, query, parts.path)
        text = json.dumps(body).encode()  # json.dumps writes NaN for float('nan')
        if mode == "truncated":
            return _send(handler, 200, text[: len(text) // 2])
        if mode == "short_read":  # promises more bytes than it sends, then closes
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(text) + 100))
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(text)
            handler.wfile.flush()
            handler.close_connection = True
            return None
        return _send(handler, 200, text)

    def _drip(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        """One byte every `drip_seconds`, until done, the client leaves or the server stops."""
        handler.close_connection = True
        for index in range(len(data)):
            if not _write(handler, data[index : index + 1]):
                return
            if self._release.wait(self.drip_seconds):
                return

    def _endless(self, handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        head = _head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        block = _chunk(b"0," * 32768)
        if not _write(handler, head + _chunk(b'{"zone": "DE", "padding": [')):
            return
        while not self._release.is_set() and _write(handler, block):
            pass

    def answer(self, route: str, query: dict[str, str] | None = None, path: str = "") -> Any:
        """The healthy answer of `route`, as a parsed JSON value (for fuzzing parsers)."""
        path = path or {"uk_regional": "/regional/regionid/13",
                        "uk_fw24h": f"/intensity/{iso(self.now, minutes=True)}/fw24h",
                        "uk_regional_fw24h": f"/regional/intensity/{iso(self.now, minutes=True)}"
                                             "/fw24h/regionid/13"}.get(route, "")  # fmt: skip
        return self._answer(route, "ok", dict(query or {}), path)

    def _authorised(self, route: str, handler: BaseHTTPRequestHandler, query: dict) -> bool:
        if route.startswith("em_"):
            return handler.headers.get("auth-token") == EM_TOKEN
        if route == "wt_login":
            expected = base64.b64encode(f"{WT_USERNAME}:{WT_PASSWORD}".encode()).decode()
            return handler.headers.get("Authorization") == f"Basic {expected}"
        if route.startswith("wt_"):
            auth = handler.headers.get("Authorization", "")
            return auth.startswith(f"Bearer {WT_TOKEN_PREFIX}")
        return True

    # ---------------------------------------------------------------- bodies

    def _value(self, mode: str, good: float) -> Any:
        return {
            "negative": -5.0,
            "nan": float("nan"),
            "huge": 9000.0,
            "string_value": "123",
        }.get(mode, good)

    def _answer(self, route: str, mode: str, query: dict[str, str], path: str) -> Any:
        hour = self.now - self.now % 3600
        half_hour = self.now - self.now % 1800
        if route == "em_latest":
            zone = query.get("zone") or {"aws": "IE", "gcp": "NL", "azure": "NL"}.get(
                query.get("dataCenterProvider", ""), "XX"
            )
            body: dict[str, Any] = {
                "zone": "FR" if mode == "wrong_zone" else zone,
                "carbonIntensity": self._value(mode, self.em_grams_per_kwh),
                "datetime": iso(hour if self.em_observed_at is None else self.em_observed_at),
                "updatedAt": iso(self.now),
                "createdAt": iso(hour - 86400),
                "emissionFactorType": "lifecycle",
                "isEstimated": self.em_is_estimated,
                "estimationMethod": "TIME_SLICER_AVERAGE" if self.em_is_estimated else None,
            }
            if mode == "missing":
                del body["carbonIntensity"]
            return body
        if route == "em_forecast":
            return {
                "zone": query.get("zone", "XX"),
                "forecast": [
                    {"carbonIntensity": v, "datetime": iso(hour + 3600 * i)}
                    for i, v in enumerate(self.forecast_values)
                ],
                "updatedAt": iso(self.now),
            }
        if route == "wt_login":
            self.tokens_issued += 1
            return {"token": f"{WT_TOKEN_PREFIX}{self.tokens_issued}"}
        if route == "wt_forecast":
            region = self.wt_region_override or query.get("region", "")
            if mode == "wrong_zone":
                region = "PJM_DC"
            horizon = int(query.get("horizon_hours", "0"))
            five = self.now - self.now % 300
            count = 1 if horizon == 0 else horizon * 12
            values = self.forecast_values
            data = [
                {
                    "point_time": iso(five + 300 * i).replace(".000Z", "+00:00"),
                    "value": self._value(mode, self.wt_lbs_per_mwh if horizon == 0
                                         else values[(i // 12) % len(values)] * 2),
                    "version": "3.1",
                }
                for i in range(count)
            ]  # fmt: skip
            meta = {
                "data_point_period_seconds": 300,
                "region": region,
                "warnings": [],
                "signal_type": query.get("signal_type", "co2_moer"),
                "model": {"date": "2024-01-01", "type": "binned_regression"},
                "units": "percentile" if mode == "wrong_units" else "lbs_co2_per_mwh",
                "generated_at_period_seconds": 300,
                "generated_at": iso(five).replace(".000Z", "+00:00"),
            }
            body = {"data": data, "meta": meta}
            if mode == "missing":
                del body["data"]
            return body
        if route == "wt_signal_index":
            return {"data": [{"point_time": iso(self.now), "value": 42.0}],
                    "meta": {"units": "percentile", "signal_type": "co2_moer"}}  # fmt: skip
        if route == "uk_intensity":
            period = {
                "from": iso(half_hour, minutes=True),
                "to": iso(half_hour + 1800, minutes=True),
                "intensity": {
                    "forecast": self._value(mode, self.uk_forecast),
                    "actual": None if self.uk_actual is None else self._value(mode, self.uk_actual),
                    "index": "moderate",
                },
            }
            if mode == "missing":
                del period["intensity"]
            return {"data": [period]}
        if route == "uk_regional":
            regionid = int(path.rsplit("/", 1)[1])
            return {"data": [{
                "regionid": 99 if mode == "wrong_zone" else regionid,
                "dnoregion": "UKPN London",
                "shortname": "London",
                "data": [{
                    "from": iso(half_hour, minutes=True),
                    "to": iso(half_hour + 1800, minutes=True),
                    "intensity": {"forecast": self._value(mode, self.uk_regional_forecast),
                                  "index": "low"},
                    "generationmix": [{"fuel": "gas", "perc": 20.1}, {"fuel": "wind", "perc": 45}],
                }],
            }]}  # fmt: skip
        if route in ("uk_fw24h", "uk_regional_fw24h"):
            start = path.split("/intensity/", 1)[1].split("/", 1)[0]
            first = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
            first -= first % 1800
            periods = [
                {
                    "from": iso(first + 1800 * i, minutes=True),
                    "to": iso(first + 1800 * (i + 1), minutes=True),
                    "intensity": {"forecast": v, "actual": None, "index": "low"},
                }
                for i, v in enumerate(self.forecast_values)
            ]
            if route == "uk_fw24h":
                return {"data": periods}
            regionid = int(path.rsplit("/", 1)[1])
            return {"data": {"regionid": regionid, "dnoregion": "UKPN London",
                             "shortname": "London", "data": periods}}  # fmt: skip
        raise AssertionError(route)


ROUTES = {
    "/v3/carbon-intensity/latest": "em_latest",
    "/v3/carbon-intensity/forecast": "em_forecast",
    "/login": "wt_login",
    "/v3/forecast": "wt_forecast",
    "/v3/signal-index": "wt_signal_index",
    "/intensity": "uk_intensity",
}

ALL_ROUTES = (*ROUTES.values(), "uk_regional", "uk_regional_fw24h", "uk_fw24h")


def _route(path: str) -> str:
    if path in ROUTES:
        return ROUTES[path]
    if path.startswith("/regional/regionid/"):
        return "uk_regional"
    if path.startswith("/regional/intensity/") and "/fw24h/regionid/" in path:
        return "uk_regional_fw24h"
    if path.startswith("/intensity/") and path.endswith("/fw24h"):
        return "uk_fw24h"
    return "unknown"


def _send(
    handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    headers = {"Content-Type": "application/json", **(headers or {})}
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} OK", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _write(handler: BaseHTTPRequestHandler, data: bytes) -> bool:
    """False once the client has gone (it gave up, as it should)."""
    try:
        handler.wfile.write(data)
        handler.wfile.flush()
    except OSError:
        return False
    return True
