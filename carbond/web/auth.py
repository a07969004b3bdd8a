"""Basic auth for the scrape server: cached successes at once, bcrypt on its own bounded lane.

Why: with every request checked on the server's 4 workers, 8 clients sending wrong passwords
against a cost-14 hash kept them all in bcrypt, and an authenticated scrape waited 9.3 s
(median) behind them; the answer time also told which users exist. Here:

- a (user, password, hash) that verified before is answered from a cache, on the event loop,
  without touching bcrypt (the key is SHA-256 over a per-process random salt, the user, the
  password and the hash, so a changed hash or password is checked anew, and the cache holds no
  password nor an unsalted digest of one);
- any other attempt is one bcrypt check on a separate executor of `hash_workers` threads with
  at most `max_waiting` more waiting; beyond that it is answered 429 at once, with no hash, so
  failed attempts cannot pile up (exporter-toolkit serialises its checks the same way);
- an unknown user is checked against a dummy hash of the configured users' highest cost, so it
  takes as long as a known one.
Failures are not cached: each one costs the caller a full bcrypt check.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping

import bcrypt

CACHE_SIZE = 256
HASH_WORKERS = 1
MAX_WAITING = 4
_COST = re.compile(rb"^\$2[abxy]?\$(\d\d)\$")


def basic_credentials(header: str) -> tuple[str, bytes] | None:
    """(user, password) from an `Authorization: Basic …` value; None when absent or garbled."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
        user_bytes, sep, password = decoded.partition(b":")
        user = user_bytes.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (user, password) if sep else None


def _cost(hashed: bytes) -> int:
    found = _COST.match(hashed)
    return int(found.group(1)) if found else 10


def _dummy_hash(cost: int) -> bytes:
    """A hash that takes `cost` to check and matches no password: a real cost-4 hash of random
    bytes (a valid salt) relabelled with `cost`, so making it is instant."""
    low = bcrypt.hashpw(secrets.token_bytes(32), bcrypt.gensalt(rounds=4))
    return low.replace(b"$04$", f"${cost:02d}$".encode(), 1)


class BasicAuth:
    """Checks `Authorization` headers against a web config's users; see the module docstring.
    `check` is cheap and never blocks: call it where requests arrive."""

    def __init__(self, *, hash_workers: int = HASH_WORKERS, max_waiting: int = MAX_WAITING,
                 cache_size: int = CACHE_SIZE) -> None:
        self._salt = os.urandom(32)
        self._cache_size = cache_size
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = hash_workers + max_waiting
        self._in_flight = 0  # checks running or waiting
        self._dummies: dict[int, bytes] = {}
        self.refused_busy = 0  # attempts answered 429 without a check
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=hash_workers, thread_name_prefix="carbond-auth")

    def dummy_for(self, users: Mapping[str, bytes]) -> bytes:
        """The hash an unknown user is checked against: the highest cost among `users`."""
        cost = max((_cost(hashed) for hashed in users.values()), default=10)
        with self._lock:
            dummy = self._dummies.get(cost)
            if dummy is None:
                dummy = self._dummies[cost] = _dummy_hash(cost)
            return dummy

    def check(self, users: Mapping[str, bytes], authorization: str
              ) -> bool | concurrent.futures.Future[bool] | None:
        """True: a cached success. False: no usable credentials. None: the hash lane is full
        (answer 429). Else a future of the bcrypt verdict."""
        credentials = basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = users.get(user)
        checked = hashed if hashed is not None else self.dummy_for(users)
        key = hashlib.sha256(b"\0".join((self._salt, user.encode(), password, checked)))
        digest = key.digest()
        with self._lock:
            if hashed is not None and digest in self._good:
                self._good.move_to_end(digest)
                return True
            if self._in_flight >= self._capacity:
                self.refused_busy += 1
                return None
            self._in_flight += 1
        try:
            future = self._executor.submit(self._verify, password, checked,
                                           digest if hashed is not None else None)
        except RuntimeError:  # shut down: the server is stopping
            with self._lock:
                self._in_flight -= 1
            return None
        future.add_done_callback(self._done)
        return future

    def _verify(self, password: bytes, hashed: bytes, remember: bytes | None) -> bool:
        try:
            good = bcrypt.checkpw(password, hashed)
        except ValueError:  # e.g. a password over bcrypt's 72 bytes
            good = False
        if good and remember is not None:
            with self._lock:
                self._good[remember] = None
                while len(self._good) > self._cache_size:
                    self._good.popitem(last=False)
        return good and remember is not None

    def _done(self, _future: concurrent.futures.Future[bool]) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        """Drop waiting checks; a running one finishes in its thread (bcrypt cannot stop)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
