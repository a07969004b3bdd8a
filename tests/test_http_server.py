"""The scrape server on real sockets: keep-alive, HEAD, gzip, errors, timeouts, slow clients."""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import logging
import re
import socket
import struct
import threading

import pytest

from carbond.exporter.app import MetricsServer
from carbond.exporter.snapshot import Snapshot
from tests.snapshots import make_snapshot
from tests.web_helpers import (
    Published,
    get,
    raw_exchange,
    read_until_closed,
    real_prometheus,
    serving,
    wait_for,
)


@pytest.fixture(scope="module")
def server():
    with serving() as (running, published):
        yield running, published


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response.split(b" ", 2)[1])


def statuses(response: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]


def test_keep_alive_serves_several_requests_on_one_connection(server):
    running, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        first = connection.getresponse()
        first.read()
        sock = connection.sock
        for path in ("/", "/api/v1/consumers", "/metrics"):
            connection.request("GET", path)
            reply = connection.getresponse()
            assert reply.status == 200 and reply.read()
            assert connection.sock is sock, "the connection was not kept"
        assert first.getheader("Connection") == "keep-alive"
    finally:
        connection.close()


def test_http10_without_keep_alive_is_closed_after_the_reply(server):
    running, _ = server
    response = raw_exchange(running.port, b"GET / HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200
    assert b"Connection: close" in response


def test_connection_close_is_honoured(server):
    running, _ = server
    response = raw_exchange(running.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200 and response.endswith(b"</html>\n")


def test_pipelined_requests_are_answered_in_order(server):
    running, _ = server
    data = (b"GET /api/v1/budgets HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    response = raw_exchange(running.port, data)
    assert statuses(response) == [200, 404, 200]


def test_head_has_the_get_headers_and_no_body(server):
    running, published = server
    published.snapshot = make_snapshot(5)
    for path in ("/metrics", "/", "/api/v1/consumers"):
        head = get(running.port, path, method="HEAD")
        body = get(running.port, path).body
        assert head.status == 200 and head.body == b""
        if path != "/metrics":  # the live process_* values may change the length
            assert int(head.header("Content-Length")) == len(body)


def test_unknown_path_is_404_and_other_methods_405(server):
    running, _ = server
    assert get(running.port, "/metricsx").status == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        reply = get(running.port, "/metrics", method=method)
        assert reply.status == 405, method
        assert reply.header("Allow") == "GET, HEAD"


def test_a_small_body_on_a_request_is_read_and_ignored(server):
    running, _ = server
    response = raw_exchange(
        running.port,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    assert statuses(response) == [405, 200]


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics FTP/1.0\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 20000, 431),
    (b"\xff\xfe\x00 \x01 \x02\r\n\r\n", 400),
])
def test_malformed_requests_get_an_error_and_a_close(server, request_bytes, status):
    running, _ = server
    response = raw_exchange(running.port, request_bytes)
    assert status_of(response) == status
    assert b"Connection: close" in response
    assert get(running.port, "/").status == 200


@pytest.mark.parametrize(("accept_encoding", "zipped"), [
    ("gzip", True), ("deflate, gzip;q=0.5", True), ("*", True), ("br", False),
    ("gzip;q=0", False), ("", False), ("gzip;q=nan", False), ("x-gzip", True),
])
def test_gzip_only_when_the_client_accepts_it(server, accept_encoding, zipped):
    running, _ = server
    reply = get(running.port, headers={"Accept-Encoding": accept_encoding})
    assert (reply.header("Content-Encoding") == "gzip") is zipped
    body = gzip.decompress(reply.body) if zipped else reply.body
    assert b"carbond_build_info" in body
    assert reply.header("Vary") == "Accept-Encoding"


def test_an_exception_in_rendering_is_logged_and_answered_500(caplog):
    published = Published(Snapshot(devices=("not a device",)))  # type: ignore[arg-type]
    with serving(published) as (running, _), caplog.at_level(logging.ERROR, "carbond.web.server"):
        assert get(running.port).status == 500
        assert get(running.port).status == 500  # the worker survived
        published.snapshot = make_snapshot(1)
        assert get(running.port).status == 200
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failures and failures[0].exc_info is not None
    assert "/metrics" in failures[0].getMessage()


def test_a_client_that_leaves_early_is_one_debug_line(caplog):
    published = Published(make_snapshot(500))
    with caplog.at_level(logging.DEBUG, "carbond"), serving(published) as (running, _):
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", running.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, with the reply still being written
        assert get(running.port).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
    assert any("went away" in r.getMessage() for r in caplog.records)


def test_header_timeout_closes_a_slow_client(caplog):
    with serving(header_timeout_seconds=0.3) as (running, _), \
            caplog.at_level(logging.DEBUG, "carbond.web.server"), \
            socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        assert read_until_closed(sock, timeout=10) == b""
    assert any("no complete request header" in r.getMessage() for r in caplog.records)


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout():
    with serving(idle_timeout_seconds=0.3) as (running, _), \
            socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        response = read_until_closed(sock, timeout=10)
    assert status_of(response) == 200 and b"Connection: keep-alive" in response


@pytest.mark.parametrize("request_bytes", [
    b"GET /metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
])
def test_a_client_that_never_reads_the_reply_is_dropped(caplog, request_bytes):
    # Larger than what the kernel buffers on loopback (tcp_wmem up to 4 MiB), so the rest
    # waits in carbond until the write timeout.
    published = Published(make_snapshot(8000))
    with caplog.at_level(logging.DEBUG, "carbond.web.server"), \
            serving(published, write_timeout_seconds=0.3) as (running, _):
        size = int(get(running.port, method="HEAD").header("Content-Length"))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port))
        with sock:
            sock.sendall(request_bytes)
            assert wait_for(lambda: any("stopped reading" in r.getMessage()
                                        for r in caplog.records), timeout=30)
            assert len(read_until_closed(sock, timeout=30)) < size


