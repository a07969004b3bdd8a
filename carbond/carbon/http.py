"""The one place carbond touches the network: GET a URL (intensity providers), or POST and
DELETE (the Redfish meter's sessions), and get JSON or a FetchError.

Standard library only (urllib), so the agent has no HTTP dependency to patch on every server.
The opener is injectable: tests pass one without proxies, the daemon the default (which honours
the usual `https_proxy` / `no_proxy` environment). Either way HttpClient adds its own handlers
to it, so that every fetch has one total deadline and redirects come back to HttpClient, which
follows them only within the origin it was asked for.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import ipaddress
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from carbond import __version__
from carbond.carbon.intensity import FetchError

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 4 * 1024 * 1024  # a forecast is ~100 kB; anything far larger is not an answer
MAX_RETRY_AFTER_SECONDS = 86400.0
MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
# Before urllib's own handlers (500): our redirect and connection handlers answer first.
_HANDLER_ORDER = 400
# A host[:port] that urllib and urlsplit read alike: no userinfo (@), no backslash, no spaces.
_PLAIN_NETLOC = re.compile(r"[A-Za-z0-9._~%:\[\]-]+")


class HttpClient:
    """GET JSON within a deadline; every failure becomes a FetchError with a short reason.

    `timeout_seconds` bounds the whole fetch (connect, TLS, headers, body and any redirects),
    not each socket read: a server dripping one byte at a time cannot hold a fetch. Redirects
    are followed only within the origin of the URL asked for, so headers carrying credentials
    never reach another host. Error messages name the status and hosts only: never headers
    (which carry tokens) nor the body of the request.
    """

    def __init__(
        self,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        opener: urllib.request.OpenerDirector | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout_seconds = float(timeout_seconds)
        self.opener = opener or urllib.request.build_opener()
        _install_handlers(self.opener)
        self.clock = clock  # only for HTTP-date Retry-After

    def get_json(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", url, headers).json()

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> HttpAnswer:
        """One exchange within the deadline: a 2xx answer with its headers and body, else
        FetchError. Only a GET follows redirects (within its
        origin); a POST or DELETE that is redirected fails, its body is not sent again."""
        host = origin_text(url)
        with _Watchdog(self.timeout_seconds) as watchdog:
            target = url
            for _ in range(MAX_REDIRECTS + 1):
                answer = self._get_once(target, headers or {}, watchdog, host, method, body)
                if isinstance(answer, _Redirect):
                    refusal = redirect_refusal(url, answer.url)
                    if refusal is None and method != "GET":
                        refusal = f"a {method} is not redirected"
                    if refusal is not None:
                        raise FetchError(
                            "redirect",
                            f"{host} redirected to {origin_text(answer.url)} ({refusal}); "
                            "not followed",
                        )
                    target = answer.url
                    continue
                return answer
        raise FetchError("redirect", f"{host} redirected more than {MAX_REDIRECTS} times")

    def _get_once(
        self, url: str, headers: Mapping[str, str], watchdog: _Watchdog, host: str,
        method: str = "GET", data: bytes | None = None,
    ) -> HttpAnswer | _Redirect:
        """One request: its answer, or where it redirects to."""
        remaining = watchdog.remaining_seconds()
        if remaining <= 0:
            raise self._timeout(host)
        request = _WatchedRequest(url, watchdog, method, data)
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", f"carbond/{__version__}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in headers.items():
            request.add_header(name, value)
        try:
            with self.opener.open(request, timeout=remaining) as response:
                body = response.read(MAX_BODY_BYTES + 1)
                # read(n) returns short when the peer closes early; length says what is missing
                missing = getattr(response, "length", None)
                if isinstance(missing, int) and missing > 0 and len(body) <= MAX_BODY_BYTES:
                    raise http.client.IncompleteRead(body, missing)
                content_type = response.headers.get("Content-Type", "")
                status = int(getattr(response, "status", 200) or 200)
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            return self._http_error(exc, url, host)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # URLError and TimeoutError are OSErrors; IncompleteRead an HTTPException
            raise self._failure(exc, host, watchdog) from None
        if watchdog.expired:  # the body may be cut short where it has no length
            raise self._timeout(host)
        if len(body) > MAX_BODY_BYTES:
            raise FetchError("too_large", f"{host} sent more than {MAX_BODY_BYTES} bytes")
        return HttpAnswer(status, answer_headers, body, content_type)

    def _http_error(self, exc: urllib.error.HTTPError, url: str, host: str) -> _Redirect:
        status = exc.code
        headers = exc.headers
        location = headers.get("Location") if headers is not None else None
        retry_after = None
        if headers is not None:
            retry_after = parse_retry_after(headers.get("Retry-After"), self._now())
        exc.close()
        if status in REDIRECT_CODES and location:
            target = resolve_location(url, location)
            if target is None:
                raise FetchError("redirect", f"{host} redirected to an invalid URL")
            return _Redirect(target)
        reason = "rate_limited" if status == 429 else f"http_{status}"
        raise FetchError(reason, f"{host} answered {status}", retry_after)

    def _failure(self, exc: Exception, host: str, watchdog: _Watchdog) -> FetchError:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if watchdog.expired or isinstance(reason, TimeoutError):
            return self._timeout(host)
        if isinstance(exc, http.client.IncompleteRead):
            return FetchError("bad_json", f"{host} sent a truncated answer")
        if isinstance(exc, urllib.error.URLError):
            return FetchError("network", f"{host}: {_reason_text(exc.reason)}")
        return FetchError("network", f"{host}: {type(exc).__name__}")  # reset mid-body, ...

    def _timeout(self, host: str) -> FetchError:
        return FetchError("timeout", f"{host} did not answer in {self.timeout_seconds:g}s")

    def _now(self) -> float:
        return float(self.clock())


class HttpAnswer:
    """A successful answer: status, headers (names in lower case) and body."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes,
                 content_type: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.content_type = content_type

    def json(self) -> Any:
        """The body as JSON, or FetchError (see decode_json)."""
        return decode_json(self.body, self.content_type)


