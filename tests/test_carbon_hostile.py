"""Intensity feeds that misbehave on purpose: redirects elsewhere, answers dripped a byte at a
time, endless bodies, and any byte sequence as a body. Only FetchError may come out."""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.carbon.http import MAX_REDIRECTS, HttpClient, decode_json, redirect_refusal
from carbond.carbon.intensity import MAX_GRAMS_PER_KWH, FetchError, ForecastPoint, Intensity
from carbond.carbon.providers import (
    ElectricityMapsProvider,
    Secret,
    UKGridProvider,
    WattTimeProvider,
    build_providers,
)
from carbond.carbon.refresher import IntensityFeed
from tests.fakes.intensity_server import EM_TOKEN, FakeIntensityServer
from tests.helpers import wait_for

NOW = 1_717_000_000.0
DEADLINE_SECONDS = 1.0  # the provider timeout these tests configure: the whole fetch's budget


@pytest.fixture
def server() -> Iterator[FakeIntensityServer]:
    fake = FakeIntensityServer(now=NOW).start()
    yield fake
    fake.stop()


@pytest.fixture
def other() -> Iterator[FakeIntensityServer]:
    """A second API on 127.0.0.1, another port: another origin, which must see no token."""
    fake = FakeIntensityServer(now=NOW).start()
    yield fake
    fake.stop()


class Guard(urllib.request.BaseHandler):
    """Records each request the opener is asked to make and refuses any host but 127.0.0.1, so
    a test can tell whether carbond tried to reach an address at all."""

    handler_order = 100  # before every other handler: nothing has connected yet

    def __init__(self) -> None:
        self.hosts: list[str] = []

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        self.hosts.append(request.host)
        if urllib.parse.urlsplit(request.full_url).hostname != "127.0.0.1":
            raise urllib.error.URLError(f"test guard: would connect to {request.host}")
        return request

    https_request = http_request


def client(timeout_seconds: float = DEADLINE_SECONDS, *handlers: Any) -> HttpClient:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)
    return HttpClient(timeout_seconds, opener)


def em(server: FakeIntensityServer, http: HttpClient) -> ElectricityMapsProvider:
    return ElectricityMapsProvider("DE", Secret(EM_TOKEN), http, server.url)


# ------------------------------------------------------------------ redirects


def test_token_is_never_sent_to_another_origin_after_a_redirect(server, other):
    server.modes["em_latest"] = "redirect"
    server.redirect_location = f"{other.url}/v3/carbon-intensity/latest?zone=DE"
    with pytest.raises(FetchError) as info:
        em(server, client()).fetch(NOW)
    assert info.value.reason == "redirect"
    assert other.requests == []  # not followed at all, so no header of any kind reached it
    assert server.requests[0].headers["auth-token"] == EM_TOKEN  # the configured origin did
    port = other.url.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in str(info.value)
    assert EM_TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x", "http://[fe80::1%25eth0]:80/",
     "http://[::ffff:169.254.169.254]/", "http://2852039166/", "https://169.254.169.254/"],
)  # fmt: skip
def test_redirect_to_link_local_is_never_attempted(server, location):
    guard = Guard()
    server.modes["em_latest"] = "redirect"
    server.redirect_location = location
    with pytest.raises(FetchError) as info:
        em(server, client(DEADLINE_SECONDS, guard)).fetch(NOW)
    assert info.value.reason == "redirect"
    assert guard.hosts == [server.url.removeprefix("http://")]  # only the configured API
    assert "link-local" in str(info.value)


@pytest.mark.parametrize("absolute", [True, False])
def test_same_origin_redirect_is_followed_with_the_token(server, absolute):
    server.modes["em_latest"] = "redirect"
    path = "/v3/carbon-intensity/latest?zone=DE&hop=1"
    server.redirect_location = f"{server.url}{path}" if absolute else path
    value = em(server, client()).fetch(NOW)
    assert value.grams_per_kwh == 123.0
    assert [r.query for r in server.requests] == [{"zone": "DE"}, {"zone": "DE", "hop": "1"}]
    assert all(r.headers["auth-token"] == EM_TOKEN for r in server.requests)


def test_a_redirect_loop_is_an_error(server):
    server.modes["em_latest"] = "redirect"
    server.redirect_location = "/v3/carbon-intensity/latest?zone=DE"  # to itself, forever
    with pytest.raises(FetchError) as info:
        em(server, client()).fetch(NOW)
    assert info.value.reason == "redirect"
    assert server.routes_hit().count("em_latest") == MAX_REDIRECTS + 1


