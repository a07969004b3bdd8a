"""--web.config.file: TLS (with client certificates) and basic auth, over real sockets.

Certificates are made per test session with the openssl command line tool.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from carbond.exporter.app import MetricsServer
from carbond.types import ConfigError
from carbond.web.config import WebConfigWatcher, load_web_config
from tests.helpers import wait_for
from tests.snapshots import make_snapshot
from tests.web_helpers import Published, read_until_closed, real_prometheus, serving

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")

PASSWORD = "correct horse battery staple"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    intruder_cert: Path
    intruder_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)


def _leaf(directory: Path, name: str, san: str, ca: str = "ca") -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
             f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "IP:127.0.0.1,DNS:localhost")
    _leaf(directory, "client", "DNS:scraper.example")
    _leaf(directory, "intruder", "DNS:intruder.example")
    return Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key",
               directory / "client.crt", directory / "client.key",
               directory / "intruder.crt", directory / "intruder.key",
               directory / "other-ca.crt")


def auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def fetch(port: int, path: str = "/metrics", headers: dict[str, str] | None = None,
          context: ssl.SSLContext | None = None) -> int:
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                                 context=context)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def tls_section(pki: Pki, extra: str = "") -> str:
    return (f"tls_server_config:\n  cert_file: {pki.cert}\n  key_file: {pki.key}\n"
            + extra)


def write(path: Path, text: str) -> Path:
    """Replace the file so that its size or inode changes, which the watcher notices."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def test_basic_auth_wants_the_right_password(tmp_path):
    config = write(tmp_path / "web.yml", f"basic_auth_users:\n  alice: '{HASH}'\n")
    with serving(web_config=str(config)) as (running, _):
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 401
        assert response.getheader("WWW-Authenticate", "").startswith("Basic")
        assert fetch(running.port, headers=auth("alice", "wrong")) == 401
        assert fetch(running.port, headers=auth("mallory", PASSWORD)) == 401
        assert fetch(running.port, headers={"Authorization": "Basic !!!"}) == 401
        assert fetch(running.port, headers={"Authorization": "Bearer x"}) == 401
        assert fetch(running.port, headers=auth("alice", "x" * 100)) == 401  # > 72 bytes
        for path in ("/metrics", "/", "/api/v1/consumers", "/api/v1/budgets"):
            assert fetch(running.port, path, headers=auth("alice", PASSWORD)) == 200
            assert fetch(running.port, path) == 401


def test_tls_serves_https_and_refuses_plain_http(pki, tmp_path):
    config = write(tmp_path / "web.yml", tls_section(pki) +
                   f"basic_auth_users:\n  alice: '{HASH}'\n")
    with serving(web_config=str(config)) as (running, _):
        context = client_context(pki)
        assert fetch(running.port, context=context) == 401
        assert fetch(running.port, headers=auth("alice", "nope"), context=context) == 401
        assert fetch(running.port, headers=auth("alice", PASSWORD), context=context) == 200
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(sock, timeout=10)
        assert b"HTTP/1." not in answer and b"carbond_" not in answer
        # The server goes on after the failed handshake.
        assert fetch(running.port, headers=auth("alice", PASSWORD), context=context) == 200


def test_tls_keep_alive_and_large_bodies(pki, tmp_path):
    config = write(tmp_path / "web.yml", tls_section(pki))
    with serving(web_config=str(config)) as (running, published):
        published.snapshot = make_snapshot(500)
        connection = http.client.HTTPSConnection("127.0.0.1", running.port, timeout=10,
                                                 context=client_context(pki))
        try:
            for _ in range(3):
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                assert response.status == 200 and len(body) > 300_000
        finally:
            connection.close()


def test_client_certificates_required_and_checked(pki, tmp_path):
    config = write(tmp_path / "web.yml", tls_section(
        pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
             "  client_allowed_sans: [scraper.example]\n"))
    with serving(web_config=str(config)) as (running, _):
        good = client_context(pki, pki.client_cert, pki.client_key)
        assert fetch(running.port, context=good) == 200
        for context in (client_context(pki),
                        client_context(pki, pki.intruder_cert, pki.intruder_key)):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                fetch(running.port, context=context)
        assert fetch(running.port, context=good) == 200


