"""The exec socket's wire format: one JSON object per line each way, ASCII only.

Project names may hold any bytes: a client sends `os.fsdecode` of them, which JSON carries as
``\\udcXX`` escapes and the daemon turns back into the same bytes. A request is at most
`MAX_REQUEST_BYTES` and must arrive whole within `REQUEST_SECONDS` of the connection, so a
client that never finishes holds one handler for a bounded time.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 1 << 20
REQUEST_SECONDS = 5.0
DEFAULT_SOCKET = "/run/carbond/exec.sock"


class ProtocolError(Exception):
    """The other side sent something that is not one request/reply; the message says what."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def read_message(sock: socket.socket, limit: int, seconds: float) -> dict[str, Any]:
    """One line, within `limit` bytes and `seconds` in all (not per read), as a JSON object."""
    deadline = time.monotonic() + seconds
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(f"no whole message within {seconds:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(65536, limit + 1 - len(data)))
        except TimeoutError:
            raise ProtocolError(f"no whole message within {seconds:g}s") from None
        if not chunk:
            raise ProtocolError("connection closed before a whole message")
        data += chunk
        if len(data) > limit and b"\n" not in data[:limit + 1]:
            raise ProtocolError(f"message longer than {limit} bytes")
    line = data.split(b"\n", 1)[0]
    try:
        message = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("not a JSON object in ASCII") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message
