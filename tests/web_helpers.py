"""A MetricsServer on 127.0.0.1 over a snapshot the test sets, and a plain HTTP client."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from carbond.exporter.app import MetricsServer
from carbond.exporter.snapshot import Snapshot
from tests.helpers import wait_for
from tests.snapshots import make_snapshot


@dataclass
class Published:
    """What the daemon would publish: the test swaps `snapshot` as a tick would."""

    snapshot: Snapshot = field(default_factory=make_snapshot)

    def latest(self) -> Snapshot:
        return self.snapshot


@contextlib.contextmanager
def serving(published: Published | None = None, **options: Any) -> Iterator[
        tuple[MetricsServer, Published]]:
    published = published or Published()
    server = MetricsServer("127.0.0.1", 0, published.latest, **options)
    server.start()
    try:
        yield server, published
    finally:
        server.stop()


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


def get(port: int, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; everything the server says until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock, timeout)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def real_prometheus(directory: Path, target_port: int, extra: str = "") -> Iterator[
        Callable[[str], list[dict[str, Any]]]]:
    """The real Prometheus binary scraping 127.0.0.1:target_port every second; yields a
    function that runs an instant query. `extra` is more YAML for the scrape job."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/test-deps.sh installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = directory / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: carbond\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n" + extra
    )
    url = f"http://127.0.0.1:{port}"
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(promql: str) -> list[dict[str, Any]]:
            arguments = urllib.parse.urlencode({"query": promql})
            with urllib.request.urlopen(f"{url}/api/v1/query?{arguments}", timeout=10) as reply:
                return json.load(reply)["data"]["result"]

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return process.poll() is not None

        assert wait_for(ready, timeout=60) and process.poll() is None, \
            (directory / "prometheus.log").read_text()[-2000:]
        yield query
    finally:
        process.kill()
        process.wait()