def test_relative_paths_are_relative_to_the_file(pki, tmp_path):
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.cert.parent / name, tmp_path / name)
    config = write(tmp_path / "web.yml",
                   "tls_server_config: {cert_file: server.crt, key_file: server.key}\n")
    with serving(web_config=str(config)) as (running, _):
        assert fetch(running.port, context=client_context(pki)) == 200


def test_allowed_security_headers_are_sent(tmp_path):
    config = write(tmp_path / "web.yml", "http_server_config:\n  http2: false\n  headers:\n"
                   "    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=3600\n")
    with serving(web_config=str(config)) as (running, _):
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        connection.close()
    assert response.getheader("X-Frame-Options") == "deny"
    assert response.getheader("Strict-Transport-Security") == "max-age=3600"


def test_an_empty_file_is_plain_http_without_auth(tmp_path):
    config = write(tmp_path / "web.yml", "")
    with serving(web_config=str(config)) as (running, _):
        assert fetch(running.port) == 200


def bad_configs(pki: Pki, tmp_path: Path) -> dict[str, str]:
    unreadable = tmp_path / "secret.key"
    unreadable.write_text("not a key")
    return {
        "bad yaml": "basic_auth_users: [\n",
        "not a mapping": "- a\n- b\n",
        "unknown key": "tls_config: {}\n",
        "unknown tls key": tls_section(pki, "  cert_fil: x\n"),
        "cipher suites": tls_section(pki, "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n"),
        "rate limit": "rate_limit: {interval: 1s, burst: 5}\n",
        "missing key_file": f"tls_server_config:\n  cert_file: {pki.cert}\n",
        "missing cert": f"tls_server_config:\n  cert_file: {tmp_path}/nope.crt\n"
                        f"  key_file: {pki.key}\n",
        "key does not match": f"tls_server_config:\n  cert_file: {pki.cert}\n"
                              f"  key_file: {pki.client_key}\n",
        "garbage key": f"tls_server_config:\n  cert_file: {pki.cert}\n"
                       f"  key_file: {unreadable}\n",
        "ca without client auth": tls_section(pki, f"  client_ca_file: {pki.ca}\n"),
        "verify without ca": tls_section(pki, "  client_auth_type: RequireAndVerifyClientCert\n"),
        "unverified client cert": tls_section(pki, "  client_auth_type: RequireAnyClientCert\n"
                                              f"  client_ca_file: {pki.ca}\n"),
        "unknown client auth": tls_section(pki, "  client_auth_type: Sometimes\n"),
        "bad min version": tls_section(pki, "  min_version: SSL3\n"),
        "sans without client certs": tls_section(pki, "  client_allowed_sans: [a]\n"),
        "plain password": "basic_auth_users:\n  alice: hunter2\n",
        "user with colon": f"basic_auth_users:\n  'a:b': '{HASH}'\n",
        "header not allowed": "http_server_config:\n  headers: {Set-Cookie: a}\n",
        "header injection": "http_server_config:\n  headers: {X-Frame-Options: \"a\\r\\nX: y\"}\n",
        "http2 not bool": "http_server_config: {http2: maybe}\n",
    }


@pytest.mark.parametrize("case", [
    "bad yaml", "not a mapping", "unknown key", "unknown tls key", "cipher suites",
    "rate limit", "missing key_file", "missing cert", "key does not match", "garbage key",
    "ca without client auth", "verify without ca", "unverified client cert",
    "unknown client auth", "bad min version", "sans without client certs", "plain password",
    "user with colon", "header not allowed", "header injection", "http2 not bool",
])
def test_invalid_files_are_config_errors_naming_the_flag(pki, tmp_path, case):
    config = write(tmp_path / "web.yml", bad_configs(pki, tmp_path)[case])
    with pytest.raises(ConfigError) as raised:
        load_web_config(str(config))
    assert raised.value.key == "--web.config.file"
    assert str(config) in str(raised.value)


