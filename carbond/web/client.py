"""The one HTTP client of carbond's commands: the daemon's own API (`top`, `exec`) and a
Prometheus for `report --prometheus`.

TLS and basic auth come from `--http.config.file`, in the format Prometheus and promtool use
for their own HTTP clients (prometheus/common `http_config`):

    basic_auth: {username, password | password_file}
    tls_config: {ca_file, cert_file, key_file, server_name, insecure_skip_verify}

For the daemon on this host the client also follows the daemon's own `--web.config.file`: a
`tls_server_config` there means HTTPS, and its `cert_file` is trusted when the client file
names no `ca_file` (the usual self-signed certificate). Never goes through a proxy; answers are
read up to a size bound; credentials never appear in a message.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from carbond.types import ConfigError

FLAG = "--http.config.file"
MAX_ANSWER_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 3.0
TLS_KEYS = {"ca_file", "cert_file", "key_file", "server_name", "insecure_skip_verify"}
AUTH_KEYS = {"username", "password", "password_file"}


class Unreachable(Exception):
    """No usable answer; the message is one line naming the URL (without credentials).
    `reason` alone, when nothing answered at all (refused, timed out, no route)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClientConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False
    username: str | None = None
    password: str | None = None
    tls: bool = False  # a tls_config section was given: speak HTTPS

    def authorization(self) -> str | None:
        if self.username is None:
            return None
        token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return f"Basic {token}"


def _section(document: Mapping[str, Any], key: str, known: set[str], path: str
             ) -> dict[str, Any]:
    value = document.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(FLAG, f"{path}: {key} must be a mapping")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(FLAG, f"{path}: unknown key {key}.{unknown[0]!s:.80}")
    return value


def load_client_config(path: str) -> ClientConfig:
    """The client file; bad input is a ConfigError naming the file and key."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(FLAG, f"cannot read {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(FLAG, f"{path} is not valid YAML: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ConfigError(FLAG, f"{path}: expected a mapping")
    unknown = sorted(set(document) - {"basic_auth", "tls_config"})
    if unknown:
        raise ConfigError(FLAG, f"{path}: unknown key {unknown[0]!s:.80}")
    directory = os.path.dirname(os.path.abspath(path))
    auth = _section(document, "basic_auth", AUTH_KEYS, path)
    tls = _section(document, "tls_config", TLS_KEYS, path)

    def file_key(section: Mapping[str, Any], key: str) -> str | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(FLAG, f"{path}: {key} must be a file name")
        return os.path.join(directory, value)

    password = auth.get("password")
    password_file = file_key(auth, "password_file")
    if password is not None and password_file is not None:
        raise ConfigError(FLAG, f"{path}: basic_auth takes password or password_file, not both")
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as handle:
                password = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(FLAG, f"cannot read {password_file}: "
                              f"{exc.strerror or exc}") from None
    username = auth.get("username")
    if auth and not isinstance(username, str):
        raise ConfigError(FLAG, f"{path}: basic_auth.username must be a string")
    skip = tls.get("insecure_skip_verify", False)
    if not isinstance(skip, bool):
        raise ConfigError(FLAG, f"{path}: tls_config.insecure_skip_verify must be true or false")
    server_name = tls.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise ConfigError(FLAG, f"{path}: tls_config.server_name must be a string")
    return ClientConfig(
        ca_file=file_key(tls, "ca_file"), cert_file=file_key(tls, "cert_file"),
        key_file=file_key(tls, "key_file"), server_name=server_name,
        insecure_skip_verify=skip, username=username,
        password=None if password is None else str(password), tls="tls_config" in document,
    )


def for_local_daemon(client: ClientConfig | None, daemon_cert_file: str | None
                     ) -> ClientConfig | None:
    """The client settings for the daemon on this host, whose web config serves TLS with
    `daemon_cert_file` (None: plain HTTP): HTTPS, trusting that certificate unless the client
    file names its own CA."""
    if daemon_cert_file is None:
        return client
    client = client or ClientConfig()
    if client.ca_file is None and not client.insecure_skip_verify:
        client = ClientConfig(**{**client.__dict__, "ca_file": daemon_cert_file})
    return ClientConfig(**{**client.__dict__, "tls": True})


def connect_host(listen_host: str) -> str:
    """Where to connect for a daemon listening on `listen_host`: the wildcard addresses mean
    this host's loopback."""
    host = listen_host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def daemon_url(listen_host: str, port: int, client: ClientConfig | None) -> str:
    host = connect_host(listen_host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if client is not None and client.tls else "http"
    return f"{scheme}://{host}:{port}"


def redact(url: str) -> str:
    """`url` without user:password."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: credentials stay with the origin asked."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """GET and POST with JSON answers against one base URL (`http[s]://host:port[/path]`,
    user:password@ in it taken as basic auth)."""

    def __init__(self, base_url: str, config: ClientConfig | None = None,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {redact(base_url)!r}")
        self.config = config or ClientConfig()
        self.timeout_seconds = timeout_seconds
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "",
                                             ""))
        self._authorization = self.config.authorization()
        if "@" in parts.netloc:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._authorization = f"Basic {token}"
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}),
                                                      _NoRedirect()]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=self._tls_context()))
        self._opener = urllib.request.build_opener(*handlers)

    def _tls_context(self) -> ssl.SSLContext:
        config = self.config
        try:
            context = ssl.create_default_context(cafile=config.ca_file)
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(FLAG, f"TLS files unusable: {exc}") from None
        if config.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif config.server_name:
            server_name = config.server_name
            wrap = context.wrap_socket

            def wrap_with_name(sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
                kwargs["server_hostname"] = server_name
                return wrap(sock, *args, **kwargs)

            context.wrap_socket = wrap_with_name  # type: ignore[method-assign]
        return context

    def get_json(self, path: str) -> Any:
        return self._json(urllib.request.Request(self.base + path))

    def post_form(self, path: str, fields: Mapping[str, str]) -> Any:
        body = urllib.parse.urlencode(fields).encode()
        return self._json(urllib.request.Request(
            self.base + path, data=body, method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded"}))

    def _json(self, request: urllib.request.Request) -> Any:
        request.add_header("Accept", "application/json")
        if self._authorization:
            request.add_header("Authorization", self._authorization)
        url = request.full_url
        try:
            with self._opener.open(request, timeout=self.timeout_seconds) as response:
                body = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise Unreachable(f"{url} answered HTTP {exc.code} {_detail(exc)}".rstrip()) \
                from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = getattr(reason, "strerror", None) or str(reason)
            raise Unreachable(f"cannot reach {url}: {text}", text) from None
        except TimeoutError:
            text = f"timed out after {self.timeout_seconds:g}s"
            raise Unreachable(f"cannot reach {url}: {text}", text) from None
        except (OSError, http.client.HTTPException) as exc:  # reset, closed early
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                type(exc).__name__
            raise Unreachable(f"no usable answer from {url}: {detail}") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise Unreachable(f"{url}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise Unreachable(f"{url}: the answer is not JSON") from None


def _detail(exc: urllib.error.HTTPError) -> str:
    """Prometheus's `error` field of an error answer, when there is one."""
    try:
        document = json.loads(exc.read(64 * 1024))
    except (ValueError, OSError, AttributeError):
        return str(exc.reason or "")
    if isinstance(document, dict) and document.get("error"):
        return str(document["error"])[:200]
    return str(exc.reason or "")
