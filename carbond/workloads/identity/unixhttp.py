"""One HTTP GET over a Unix socket with a total deadline and a size limit (the engine APIs).

`http.client` bounds each `recv` but not the whole answer, so a server that drips a byte a
second would hold a lookup forever; here every read waits at most until the call's deadline,
and the answer is cut off (an error) past `max_bytes`. Only GET, only the one path asked for:
a redirect or any status but 200 is an error, never followed.
"""

from __future__ import annotations

import http.client
import io
import socket
import time

from carbond.workloads.identity.errors import SourceError

_HEADER_END = b"\r\n\r\n"


class _Bytes:
    """What `http.client.HTTPResponse` reads from: the answer already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BytesIO:
        return io.BytesIO(self._data)


def _complete(data: bytes) -> bool:
    """True once the answer is whole by its own framing (Content-Length, or the last chunk),
    so a server that keeps the connection open after answering does not cost the deadline."""
    end = data.find(_HEADER_END)
    if end < 0:
        return False
    head, body = data[:end].lower(), data[end + len(_HEADER_END):]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                return False
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return False


def get(socket_path: str, target: str, timeout_seconds: float, max_bytes: int) -> bytes:
    """The body of `GET target` on the server at `socket_path`; SourceError otherwise."""
    deadline = time.monotonic() + timeout_seconds
    request = (f"GET {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: carbond\r\n"
               "Accept: application/json\r\nConnection: close\r\n\r\n").encode("ascii")
    data = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_seconds)
            sock.connect(socket_path)
            sock.sendall(request)
            while not _complete(data):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SourceError(f"no complete answer within {timeout_seconds:g}s")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > max_bytes:
                    raise SourceError(f"answer larger than {max_bytes} bytes")
    except FileNotFoundError:
        raise SourceError(f"no socket at {socket_path}") from None
    except TimeoutError:
        raise SourceError(f"no complete answer within {timeout_seconds:g}s") from None
    except OSError as exc:
        raise SourceError(f"{socket_path}: {exc.strerror or type(exc).__name__}") from None
    return _parse(bytes(data))


def _parse(data: bytes) -> bytes:
    response = http.client.HTTPResponse(_Bytes(data))  # type: ignore[arg-type]
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, ValueError) as exc:
        raise SourceError(f"not an HTTP answer ({type(exc).__name__})") from None
    if response.status != 200:
        raise SourceError(f"HTTP status {response.status}")
    return body