def test_unreadable_or_missing_file_is_a_config_error(tmp_path):
    for path in (tmp_path / "missing.yml", tmp_path):
        with pytest.raises(ConfigError, match=r"--web\.config\.file: .*cannot read"):
            load_web_config(str(path))
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"--web\.config\.file"):
        load_web_config(str(binary))


def test_server_with_an_invalid_file_raises_and_frees_the_port(tmp_path):
    config = write(tmp_path / "web.yml", "basic_auth_users: {alice: nope}\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=r"--web\.config\.file"):
        MetricsServer("127.0.0.1", port, Published().latest, web_config=str(config))
    MetricsServer("127.0.0.1", port, Published().latest).stop()


def test_changes_are_picked_up_and_a_broken_change_keeps_the_old(tmp_path, caplog):
    config = write(tmp_path / "web.yml", "")
    with serving(web_config=str(config)) as (running, _):
        assert fetch(running.port) == 200
        write(config, f"basic_auth_users:\n  alice: '{HASH}'\n")
        assert wait_for(lambda: fetch(running.port) == 401)
        assert fetch(running.port, headers=auth("alice", PASSWORD)) == 200

        with caplog.at_level(logging.ERROR, "carbond.web.config"):
            write(config, "basic_auth_users: [broken\n")
            assert wait_for(lambda: fetch(running.port) == 401 and any(
                "keeping the previous" in r.getMessage() for r in caplog.records))
        assert fetch(running.port) == 401
        assert fetch(running.port, headers=auth("alice", PASSWORD)) == 200

        other = bcrypt.hashpw(b"new password", bcrypt.gensalt(rounds=4)).decode()
        write(config, f"basic_auth_users:\n  alice: '{other}'\n")
        assert wait_for(lambda: fetch(running.port, headers=auth("alice", PASSWORD)) == 401)
        assert fetch(running.port, headers=auth("alice", "new password")) == 200


def test_switching_to_tls_and_rotating_the_certificate(pki, tmp_path):
    config = write(tmp_path / "web.yml", "")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    with serving(web_config=str(config)) as (running, _):
        assert fetch(running.port) == 200
        write(config, f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n")

        def https_ok(context: ssl.SSLContext) -> bool:
            try:
                return fetch(running.port, context=context) == 200
            except (OSError, http.client.HTTPException):
                return False

        assert wait_for(lambda: https_ok(client_context(pki)))
        # A certificate from another CA replaces the file in place: clients trusting the
        # old CA fail from then on, which shows the new one is served.
        directory = tmp_path / "rotated"
        directory.mkdir()
        _ca(directory, "ca")
        _leaf(directory, "server", "IP:127.0.0.1")
        write(key, (directory / "server.key").read_text())
        write(cert, (directory / "server.crt").read_text())
        rotated = ssl.create_default_context(cafile=str(directory / "ca.crt"))
        assert wait_for(lambda: https_ok(rotated))
        assert not https_ok(client_context(pki))


def test_watcher_checks_at_most_once_per_interval(tmp_path):
    now = [0.0]
    config = write(tmp_path / "web.yml", "")
    watcher = WebConfigWatcher(str(config), check_seconds=1.0, clock=lambda: now[0])
    first = watcher.current()
    write(config, f"basic_auth_users:\n  alice: '{HASH}'\n")
    now[0] = 0.5
    assert watcher.current() is first
    now[0] = 1.5
    assert dict(watcher.current().users) == {"alice": HASH.encode()}


def test_real_prometheus_scrapes_over_tls_with_basic_auth(pki, tmp_path):
    config = write(tmp_path / "web.yml", tls_section(pki) +
                   f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    scrape = (f"    scheme: https\n    tls_config: {{ca_file: {pki.ca}}}\n"
              f"    basic_auth: {{username: prometheus, password: '{PASSWORD}'}}\n")
    with serving(web_config=str(config)) as (running, _), \
            real_prometheus(tmp_path, running.port, scrape) as query:
        assert wait_for(lambda: bool(query('up{job="carbond"} == 1')), timeout=60), \
            (tmp_path / "prometheus.log").read_text()[-2000:]
        assert query("carbond_build_info")