def test_a_client_that_half_closes_after_its_request_gets_the_reply(server):
    running, _ = server
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/budgets HTTP/1.1\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        response = read_until_closed(sock, timeout=10)
    assert status_of(response) == 200 and response.endswith(b"]}\n")


def test_slow_clients_take_no_threads_and_do_not_block_scrapes():
    with serving(published=Published(make_snapshot(100))) as (running, _):
        get(running.port)
        threads_before = threading.active_count()
        slow = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                slow.append(sock)
            for _ in range(20):
                assert get(running.port).status == 200
            assert threading.active_count() <= threads_before + 4  # the worker pool, at most
        finally:
            for sock in slow:
                sock.close()


def test_beyond_max_connections_the_oldest_waiting_one_makes_room():
    with serving(max_connections=5) as (running, _):
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=10)
                for _ in range(5)]
        try:
            assert get(running.port).status == 200
            assert read_until_closed(idle[0], timeout=10) == b""
        finally:
            for sock in idle:
                sock.close()


def test_the_backlog_holds_many_connections_before_the_server_accepts():
    published = Published(make_snapshot(1))
    server = MetricsServer("127.0.0.1", 0, published.latest)
    waiting = []
    try:
        for _ in range(300):  # with a backlog of 5 most of these connects would time out
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            waiting.append(sock)
        server.start()
        replies = [read_until_closed(sock, timeout=30) for sock in waiting]
        assert all(status_of(reply) == 200 for reply in replies)
    finally:
        for sock in waiting:
            sock.close()
        server.stop()


def test_stop_closes_the_port_and_open_connections():
    with serving() as (running, _):
        port = running.port
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert status_of(sock.recv(65536)) == 200
    read_until_closed(sock, timeout=10)  # returns at EOF; a connection left open times out
    sock.close()
    again = MetricsServer("127.0.0.1", port, Published().latest)  # as a restart would
    again.stop()


def test_a_port_in_use_raises_oserror():
    with serving() as (running, _), pytest.raises(OSError):
        MetricsServer("127.0.0.1", running.port, Published().latest)


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = MetricsServer("::1", 0, Published().latest)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    server.start()
    try:
        connection = http.client.HTTPConnection("::1", server.port, timeout=10)
        connection.request("GET", "/metrics")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        server.stop()


def test_many_concurrent_scrapes_all_succeed():
    published = Published(make_snapshot(200))
    results: list[int] = []
    lock = threading.Lock()

    def scrape(port: int) -> None:
        status = get(port, headers={"Accept-Encoding": "gzip"}, timeout=60).status
        with lock:
            results.append(status)

    with serving(published) as (running, _):
        threads = [threading.Thread(target=scrape, args=(running.port,)) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == [200] * 100


def test_request_target_in_absolute_form(server):
    running, _ = server
    response = raw_exchange(running.port,
                            b"GET http://example/metrics?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200 and b"carbond_build_info" in response


def test_snapshot_swap_during_scrapes_never_mixes_ticks(server):
    """Concurrent first scrapes of a new tick all see one consistent snapshot."""
    running, published = server
    seen: list[float] = []
    lock = threading.Lock()

    def scrape() -> None:
        text = get(running.port).body.decode()
        stamp = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("carbond_last_tick_timestamp_seconds "))
        emitted = next(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("carbond_host_emissions_grams_total "))
        with lock:
            seen.append(emitted / 7.5 - (stamp - 1_700_000_100.0))

    for tick in range(10, 14):
        published.snapshot = dataclasses.replace(make_snapshot(20, tick=tick))
        threads = [threading.Thread(target=scrape) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(seen) == 32 and all(abs(x) < 1e-9 for x in seen)


def test_real_prometheus_scrapes_openmetrics_gzip_and_odd_names(tmp_path):
    published = Published(make_snapshot(500))
    with serving(published) as (running, _), \
            real_prometheus(tmp_path, running.port) as query:
        assert wait_for(lambda: bool(query('up{job="carbond"} == 1')), timeout=60), \
            (tmp_path / "prometheus.log").read_text()[-2000:]
        odd = query('carbond_consumer_emissions_grams_total{consumer="bad\\\\xff.service"}')
        assert len(odd) == 1 and odd[0]["metric"]["kind"] == "unit"
        series = query("count(carbond_consumer_energy_joules_total)")
        assert float(series[0]["value"][1]) == 3 * 503
        assert query("process_cpu_seconds_total") and query("python_info")
