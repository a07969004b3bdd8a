"""HTTP/1.x on the wire: the request and response types, strict request-head parsing and
the response head, apart from the connection handling in carbond.web.server.

Strict where leniency lets requests be smuggled; pure functions over bytes and strings, so they
are tested and fuzzed without a socket.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from carbond import __version__

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # a GET with a body is odd; read and ignore a small one
METHODS = ("GET", "HEAD")
SERVER = f"carbond/{__version__}"
PLAIN = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str  # HTTP/1.0 or HTTP/1.1
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ", "
    peer: str = ""

    @property
    def path(self) -> str:
        if self.target.startswith("/"):
            return self.target.split("?", 1)[0]
        return urlsplit(self.target).path or "/"

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    gzip: bool = False  # the body is gzip-encoded
    headers: tuple[tuple[str, str], ...] = ()


App = Callable[[Request], Response]


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (q-values honoured, `*` counts)."""
    gzip_q: float | None = None
    star_q: float | None = None
    for part in accept_encoding.split(","):
        coding, _, params = part.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            gzip_q = q
        elif coding == "*":
            star_q = q
    chosen = gzip_q if gzip_q is not None else star_q
    return chosen is not None and chosen > 0  # NaN is not > 0



class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


# The end of a request header: an empty line, each line ending in LF with an optional CR before
# it, as Go's net/http reads them (a hand-typed `GET / HTTP/1.1\n\n` is answered).
HEAD_END = re.compile(rb"\r?\n\r?\n")


def request_line(line: str) -> tuple[str, str, str]:
    """(method, target, version) of a request line without its line end; BadRequest when it
    is not one, so a bad line (HTTP/0.9's `GET /`) is answered as soon as it is complete."""
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not set(method) <= TOKEN:
        raise BadRequest(400, "malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        if version.startswith("HTTP/"):
            raise BadRequest(505, "HTTP version not supported")
        raise BadRequest(400, "malformed version")
    return method, target, version


def parse_head(head: bytes, peer: str = "") -> tuple[Request, int]:
    """The request line and headers (without the blank line) -> (request, body length).

    Strict where leniency lets requests be smuggled: no folded lines, no space before a
    colon, one Content-Length, no Transfer-Encoding.
    """
    text = head.decode("latin-1")
    lines = text.split("\n")
    method, target, version = request_line(lines[0].removesuffix("\r"))
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.removesuffix("\r")
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name) <= TOKEN:
            raise BadRequest(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise BadRequest(501, "request bodies are not supported")
    length = 0
    if "content-length" in headers:
        text_length = headers["content-length"]
        if not text_length.isdigit() or not text_length.isascii():
            raise BadRequest(400, "bad Content-Length")
        length = int(text_length)
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, "request body too large")
    return Request(method, target, version, headers, peer), length


def wants_keep_alive(request: Request) -> bool:
    tokens = {t.strip().lower() for t in request.header("connection").split(",")}
    if request.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def render_head(response: Response, *, keep_alive: bool, length: int) -> bytes:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Server: {SERVER}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {length}",
    ]
    if response.gzip:
        lines.append("Content-Encoding: gzip")
    if response.status == 200:
        lines.append("Vary: Accept-Encoding")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(status: int, text: str = "") -> Response:
    body = (text or HTTPStatus(status).phrase).encode() + b"\n"
    return Response(status, PLAIN, body)


def unauthorized() -> Response:
    return Response(401, PLAIN, b"Unauthorized\n",
                    headers=(("WWW-Authenticate", 'Basic realm="carbond"'),))


def busy() -> Response:
    """Every bcrypt slot is taken by attempts not known good: no hash for this one."""
    return Response(429, PLAIN, b"Too Many Requests\n", headers=(("Retry-After", "1"),))
