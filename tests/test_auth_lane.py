"""Issue 21 item 4: failed logins must not starve good scrapes.

With every check on the server's 4 workers, 8 clients sending wrong passwords against a
cost-14 hash made an authenticated scrape wait 9.3 s. Now a cached success is answered on the
event loop, bcrypt runs on its own lane of 1 thread with 4 more waiting, and past that an
attempt is answered 429 at once with no hash. Saturation is made deterministic by cost: the
attackers' user has a cost-15 hash (about 2 s a check here), while every step of the test
takes milliseconds. No timing is asserted (benchmarks/auth.py measures it).
"""

from __future__ import annotations

import base64
import secrets
import select
import socket
from pathlib import Path

import bcrypt
import pytest

from carbond.web.auth import MAX_WAITING, BasicAuth
from tests.web_helpers import get, serving

ALICE_PASSWORD = "correct horse battery staple"
ALICE_HASH = bcrypt.hashpw(ALICE_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
HANG_SECONDS = 60.0  # a hang detector: nothing here should come near it


def slow_hash(cost: int) -> str:
    """A bcrypt hash of `cost` whose password nobody knows, made instantly (a cost-4 hash of
    random bytes relabelled: checking it takes the full cost)."""
    low = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=4)).decode()
    return low.replace("$04$", f"${cost:02d}$", 1)


def header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def request_bytes(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode())
    return b"GET /metrics HTTP/1.1\r\nAuthorization: Basic " + token + b"\r\n\r\n"


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def web_config(tmp_path: Path) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{ALICE_HASH}'\n"
                    f"  mallory: '{slow_hash(15)}'\n"
                    "http_server_config:\n  headers: {X-Frame-Options: deny}\n")
    return path


def attack(port: int, clients: int, user: str = "mallory") -> list[socket.socket]:
    """`clients` connections that each sent one wrong password, replies not read yet."""
    made = []
    for index in range(clients):
        sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS)
        sock.sendall(request_bytes(user, f"wrong-{index}"))
        made.append(sock)
    return made


def first_answers(socks: list[socket.socket], count: int) -> list[int]:
    """Statuses of the first `count` connections to answer."""
    statuses: list[int] = []
    waiting = list(socks)
    while len(statuses) < count:
        ready, _, _ = select.select(waiting, [], [], HANG_SECONDS)
        assert ready, f"only {len(statuses)} of {count} answers came"
        for sock in ready:
            statuses.append(status(sock.recv(65536)))
            waiting.remove(sock)
    return statuses


def test_a_cached_success_is_answered_while_the_hash_lane_is_full(web_config: Path) -> None:
    with serving(web_config=str(web_config)) as (running, _):
        assert get(running.port, headers=header("alice", ALICE_PASSWORD)).status == 200
        attackers = attack(running.port, 8)
        try:
            busy = first_answers(attackers, 8 - (1 + MAX_WAITING))
            assert busy == [429, 429, 429]  # past the lane's bound: at once, no hash
            reply = get(running.port, headers=header("alice", ALICE_PASSWORD),
                        timeout=HANG_SECONDS)
            assert reply.status == 200 and b"carbond_build_info" in reply.body
            # the lane is still full: the cached success did not wait for it
            late = attack(running.port, 1)
            assert first_answers(late, 1) == [429]
            # a right password not yet cached is an attempt like any other: 429 now
            uncached = get(running.port, headers=header("mallory", "maybe"),
                           timeout=HANG_SECONDS)
            assert uncached.status == 429 and uncached.header("Retry-After") == "1"
            assert uncached.header("X-Frame-Options") == "deny"
        finally:
            for sock in attackers:
                sock.close()


def test_unknown_users_take_the_same_lane_as_known_ones(web_config: Path) -> None:
    """An unknown user is checked against a dummy hash of the users' highest cost (15 here),
    so a flood of unknown names saturates the lane exactly as a known one does."""
    with serving(web_config=str(web_config)) as (running, _):
        attackers = attack(running.port, 8, user="nobody")
        try:
            assert first_answers(attackers, 3) == [429, 429, 429]
            assert get(running.port, headers=header("alice", ALICE_PASSWORD),
                       timeout=HANG_SECONDS).status == 429  # never cached, lane full
        finally:
            for sock in attackers:
                sock.close()


def test_the_dummy_hash_has_the_highest_configured_cost() -> None:
    auth = BasicAuth()
    try:
        users = {"a": ALICE_HASH.encode(), "b": slow_hash(12).encode()}
        dummy = auth.dummy_for(users)
        assert dummy.startswith(b"$2b$12$") and auth.dummy_for(users) is dummy
        assert auth.dummy_for({"a": ALICE_HASH.encode()}).startswith(b"$2b$04$")
        assert not bcrypt.checkpw(b"", auth.dummy_for({"a": ALICE_HASH.encode()}))
    finally:
        auth.close()


def test_failures_are_never_cached_and_successes_are_per_password(web_config: Path) -> None:
    with serving(web_config=str(web_config)) as (running, _):
        for _ in range(3):
            assert get(running.port, headers=header("alice", "nope")).status == 401
        assert get(running.port, headers=header("alice", ALICE_PASSWORD)).status == 200
        assert get(running.port, headers=header("alice", ALICE_PASSWORD + "x")).status == 401
        assert get(running.port, headers=header("bob", ALICE_PASSWORD)).status == 401
        reply = get(running.port)
        assert reply.status == 401 and reply.header("WWW-Authenticate") == 'Basic realm="carbond"'
        assert reply.header("X-Frame-Options") == "deny"