def test_a_refused_redirect_is_counted_and_logged_once_without_the_token(
    server, other, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    token = tmp_path / "em.token"
    token.write_text(EM_TOKEN)
    token.chmod(0o600)
    specs = [("electricitymaps", {"token_file": str(token), "url": server.url})]
    providers = build_providers(specs, "DE", http=client())
    feed = IntensityFeed(providers, "DE", state_dir=tmp_path / "state", clock=lambda: NOW)
    server.modes["em_latest"] = "redirect"
    server.redirect_location = f"{other.url}/steal"
    assert feed.refresh_now() == {"electricitymaps": "redirect"}
    assert feed.fetch_errors()["electricitymaps"] == 1
    lines = [r.getMessage() for r in caplog.records if "redirected" in r.getMessage()]
    assert len(lines) == 1, lines
    for url in (server.url, other.url):
        assert url.removeprefix("http://") in lines[0]
    assert EM_TOKEN not in caplog.text
    assert other.requests == []


API = "https://api.electricitymaps.com"
LOCAL = "http://127.0.0.1:8080"
REDIRECT_CASES = [
    (API, f"{API}/v3/carbon-intensity/latest?zone=DE", None),
    (API, "HTTPS://API.electricitymaps.com:443/v3/x", None),
    (f"{API}/v3/carbon-intensity/latest", f"{API}/other/path", None),
    (API, "https://evil.example/v3/carbon-intensity/latest", "another origin"),
    (API, "http://api.electricitymaps.com/v3/x", "another origin"),  # downgrade
    (API, "https://api.electricitymaps.com:8443/", "another origin"),
    (API, "https://api.electricitymaps.com.evil.example/", "another origin"),
    (API, "https://api.electricitymaps.com@evil.example/", "not a valid URL"),
    (API, "https://evil.example@api.electricitymaps.com/", "not a valid URL"),  # userinfo
    (API, "https://evil.example\\@api.electricitymaps.com/", "not a valid URL"),
    (API, "http://169.254.169.254/latest/meta-data/", "link-local"),
    (API, "http://[fe80::1]/", "link-local"),
    (API, "http://[fe80::1%25eth0]/", "link-local"),
    (API, "http://[::ffff:169.254.169.254]/", "link-local"),
    (API, "http://2852039166/", "link-local"),  # 169.254.169.254 as one number
    (API, "http://0xa9.0xfe.0xa9.0xfe/", "link-local"),
    (API, "http://169.254.1/", "link-local"),
    (API, "http://127.0.0.1/", "loopback"),
    (API, "http://127.1:8080/", "loopback"),
    (API, "http://2130706433/", "loopback"),
    (API, "http://localhost:9090/", "loopback"),
    (API, "http://metrics.localhost/", "loopback"),
    (API, "http://[::1]/", "loopback"),
    (API, "http://0.0.0.0/", "loopback"),
    (LOCAL, f"{LOCAL}/v3/carbon-intensity/latest", None),  # tests' servers: keeps working
    (LOCAL, "http://127.0.0.1:8081/", "another origin"),
    (LOCAL, "http://localhost:8080/", "another origin"),
    (LOCAL, "http://169.254.169.254/", "link-local"),
    (API, "file:///etc/passwd", "not http"),
    (API, "ftp://api.electricitymaps.com/", "not http"),
    (API, "http:///no-host", "no host"),
    (API, "http://[::1/", "not a valid URL"),
    (API, "http://api.electricitymaps.com:99999/", "not a valid URL"),
]


@pytest.mark.parametrize(("configured", "target", "refusal"), REDIRECT_CASES)
def test_redirect_decision(configured, target, refusal):
    answer = redirect_refusal(configured, target)
    if refusal is None:
        assert answer is None
    else:
        assert answer is not None and refusal in answer


@given(
    target=st.one_of(
        st.text(max_size=60),
        st.builds(lambda scheme, rest: f"{scheme}://{rest}",
                  st.sampled_from(["http", "https", "HTTP", "ftp", ""]), st.text(max_size=40)),
    ),
    configured=st.sampled_from([API, LOCAL, "http://[::1]:9000", "https://10.0.0.1"]),
)  # fmt: skip
def test_redirect_decision_never_raises_and_allows_only_the_configured_origin(configured, target):
    answer = redirect_refusal(configured, target)
    assert answer is None or isinstance(answer, str)
    if answer is None:
        want, got = urllib.parse.urlsplit(configured), urllib.parse.urlsplit(target)
        assert "@" not in got.netloc and "\\" not in got.netloc
        assert (got.scheme.lower(), got.hostname) == (want.scheme, want.hostname)
        assert (got.port or {"http": 80, "https": 443}[got.scheme.lower()]) == (
            want.port or {"http": 80, "https": 443}[want.scheme]
        )


# ------------------------------------------------------------------ slow drip, endless bodies


def fetch_in_thread(fetch: Callable[[], Any], limit_seconds: float) -> dict[str, Any]:
    """Run `fetch` where a hang cannot hold the test: the outcome, its duration, and whether
    it was still running after `limit_seconds`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = fetch()
        except FetchError as exc:
            outcome["reason"] = exc.reason
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_seconds)
    outcome["held"] = thread.is_alive()
    return outcome


@pytest.mark.parametrize("mode", ["drip", "drip_body"])
def test_a_dripping_server_cannot_hold_a_fetch(server, mode):
    # A byte every quarter of the deadline: no single read ever waits as long as the timeout.
    server.modes["em_latest"] = mode
    server.drip_seconds = DEADLINE_SECONDS / 4
    outcome = fetch_in_thread(lambda: em(server, client()).fetch(NOW), DEADLINE_SECONDS * 10)
    server.stop()  # lets a held fetch go (on the code before the fix) before asserting
    assert not outcome["held"], "the fetch was still held by the drip"
    assert outcome.get("reason") == "timeout"
    assert "em_latest" in server.routes_hit()
    # The deadline bounds connect + headers + body together, with a generous margin.
    assert DEADLINE_SECONDS * 0.9 <= outcome["seconds"] < DEADLINE_SECONDS * 3


def test_the_fake_server_keeps_a_client_leaving_mid_answer_off_stderr(server, capfd):
    """A client that resets the connection while the fake hangs makes the handler's write
    fail: recorded on the server for tests, never a traceback in the test output."""
    server.modes["em_latest"] = "timeout"
    server.hang_seconds = 0.3
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /v3/carbon-intensity/latest?zone=DE HTTP/1.1\r\nHost: x\r\n"
                     b"auth-token: " + EM_TOKEN.encode() + b"\r\n\r\n")
        assert wait_for(lambda: "em_latest" in server.routes_hit(), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    assert wait_for(lambda: server.handler_errors, timeout=10)
    assert all(isinstance(e, ConnectionError) for e in server.handler_errors)
    assert "Traceback" not in capfd.readouterr().err


def test_carbond_intensity_round_is_bounded_by_the_deadline(server, tmp_path):
    """`carbond intensity` runs one synchronous round: it must end, with the timeout counted."""
    token = tmp_path / "em.token"
    token.write_text(EM_TOKEN)
    specs = [("electricitymaps", {"token_file": str(token), "url": server.url})]
    feed = IntensityFeed(build_providers(specs, "DE", http=client()), "DE", clock=lambda: NOW)
    server.modes["em_latest"] = "drip"
    server.drip_seconds = DEADLINE_SECONDS / 4
    outcome = fetch_in_thread(lambda: feed.refresh_now(force=False), DEADLINE_SECONDS * 10)
    server.stop()
    assert not outcome["held"]
    assert outcome["value"] == {"electricitymaps": "timeout"}
    assert feed.current().provider == "static"
    assert feed.fetch_errors()["electricitymaps"] == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=fake",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
def tls_server(certificate) -> Iterator[FakeIntensityServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificate))
    fake = FakeIntensityServer(now=NOW).start(tls=context)
    yield fake
    fake.stop()


def tls_client(certificate: tuple[Path, Path]) -> HttpClient:
    """An opener trusting only the test certificate: HttpClient must keep that TLS setting."""
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    return client(DEADLINE_SECONDS, urllib.request.HTTPSHandler(context=trust))


def test_https_keeps_the_openers_tls_settings_and_the_deadline(tls_server, certificate):
    assert tls_server.url.startswith("https://")
    assert em(tls_server, tls_client(certificate)).fetch(NOW).grams_per_kwh == 123.0
    with pytest.raises(FetchError) as info:  # the default trust store does not know the cert
        em(tls_server, client()).fetch(NOW)
    assert info.value.reason == "network"
    tls_server.modes["em_latest"] = "drip_body"
    tls_server.drip_seconds = DEADLINE_SECONDS / 4
    fetch = em(tls_server, tls_client(certificate)).fetch
    outcome = fetch_in_thread(lambda: fetch(NOW), DEADLINE_SECONDS * 10)
    tls_server.stop()
    assert not outcome["held"]
    assert outcome.get("reason") == "timeout"
    assert DEADLINE_SECONDS * 0.9 <= outcome["seconds"] < DEADLINE_SECONDS * 3


def test_a_dripped_tls_handshake_is_bounded_by_the_deadline():
    # A TLS record header announcing 16 kB of handshake, then its bytes one at a time: the
    # client waits for the whole record before it can even check a certificate.
    drip = RawServer(drip_seconds=DEADLINE_SECONDS / 4)
    drip.payload = b"\x16\x03\x03\x40\x00" + b"\x00" * 16384
    url = drip.url.replace("http://", "https://")
    try:
        outcome = fetch_in_thread(lambda: client().get_json(url), DEADLINE_SECONDS * 10)
    finally:
        drip.close()
    assert not outcome["held"]
    assert outcome.get("reason") == "timeout"
    assert drip.connections == 1
    assert DEADLINE_SECONDS * 0.9 <= outcome["seconds"] < DEADLINE_SECONDS * 3


def test_an_endless_chunked_body_is_cut_at_the_size_cap(server):
    server.modes["em_latest"] = "endless_chunked"
    outcome = fetch_in_thread(lambda: em(server, client(30.0)).fetch(NOW), 60)
    server.stop()
    assert not outcome["held"]
    assert outcome.get("reason") == "too_large"


# ------------------------------------------------------------------ any bytes as a body


def parsers() -> dict[str, Callable[[Any], object]]:
    """Every provider's parse functions, fed a decoded body directly (no network)."""
    http = HttpClient()  # never used: bodies go straight to the parse functions
    em_zone = ElectricityMapsProvider("DE", Secret("t"), http)
    em_cloud = ElectricityMapsProvider("aws:eu-west-1", Secret("t"), http)
    wt = WattTimeProvider("u", Secret("p"), "CAISO_NORTH", http)
    uk = UKGridProvider(http)
    uk13 = UKGridProvider(http, region=13)
    return {
        "em_latest": lambda body: em_zone.parse_latest(body, NOW),
        "em_latest_cloud": lambda body: em_cloud.parse_latest(body, NOW),
        "em_forecast": em_zone.parse_forecast,
        "wt_login": WattTimeProvider.parse_login,
        "wt_latest": lambda body: wt.parse_latest(body, NOW),
        "wt_forecast": wt.parse_forecast,
        "uk_intensity": lambda body: uk.parse_latest(body, NOW),
        "uk_regional": lambda body: uk13.parse_latest(body, NOW),
        "uk_fw24h": uk.parse_forecast,
        "uk_regional_fw24h": uk13.parse_forecast,
    }


PARSERS = parsers()
# the fake server's route whose healthy answer each parser reads
ROUTE_OF = {"em_latest_cloud": "em_latest", "wt_latest": "wt_forecast"}
QUERY_OF = {"em_latest": {"zone": "DE"}, "em_forecast": {"zone": "DE"},
            "wt_forecast": {"region": "CAISO_NORTH", "horizon_hours": "24"}}  # fmt: skip


def healthy(name: str) -> Any:
    route = ROUTE_OF.get(name, name)
    query = {"zone": "IE"} if name == "em_latest_cloud" else QUERY_OF.get(route, {})
    if name == "wt_latest":
        query = {"region": "CAISO_NORTH", "horizon_hours": "0"}
    return FakeIntensityServer(now=NOW).answer(route, query)


def parse_or_fetch_error(name: str, body: bytes) -> object | None:
    """The parsed value, None for a FetchError; anything else raised fails the test."""
    try:
        result = PARSERS[name](decode_json(body, "application/json"))
    except FetchError as exc:
        assert exc.reason and isinstance(str(exc), str)
        return None
    check_result(result)
    return result


def check_result(result: object) -> None:
    """What a parser returns is usable: finite figures in range, whatever the body was."""
    items = result if isinstance(result, list) else [result]
    for item in items:
        if isinstance(item, Intensity):
            assert 0 <= item.grams_per_kwh <= MAX_GRAMS_PER_KWH
            assert math.isfinite(item.observed_at)
        elif isinstance(item, ForecastPoint):
            assert 0 <= item.grams_per_kwh <= MAX_GRAMS_PER_KWH
            assert math.isfinite(item.start) and math.isfinite(item.end)
        else:
            assert isinstance(item, str) and item  # a WattTime login token


def test_every_parser_accepts_the_healthy_answer():
    for name in PARSERS:
        assert parse_or_fetch_error(name, json.dumps(healthy(name)).encode()) is not None, name


@settings(max_examples=300)
@given(name=st.sampled_from(sorted(PARSERS)), body=st.binary(max_size=4096))
def test_random_bytes_through_every_parser(name, body):
    parse_or_fetch_error(name, body)


KEYS = ["zone", "carbonIntensity", "datetime", "isEstimated", "forecast", "data", "meta",
        "units", "signal_type", "region", "data_point_period_seconds", "value", "point_time",
        "regionid", "from", "to", "intensity", "actual", "token"]  # fmt: skip
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from(["2024-05-29T16:00:00.000Z", "2099-01-01T00:00Z", "0001-01-01T00:00+23:59",
                     "9999-12-31T23:59:59-23:59", "lbs_co2_per_mwh", "co2_moer", "DE", "\ud800",
                     "CAISO_NORTH", "2024-13-01T00:00Z", "\n\x1b[31m"]),
)  # fmt: skip
JSON = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=6)
    ),
    max_leaves=30,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(copy[path[0]], path[1:], new)
    return copy


