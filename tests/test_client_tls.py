"""`top --once` and `exec` against a real `carbond run` behind TLS and basic auth
(`--web.config.file`), through the commands' one client (`--http.config.file`, Prometheus's
http_config format): a certificate authority and server certificate made here with openssl,
a bcrypt user; both commands reach the daemon with the right file, and with wrong credentials
or no CA they say so in one line (top: exit 1, as for no daemon; exec: runs the command and
measures on its own, as docs/exec.md says)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.cgroup_helpers import UNIFIED, available
from tests.helpers import free_port
from tests.powercap import ConstantPower

PASSWORD = "tls and auth for top and exec"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl needed")


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True,
                   timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, and server.crt/server.key for 127.0.0.1 signed by it."""
    directory = tmp_path_factory.mktemp("client-pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(directory, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=carbond test CA")
    _openssl(directory, "req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=carbond")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2",
             "-extfile", "server.ext")
    return directory


def client_file(path: Path, *, ca: Path | None, password: str) -> Path:
    lines = ["basic_auth:", "  username: alice", f"  password: {json.dumps(password)}",
             "tls_config:"]
    lines += [f"  ca_file: {ca}"] if ca is not None else ["  server_name: 127.0.0.1"]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    def __init__(self, process: subprocess.Popen[str], port: int, ca: Path) -> None:
        self.process, self.port, self.ca = process, port, ca

    def get(self, path: str, password: str = PASSWORD) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.ca))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                                 context=context)
        token = base64.b64encode(f"alice:{password}".encode()).decode()
        try:
            connection.request("GET", path, headers={"Authorization": f"Basic {token}"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def ticks(self) -> float:
        _, body = self.get("/metrics")
        return sum(float(line.split()[-1]) for line in body.decode().splitlines()
                   if line.startswith("carbond_tick_duration_seconds_count"))


@contextlib.contextmanager
def tls_daemon(pki: Path, tmp_path: Path, *extra: str) -> Iterator[Daemon]:
    """`carbond run` serving HTTPS with basic auth; ready once an authenticated scrape
    answers."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n"
                   f"  key_file: {pki / 'server.key'}\nbasic_auth_users:\n  alice: {hashed}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "carbond", "run", "--listen", f"127.0.0.1:{port}",
         "--web.config.file", str(web), "--interval", "1s", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon = Daemon(process, port, pki / "ca.crt")
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"carbond exited: {process.stderr and process.stderr.read()}")
            with contextlib.suppress(OSError):
                if daemon.get("/metrics")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the daemon never answered over TLS"
            time.sleep(0.1)
        yield daemon
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def carbond(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_top_once_through_tls_and_basic_auth(pki: Path, tmp_path: Path) -> None:
    powercap = tmp_path / "powercap"
    with ConstantPower(str(powercap)), tls_daemon(pki, tmp_path, "--powercap-root",
                                                  str(powercap)) as daemon:
        good = client_file(tmp_path / "good.yml", ca=pki / "ca.crt", password=PASSWORD)
        wrong = client_file(tmp_path / "wrong.yml", ca=pki / "ca.crt", password="guess")
        no_ca = client_file(tmp_path / "no-ca.yml", ca=None, password=PASSWORD)
        where = ("--listen", f"127.0.0.1:{daemon.port}")
        deadline = time.monotonic() + 30
        while daemon.ticks() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = carbond("top", "--once", *where, "--http.config.file", str(good))
        refused = carbond("top", "--once", *where, "--http.config.file", str(wrong))
        untrusted = carbond("top", "--once", *where, "--http.config.file", str(no_ca))
        plain = carbond("top", "--once", *where)
    assert result.returncode == 0, result.stderr
    assert "CONSUMER" in result.stdout and f"127.0.0.1:{daemon.port}" in result.stdout
    for failed, why in ((refused, "401"), (untrusted, "certificate"), (plain, "")):
        assert failed.returncode == 1, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("carbond: error: "), failed.stderr
        assert why in lines[0], lines[0]
        assert PASSWORD not in failed.stderr and "guess" not in failed.stderr


def test_exec_through_tls_and_basic_auth(pki: Path, tmp_path: Path) -> None:
    """The run is the daemon's project consumer when the client file is right; with a wrong
    password exec still runs the command, measures on its own and notes why in one line."""
    why = available("v2")
    if why:
        pytest.skip(why)
    powercap = tmp_path / "powercap"
    project = f"tls-{os.getpid()}"
    common = ["--powercap-root", str(powercap), "--cgroup-root", UNIFIED]
    with ConstantPower(str(powercap)), tls_daemon(pki, tmp_path, *common, "--state-dir",
                                                  str(tmp_path / "state")) as daemon:
        where = ["--listen", f"127.0.0.1:{daemon.port}", *common,
                 "--state-dir", str(tmp_path / "exec-state")]
        good = client_file(tmp_path / "good.yml", ca=pki / "ca.crt", password=PASSWORD)
        wrong = client_file(tmp_path / "wrong.yml", ca=pki / "ca.crt", password="guess")
        command = ["--", "sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"]
        result = carbond("exec", "--json", "--project", project, *where,
                         "--http.config.file", str(good), *command)
        refused = carbond("exec", "--json", "--project", project + "-alone", *where,
                          "--http.config.file", str(wrong), *command)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stderr.strip().splitlines()[-1])
    assert run["measured_by"] == "daemon", run["notes"]
    assert run["energy_joules"]["total"] > 0
    assert refused.returncode == 0, refused.stderr
    alone = json.loads(refused.stderr.strip().splitlines()[-1])
    assert alone["measured_by"] == "exec"
    assert alone["energy_joules"]["total"] > 0
    assert "guess" not in refused.stderr and PASSWORD not in result.stderr
