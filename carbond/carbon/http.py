"""The one place intensity providers touch the network: GET a URL, get JSON or a FetchError.

Standard library only (urllib), so the agent has no HTTP dependency to patch on every server.
The opener is injectable: tests pass one without proxies, the daemon the default (which honours
the usual `https_proxy` / `no_proxy` environment).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from carbond import __version__
from carbond.carbon.model import FetchError

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 4 * 1024 * 1024  # a forecast is ~100 kB; anything far larger is not an answer
MAX_RETRY_AFTER_SECONDS = 86400.0


class HttpClient:
    """GET JSON with a timeout; every failure becomes a FetchError with a short reason.

    Error messages name the status and host only: never headers (which carry tokens) nor the
    body of the request.
    """

    def __init__(
        self,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        opener: urllib.request.OpenerDirector | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.opener = opener or urllib.request.build_opener()
        self.clock = clock  # only for HTTP-date Retry-After

    def get_json(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        request = urllib.request.Request(url, method="GET")
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", f"carbond/{__version__}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        host = urllib.parse.urlsplit(url).netloc
        try:
            with self.opener.open(request, timeout=self.timeout_seconds) as response:
                body = response.read(MAX_BODY_BYTES + 1)
                # read(n) returns short when the peer closes early; length says what is missing
                missing = getattr(response, "length", None)
                if isinstance(missing, int) and missing > 0 and len(body) <= MAX_BODY_BYTES:
                    raise http.client.IncompleteRead(body, missing)
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status = exc.code
            retry_after = parse_retry_after(exc.headers.get("Retry-After"), self._now())
            exc.close()
            reason = "rate_limited" if status == 429 else f"http_{status}"
            raise FetchError(reason, f"{host} answered {status}", retry_after) from None
        except TimeoutError:
            raise FetchError(
                "timeout", f"{host} did not answer in {self.timeout_seconds:g}s"
            ) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise FetchError(
                    "timeout", f"{host} did not answer in {self.timeout_seconds:g}s"
                ) from None
            raise FetchError("network", f"{host}: {_reason_text(exc.reason)}") from None
        except http.client.IncompleteRead:
            raise FetchError("bad_json", f"{host} sent a truncated answer") from None
        except (
            OSError,
            ValueError,
            http.client.HTTPException,
        ) as exc:  # connection reset mid-body, bad URL, ...
            raise FetchError("network", f"{host}: {type(exc).__name__}") from None
        if len(body) > MAX_BODY_BYTES:
            raise FetchError("too_large", f"{host} sent more than {MAX_BODY_BYTES} bytes")
        return decode_json(body, content_type)

    def _now(self) -> float:
        return float(self.clock())


def decode_json(body: bytes, content_type: str = "") -> Any:
    """JSON or FetchError: an HTML error page (captive portal, proxy, CDN) is told apart."""
    head = body[:512].lstrip().lower()
    if "html" in content_type.lower() or head.startswith((b"<!doctype", b"<html", b"<")):
        raise FetchError("html", "answer is an HTML page, not JSON")
    try:
        return json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
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
    if text.isdigit():
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