@settings(max_examples=400)
@given(name=st.sampled_from(sorted(PARSERS)), data=st.data())
def test_healthy_answers_with_one_part_replaced(name, data):
    body = healthy(name)
    path = data.draw(st.sampled_from(paths(body)))
    body = replaced(body, path, data.draw(JSON))
    parse_or_fetch_error(name, json.dumps(body).encode())


@settings(max_examples=300)
@given(name=st.sampled_from(sorted(PARSERS)), data=st.data())
def test_healthy_answers_with_bytes_changed(name, data):
    body = bytearray(json.dumps(healthy(name)).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if action == "set" and at < len(body):
            body[at] = byte
        elif action == "insert":
            body.insert(at, byte)
        elif at < len(body):
            del body[at]
    parse_or_fetch_error(name, bytes(body))


@settings(max_examples=200)
@given(name=st.sampled_from(sorted(PARSERS)), body=JSON)
def test_random_json_through_every_parser(name, body):
    parse_or_fetch_error(name, json.dumps(body).encode())


def test_deeply_nested_json_is_bad_json():
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 50_000 + b"]" * 50_000):
        with pytest.raises(FetchError) as info:
            decode_json(body)
        assert info.value.reason == "bad_json"


def test_an_integer_too_large_for_a_float_is_an_invalid_value(server):
    server.em_grams_per_kwh = 10**400  # type: ignore[assignment]  # JSON allows it
    with pytest.raises(FetchError) as info:
        em(server, client()).fetch(NOW)
    assert info.value.reason == "invalid_value"


