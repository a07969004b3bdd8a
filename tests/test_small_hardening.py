"""Issue 21 item 12: a bare-LF request and an HTTP/0.9 request are answered at once (as Go's
net/http answers them) instead of after the header timeout; `limit: 1e308t` is refused like
`1e309g`; `min_version: TLS10` is refused at load rather than accepted and not honoured."""

from __future__ import annotations

import socket

import pytest

from carbond.config import read_file
from carbond.config.units import parse_grams, parse_seconds
from carbond.types import ConfigError
from carbond.web.config import load_web_config
from tests.web_helpers import get, read_until_closed, serving

# Long enough that an answer can only come from the request itself, not from the timeout.
HEADER_TIMEOUT_SECONDS = 120.0
ANSWER_WITHIN_SECONDS = 30.0  # a hang detector, not a speed check


@pytest.fixture(scope="module")
def server():
    with serving(header_timeout_seconds=HEADER_TIMEOUT_SECONDS) as (running, _):
        yield running


def first_answer(port: int, data: bytes) -> bytes:
    """What the server says to `data` while the connection stays open from our side."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN_SECONDS) as sock:
        sock.sendall(data)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)  # socket.timeout here: no answer until the timeout
            if not chunk:
                break
            head += chunk
        return head


@pytest.mark.parametrize("request_bytes", [
    b"GET /metrics HTTP/1.1\n\n",
    b"GET /metrics HTTP/1.1\nHost: x\nAccept: */*\n\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n",
])
def test_a_bare_lf_request_is_answered_at_once(server, request_bytes: bytes) -> None:
    answer = first_answer(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_bare_lf_keep_alive_requests_follow_each_other(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port),
                                  timeout=ANSWER_WITHIN_SECONDS) as sock:
        sock.sendall(b"GET / HTTP/1.1\n\nGET / HTTP/1.1\nConnection: close\n\n")
        answer = read_until_closed(sock, ANSWER_WITHIN_SECONDS)
    assert answer.count(b"HTTP/1.1 200 ") == 2


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /\r\n", 400),  # HTTP/0.9: a request line with no version
    (b"GET /\n", 400),
    (b"GET /metrics HTTP/0.9\r\n", 505),
    (b"GARBAGE\r\n", 400),
])
def test_a_bad_request_line_is_answered_before_any_header(server, request_bytes: bytes,
                                                          status: int) -> None:
    answer = first_answer(server.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Connection: close" in answer
    assert get(server.port, "/").status == 200


@pytest.mark.parametrize("text", ["1e308t", "1e306t", "1e306kg", "1e309g", "1e400"])
def test_a_mass_that_overflows_once_scaled_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"too large|must be positive"):
        parse_grams(text)


def test_a_duration_that_overflows_once_scaled_is_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_seconds("1e307d")


def test_an_overflowing_budget_limit_names_the_key(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("budgets: [{name: a, limit: 1e308t}]\n")
    with pytest.raises(ConfigError) as info:
        read_file(str(config))
    assert info.value.key == "budgets[0].limit" and "too large" in info.value.problem


def test_the_largest_finite_limits_still_load() -> None:
    assert parse_grams("1e302t") == pytest.approx(1e308)


@pytest.mark.parametrize(("key", "version"), [("min_version", "TLS10"),
                                              ("min_version", "TLS11"),
                                              ("max_version", "TLS11")])
def test_tls_1_0_and_1_1_are_refused_at_load(tmp_path, key: str, version: str) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n"
                   f"  {key}: {version}\n")
    with pytest.raises(ConfigError) as info:
        load_web_config(str(web))
    assert f"{key}: {version} is not supported" in str(info.value)
    assert "TLS12" in str(info.value)
