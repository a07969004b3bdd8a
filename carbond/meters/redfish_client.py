"""One BMC's Redfish service over HTTPS: TLS, credentials, the session, and nothing else.

Credentials come from files (read once, kept as `Secret`s that never print). With `auth:
session` (default) the client logs in once (`POST /redfish/v1/SessionService/Sessions`), sends
the `X-Auth-Token` it got with every request, logs in again when a request answers 401, and
deletes the session on close: BMCs have a handful of session slots, and a daemon that leaked
one per restart would lock its operators out. With `auth: basic` every request carries the
credentials instead.

Requests go through carbond.carbon.http.HttpClient: one total deadline per request, redirects
followed only within the BMC's origin (so the token never reaches another host), error texts
that name the host and status, never a header. The environment's proxy settings are not used:
a BMC sits on a management network, and a proxy would see its credentials. TLS is verified
against `ca_file` or the system trust store; `insecure: true` turns verification off, loudly.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Any

from carbond.carbon.http import HttpClient, origin_text, redirect_refusal
from carbond.carbon.intensity import FetchError
from carbond.carbon.providers.base import Secret
from carbond.config.platform import AUTH_BASIC, AUTH_SESSION

log = logging.getLogger(__name__)

SESSIONS_PATH = "/redfish/v1/SessionService/Sessions"
MAX_PATH_CHARS = 512


def tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    """Verification against the CA file or the system store; none only when asked for."""
    if insecure:
        log.warning("meters.redfish.insecure is true: the BMC's certificate is NOT verified; "
                    "anyone on the path can read its credentials")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_file)


def resource_path(link: Any) -> str:
    """A Redfish link (`@odata.id`) as a path on the BMC, or FetchError: only paths under
    /redfish/, never a URL of another host (`//host/...`, `https://...`) nor odd bytes."""
    if isinstance(link, dict):
        link = link.get("@odata.id")
    if (not isinstance(link, str) or not link.startswith("/redfish/") or "//" in link
            or len(link) > MAX_PATH_CHARS or not link.isascii() or not link.isprintable()
            or any(c in link for c in " \\?#")):
        raise FetchError("missing_field", "a link that is not a path under /redfish/")
    return link


class RedfishClient:
    """GET Redfish resources from one BMC as JSON, with the session or basic auth."""

    def __init__(self, base_url: str, username: Secret, password: Secret, *,
                 auth: str = AUTH_SESSION, timeout_seconds: float = 5.0,
                 ca_file: str | None = None, insecure: bool = False) -> None:
        if auth not in (AUTH_SESSION, AUTH_BASIC):
            raise ValueError(f"auth must be {AUTH_SESSION} or {AUTH_BASIC}, not {auth!r}")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self._username = username
        self._password = password
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=tls_context(ca_file, insecure)),
        )
        self.http = HttpClient(timeout_seconds, opener)
        self._lock = threading.Lock()  # one login at a time; the token is swapped whole
        self._token: Secret | None = None
        self._session_url: str | None = None
        self.logins_total = 0

    @property
    def host(self) -> str:
        return origin_text(self.base_url)

    def get(self, path: str) -> Any:
        """The resource at `path` as JSON; a 401 with a session logs in once more."""
        url = self.base_url + resource_path(path)
        headers = self._headers()  # a refused login fails here, once, and is not retried
        try:
            return self.http.get_json(url, headers)
        except FetchError as exc:
            if exc.reason != "http_401" or self.auth != AUTH_SESSION:
                raise
        self._drop_session()  # expired or revoked: one fresh login, then the request again
        return self.http.get_json(url, self._headers())

    def _headers(self) -> dict[str, str]:
        headers = {"OData-Version": "4.0"}
        if self.auth == AUTH_BASIC:
            pair = f"{self._username.reveal()}:{self._password.reveal()}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            headers["X-Auth-Token"] = self._session_token().reveal()
        return headers

    def _session_token(self) -> Secret:
        with self._lock:
            if self._token is None:
                self._login()
            assert self._token is not None
            return self._token

    def _login(self) -> None:
        body = json.dumps({"UserName": self._username.reveal(),
                           "Password": self._password.reveal()}).encode()
        answer = self.http.request("POST", self.base_url + SESSIONS_PATH, body=body)
        token = answer.headers.get("x-auth-token", "")
        if not token or not token.isascii() or not token.isprintable() or len(token) > 4096:
            raise FetchError("missing_field", f"{self.host} created no usable session token")
        self._token = Secret(token)
        self._session_url = self._own_url(answer.headers.get("location"))
        self.logins_total += 1
        log.info("redfish: logged in to %s (session %d)", self.host, self.logins_total)

    def _own_url(self, location: str | None) -> str | None:
        """The session's URL, only where it is on the BMC itself (never DELETE elsewhere)."""
        if not location:
            return None
        try:
            url = urllib.parse.urljoin(self.base_url + "/", location.strip())
        except ValueError:
            return None
        return url if redirect_refusal(self.base_url, url) is None else None

    def _drop_session(self) -> None:
        with self._lock:
            self._token = None
            self._session_url = None

    def close(self) -> None:
        """Log out (delete the session) so the BMC frees its slot; failures only logged."""
        with self._lock:
            token, url = self._token, self._session_url
            self._token = self._session_url = None
        if token is None or url is None:
            return
        try:
            self.http.request("DELETE", url, {"X-Auth-Token": token.reveal(),
                                              "OData-Version": "4.0"})
        except FetchError as exc:
            log.info("redfish: logout from %s failed: %s", self.host, exc)