# ------------------------------------------------------------------ any bytes as a response


class RawServer:
    """Answers every connection with `payload` verbatim (status line and headers included),
    then closes: whatever a broken proxy or a hostile host could send. With `drip_seconds`
    it sends one byte per interval without waiting for a request (as a TLS server speaks
    first), until the client leaves or the server closes."""

    def __init__(self, drip_seconds: float | None = None) -> None:
        self.payload = b""
        self.drip_seconds = drip_seconds
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with connection:
                connection.settimeout(2)
                if self.drip_seconds is not None:
                    self._drip(connection, self.drip_seconds)
                    continue
                try:
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 65536:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    connection.sendall(self.payload)
                except OSError:
                    pass

    def _drip(self, connection: socket.socket, interval_seconds: float) -> None:
        for index in range(len(self.payload)):
            try:
                connection.sendall(self.payload[index : index + 1])
            except OSError:
                return
            if self._stop.wait(interval_seconds):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.fixture(scope="module")
def raw() -> Iterator[RawServer]:
    fake = RawServer()
    yield fake
    fake.close()


HEADS = [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"HTTP/1.1 302 Found\r\nLocation: ", b"HTTP/1.1 429 Too Many\r\nRetry-After: ",
         b"HTTP/1.0 200 OK\r\n\r\n"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(head=st.sampled_from(HEADS), rest=st.binary(max_size=512))
def test_any_response_bytes_give_a_fetch_error_or_json(raw, head, rest):
    raw.payload = head + rest
    try:
        client(2.0).get_json(f"{raw.url}/v3/carbon-intensity/latest", {"auth-token": "x"})
    except FetchError as exc:
        assert exc.reason
