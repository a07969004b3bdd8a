"""A stand-in BMC on 127.0.0.1 speaking Redfish over HTTPS, in the shapes of the DMTF's
published mockups (public-rackmount1: Chassis/1U with EnvironmentMetrics, Power and
PowerSubsystem/PowerSupplies/Bay1/Metrics), with basic auth and sessions
(SessionService/Sessions: X-Auth-Token and Location), fed a load the test controls and able
to misbehave: a stale (frozen) reading, hanging, 401s, NaN, negative or 10 MW readings,
redirects to another origin.

`variant` decides what the chassis offers:
- "counter": EnvironmentMetrics with EnergyJoules (or EnergykWh: `counter_name`) and PowerWatts
- "env_power": EnvironmentMetrics with PowerWatts only
- "power": no EnvironmentMetrics (404), Power with PowerControl[0].PowerConsumedWatts
- "supplies": no EnvironmentMetrics, no Power; PowerSubsystem with two power supplies whose
  Metrics carry InputPowerWatts (half of the load each)
Time is `clock()`, so a test may pass a simulated clock shared with the meter.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.fakes.intensity_server import QuietHTTPServer

USERNAME = "carbond-bmc"
PASSWORD = "bmc-password-3e1f7a9c5b"  # distinctive: tests grep logs and requests for it
MODES = ("ok", "stale", "hang", "401", "expire", "nan", "nan_string", "negative", "huge",
         "redirect", "down", "null")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, by the openssl CLI."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=bmc",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory / "cert.pem", directory / "key.pem"


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificate))
    return context


@dataclass
class Load:
    """Piecewise-constant watts from simulated time `start` on: (from_seconds, watts)."""

    steps: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 1000.0)])

    def watts_at(self, now: float) -> float:
        watts = self.steps[0][1]
        for start, value in self.steps:
            if now >= start:
                watts = value
        return watts

    def joules_until(self, now: float) -> float:
        """The exact energy from the first step to `now`."""
        total = 0.0
        for index, (start, watts) in enumerate(self.steps):
            if now <= start:
                break
            end = self.steps[index + 1][0] if index + 1 < len(self.steps) else now
            total += watts * (min(end, now) - start)
        return total


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeBmc:
    def __init__(self, clock: Callable[[], float], *, variant: str = "counter",
                 counter_name: str = "EnergyJoules", auth: str = "session",
                 load: Load | None = None, counter_offset_joules: float = 7.2e9,
                 kwh_decimals: int | None = None, integer_watts: bool = False) -> None:
        self.clock = clock
        self.variant = variant
        self.counter_name = counter_name
        self.auth = auth  # session: tokens or basic accepted; basic: basic only
        self.load = load or Load()
        self.counter_offset_joules = counter_offset_joules  # energy before the test began
        self.kwh_decimals = kwh_decimals
        self.integer_watts = integer_watts
        self.mode = "ok"
        self.redirect_location = ""
        self.requests: list[Request] = []
        self.sessions: dict[str, str] = {}  # token -> session id
        self.deleted: list[str] = []
        self.chassis = ["1U"]
        self._frozen: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: QuietHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self, tls: ssl.SSLContext) -> FakeBmc:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"https://{host}:{port}"

    def gets(self, suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    # ---------------------------------------------------------------- answers

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0].rstrip("/")
        with self._lock:
            self.requests.append(Request(method, path, dict(handler.headers.items()), body))
            mode = self.mode
        if mode == "hang":
            self._release.wait(60)
            return
        if mode == "down":
            self._send(handler, 503, {"error": "service unavailable"})
            return
        if method == "POST" and path == "/redfish/v1/SessionService/Sessions":
            self._login(handler, body)
            return
        if method == "DELETE" and path.startswith("/redfish/v1/SessionService/Sessions/"):
            self._logout(handler, path)
            return
        if mode == "401" or not self._authorised(handler):
            self._send(handler, 401, {"error": {"code": "Base.1.8.NoValidSession"}})
            return
        if mode == "expire":  # every session the BMC knew is gone, once
            with self._lock:
                self.sessions.clear()
                self.mode = "ok"
            self._send(handler, 401, {"error": {"code": "Base.1.8.NoValidSession"}})
            return
        if mode == "redirect" and self.redirect_location:
            handler.send_response(302)
            handler.send_header("Location", self.redirect_location)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        document = self._document(path)
        if document is None:
            self._send(handler, 404, {"error": {"code": "Base.1.8.ResourceMissingAtURI"}})
            return
        self._send(handler, 200, document)

    def _authorised(self, handler: BaseHTTPRequestHandler) -> bool:
        token = handler.headers.get("X-Auth-Token")
        if token is not None and self.auth == "session":
            with self._lock:
                return token in self.sessions
        basic = handler.headers.get("Authorization", "")
        expected = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        return basic == f"Basic {expected}"

    def _login(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        try:
            credentials = json.loads(body)
        except ValueError:
            credentials = {}
        if self.auth != "session" or credentials != {"UserName": USERNAME, "Password": PASSWORD}:
            self._send(handler, 401 if self.auth == "session" else 405, {"error": "no"})
            return
        token = "rf-session-token-" + secrets.token_hex(12)
        with self._lock:
            session = str(len(self.sessions) + len(self.deleted) + 1)
            self.sessions[token] = session
        location = f"/redfish/v1/SessionService/Sessions/{session}"
        self._send(handler, 201, {"@odata.id": location, "Id": session, "UserName": USERNAME},
                   {"X-Auth-Token": token, "Location": location})

    def _logout(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        token = handler.headers.get("X-Auth-Token")
        with self._lock:
            if token in self.sessions and path.endswith("/" + self.sessions[token]):
                self.deleted.append(self.sessions.pop(token))
                status = 204
            else:
                status = 401
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _send(self, handler: BaseHTTPRequestHandler, status: int, document: Any,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(document).encode()  # NaN stays NaN: not JSON, as a broken BMC sends
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    # ---------------------------------------------------------------- the resources

    def _value(self, honest: float) -> Any:
        return {"nan": float("nan"), "nan_string": "NaN", "negative": -250.0,
                "huge": 1e7, "null": None}.get(self.mode, honest)

    def readings(self) -> dict[str, Any]:
        """Power and energy now; frozen while mode is "stale"."""
        now = self.clock()
        watts = self.load.watts_at(now)
        joules = self.counter_offset_joules + self.load.joules_until(now)
        kwh = joules / 3.6e6
        if self.kwh_decimals is not None:
            kwh = round(kwh, self.kwh_decimals)
        values = {"watts": round(watts) if self.integer_watts else watts, "joules": joules,
                  "kwh": kwh}
        with self._lock:
            if self.mode == "stale":
                if self._frozen is None:
                    self._frozen = values
                return dict(self._frozen)
            self._frozen = None
        return values

    def _document(self, path: str) -> Any:
        base = "/redfish/v1/Chassis"
        if path == "/redfish/v1":
            return {"@odata.id": "/redfish/v1", "RedfishVersion": "1.15.0",
                    "Chassis": {"@odata.id": base},
                    "SessionService": {"@odata.id": "/redfish/v1/SessionService"}}
        if path == base:
            return {"@odata.id": base, "Name": "Chassis Collection",
                    "Members@odata.count": len(self.chassis),
                    "Members": [{"@odata.id": f"{base}/{c}"} for c in self.chassis]}
        for chassis in self.chassis:
            found = self._chassis_document(f"{base}/{chassis}", path, chassis)
            if found is not None:
                return found
        return None

    def _chassis_document(self, root: str, path: str, chassis: str) -> Any:
        env, power, subsystem = (self.variant in ("counter", "env_power"),
                                 self.variant == "power", self.variant == "supplies")
        if path == root:
            document: dict[str, Any] = {
                "@odata.id": root, "@odata.type": "#Chassis.v1_23_0.Chassis", "Id": chassis,
                "Name": "Computer System Chassis", "ChassisType": "RackMount",
                "Links": {"ContainedBy": {"@odata.id": "/redfish/v1/Chassis/1U"}}
                if chassis != "1U" else {}}
            if env:
                document["EnvironmentMetrics"] = {"@odata.id": f"{root}/EnvironmentMetrics"}
            if power:
                document["Power"] = {"@odata.id": f"{root}/Power"}
            if subsystem:
                document["PowerSubsystem"] = {"@odata.id": f"{root}/PowerSubsystem"}
            return document
        values = self.readings() if path.startswith(root + "/") else {}
        if env and path == f"{root}/EnvironmentMetrics":
            document = {"@odata.id": path, "@odata.type":
                        "#EnvironmentMetrics.v1_3_0.EnvironmentMetrics",
                        "Name": "Chassis Environment Metrics",
                        "TemperatureCelsius": {"Reading": 39,
                                               "DataSourceUri": f"{root}/Sensors/CPU1Temp"},
                        "PowerWatts": {"Reading": self._value(values["watts"]),
                                       "DataSourceUri": f"{root}/Sensors/TotalPower"}}
            if self.variant == "counter":
                reading = values["joules"] if self.counter_name == "EnergyJoules" else (
                    values["kwh"])
                document[self.counter_name] = {"Reading": self._value(reading),
                                               "DataSourceUri": f"{root}/Sensors/TotalEnergy"}
            return document
        if power and path == f"{root}/Power":
            return {"@odata.id": path, "@odata.type": "#Power.v1_7_1.Power", "Id": "Power",
                    "PowerControl": [{
                        "@odata.id": f"{path}#/PowerControl/0", "MemberId": "0",
                        "Name": "System Input Power",
                        "PowerConsumedWatts": self._value(values["watts"]),
                        "PowerCapacityWatts": 2000,
                        "PowerMetrics": {"IntervalInMin": 30, "AverageConsumedWatts": 900},
                        "Status": {"State": "Enabled", "Health": "OK"}}]}
        supplies = f"{root}/PowerSubsystem/PowerSupplies"
        if subsystem and path == f"{root}/PowerSubsystem":
            return {"@odata.id": path, "@odata.type": "#PowerSubsystem.v1_1_0.PowerSubsystem",
                    "CapacityWatts": 2000, "PowerSupplies": {"@odata.id": supplies}}
        if subsystem and path == supplies:
            return {"@odata.id": path, "Members@odata.count": 2,
                    "Members": [{"@odata.id": f"{supplies}/Bay1"},
                                {"@odata.id": f"{supplies}/Bay2"}]}
        for bay in ("Bay1", "Bay2"):
            if subsystem and path == f"{supplies}/{bay}":
                return {"@odata.id": path, "Id": bay, "PowerSupplyType": "AC",
                        "Metrics": {"@odata.id": f"{path}/Metrics"}}
            if subsystem and path == f"{supplies}/{bay}/Metrics":
                return {"@odata.id": path, "@odata.type":
                        "#PowerSupplyMetrics.v1_0_1.PowerSupplyMetrics",
                        "InputVoltage": {"Reading": 230.2},
                        "InputPowerWatts": {"Reading": self._value(values["watts"] / 2)}}
        return None