class _Redirect:
    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url


# ---------------------------------------------------------------- redirects


def redirect_refusal(configured_url: str, target_url: str) -> str | None:
    """Why a redirect to `target_url` must not be followed, or None when it may be.

    Decided before any connection to the target. Only the configured URL's origin (scheme,
    host, port) may be reached, since the request carries its credentials. Link-local
    addresses (cloud metadata services) never, loopback only where the configured URL is
    itself loopback (a local proxy, the tests' servers).
    """
    try:
        target = _origin(target_url)
        configured = _origin(configured_url)
    except ValueError:
        return "not a valid URL"
    scheme, host, _ = target
    if scheme not in DEFAULT_PORTS:
        return "not http(s)"
    if not host:
        return "no host"
    address = _address(host)
    if address is not None and address.is_link_local:
        return "link-local address"
    if _is_loopback(host, address) and not _is_loopback(configured[1], _address(configured[1])):
        return "loopback address"
    if target != configured:
        return "another origin"
    return None


def resolve_location(base_url: str, location: str) -> str | None:
    """A Location header (often relative) as an absolute URL, None when it cannot be one."""
    try:
        return urllib.parse.urljoin(base_url, location.strip())
    except ValueError:
        return None


def origin_text(url: str) -> str:
    """host:port of `url` for messages: never userinfo, path or query; odd bytes escaped."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "an invalid URL"
    text = f"[{host}]" if ":" in host else host
    if port is not None:
        text = f"{text}:{port}"
    text = text[:100]
    return text if text.isprintable() and text.isascii() else ascii(text)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; ValueError if malformed."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc and not _PLAIN_NETLOC.fullmatch(parts.netloc):
        raise ValueError("userinfo or unusual characters in the host")
    scheme = parts.scheme.lower()
    port = parts.port  # ValueError when not a number in 0..65535
    return scheme, parts.hostname or "", port if port is not None else DEFAULT_PORTS.get(scheme)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` names literally, in any form the resolver accepts, else None."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        # 2852039166, 0xa9.0xfe.0xa9.0xfe, 169.254.1: legacy IPv4 forms getaddrinfo takes
        if not host or not set(host) <= set("0123456789abcdefx."):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_loopback(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    # 0.0.0.0 and :: reach this host too
    return address is not None and (address.is_loopback or address.is_unspecified)


# ---------------------------------------------------------------- the deadline


class _Watchdog:
    """One fetch's total deadline. At expiry it shuts the fetch's sockets down, so a read
    blocked in any phase (connect, TLS, headers, body) returns at once; per-read socket
    timeouts alone let a server that drips a byte per read hold a fetch forever.

    It keeps a duplicate descriptor of each socket: TLS wrapping detaches the original socket
    object, but shutdown acts on the connection whichever descriptor names it, and a
    descriptor of our own cannot be closed and reused under us.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.name = "carbond-http-deadline"
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        with contextlib.suppress(RuntimeError):  # no thread to be had: per-read timeouts only
            self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    @property
    def expired(self) -> bool:
        with self._lock:
            return self._expired

    def remaining_seconds(self) -> float:
        return self._deadline - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        try:
            duplicate = sock.dup()
        except OSError:  # out of descriptors: the per-read timeout still bounds each read
            return
        with self._lock:
            if not self._expired:
                self._sockets.append(duplicate)
                return
        _shutdown(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the peer already closed it
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _WatchedRequest(urllib.request.Request):
    """A request that carries its fetch's watchdog to the connection handlers."""

    def __init__(self, url: str, watchdog: _Watchdog, method: str = "GET",
                 data: bytes | None = None) -> None:
        super().__init__(url, data=data, method=method)
        self.watchdog = watchdog


def _watched(http_class: Any, request: urllib.request.Request) -> Any:
    """`http_class`, whose sockets are handed to the request's watchdog as they are made."""
    watchdog = getattr(request, "watchdog", None)
    if not isinstance(watchdog, _Watchdog):
        return http_class

    def connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        conn = http_class(*args, **kwargs)
        create = conn._create_connection

        def create_watched(*c_args: Any, **c_kwargs: Any) -> socket.socket:
            sock = create(*c_args, **c_kwargs)
            watchdog.watch(sock)
            return sock

        conn._create_connection = create_watched
        return conn

    return connection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    handler_order = _HANDLER_ORDER

    def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        return super().do_open(_watched(http_class, req), req, **http_conn_args)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    handler_order = _HANDLER_ORDER

    def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        return super().do_open(_watched(http_class, req), req, **http_conn_args)


class _RedirectsToCaller(urllib.request.BaseHandler):
    """Hands every redirect back to HttpClient as an HTTPError, before urllib's own redirect
    handler (which would forward every header, tokens included, to any host) sees it."""

    handler_order = _HANDLER_ORDER

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _install_handlers(opener: urllib.request.OpenerDirector) -> None:
    """Add the redirect and deadline handlers once; HTTPS keeps the opener's TLS settings."""
    handlers = opener.handlers  # type: ignore[attr-defined]
    if any(isinstance(h, _RedirectsToCaller) for h in handlers):
        return
    https = [
        h
        for h in handlers
        if isinstance(h, urllib.request.HTTPSHandler) and not isinstance(h, _DeadlineHTTPSHandler)
    ]
    tls: dict[str, Any] = {}
    if https:
        tls["context"] = getattr(https[0], "_context", None)
        check_hostname = getattr(https[0], "_check_hostname", None)
        if check_hostname is not None:
            tls["check_hostname"] = check_hostname
    opener.add_handler(_RedirectsToCaller())
    opener.add_handler(_DeadlineHTTPHandler())
    opener.add_handler(_DeadlineHTTPSHandler(**tls))


def decode_json(body: bytes, content_type: str = "") -> Any:
    """JSON or FetchError: an HTML error page (captive portal, proxy, CDN) is told apart."""
    head = body[:512].lstrip().lower()
    if "html" in content_type.lower() or head.startswith((b"<!doctype", b"<html", b"<")):
        raise FetchError("html", "answer is an HTML page, not JSON")
    try:
        return json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError; deep nesting
        raise FetchError("bad_json", f"answer is not valid JSON ({len(body)} bytes)") from None


def _reject_constant(name: str) -> float:
    # NaN / Infinity are not JSON; Python would accept them silently.
    raise ValueError(name)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; None when absent/bad."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None
    if text.isascii() and text.isdigit():  # isdigit alone takes '²'
        seconds = float(text)
    else:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment is None:
            return None
        seconds = moment.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _reason_text(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return type(reason).__name__ if not isinstance(reason, str) else reason


def with_query(url: str, params: Mapping[str, str | int]) -> str:
    return f"{url}?{urllib.parse.urlencode(params)}" if params else url
