"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

The same file an operator already writes for node_exporter works here:

    tls_server_config: {cert_file, key_file, client_auth_type, client_ca_file,
                        client_allowed_sans, min_version, max_version,
                        prefer_server_cipher_suites}
    http_server_config: {http2, headers}
    basic_auth_users: {USER: BCRYPT_HASH}   (checked by carbond.web.auth)

Relative paths are relative to the file's directory, as in exporter-toolkit. Settings carbond
cannot honour (Go cipher-suite and curve names, inline certificates, rate limits) are refused,
not ignored: a security setting that silently does nothing is worse than an error. The file and
the files it names are re-read when they change (checked at most once a second, on the next
connection), so certificates can be rotated; a broken new version is logged and the previous
one stays in force.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from carbond.config import strict_yaml
from carbond.types import ConfigError, cut, shown

log = logging.getLogger(__name__)

FLAG = "--web.config.file"
BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
TLS_VERSIONS = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit accepts these; OpenSSL 3 here completes no TLS 1.0/1.1 handshake unless the
# security level drops to 0, which would allow weak ciphers on every connection. Refused at
# load, so a config never promises a version that is not served.
REFUSED_TLS_VERSIONS = ("TLS10", "TLS11")
CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's unverified modes: OpenSSL through Python cannot ask for a certificate without checking it.
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# The headers exporter-toolkit lets a web config set.
ALLOWED_HEADERS = ("Strict-Transport-Security", "X-Content-Type-Options", "X-Frame-Options",
                   "X-XSS-Protection", "Content-Security-Policy")
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file",
            "client_allowed_sans", "min_version", "max_version", "prefer_server_cipher_suites"}
REFUSED_TLS_KEYS = {"cipher_suites", "curve_preferences", "cert", "key", "client_ca"}
TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
REFUSED_TOP_KEYS = {"rate_limit"}


@dataclass(frozen=True)
class WebConfig:
    """One loaded version of the file: what every new connection and request follows."""

    tls: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    allowed_sans: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    files: tuple[str, ...] = ()  # every file it was made from, to notice changes

    def allows_peer(self, peercert: Any) -> bool:
        """Whether a verified client certificate carries one of client_allowed_sans."""
        if not self.allowed_sans:
            return True
        if not isinstance(peercert, dict):
            return False
        names = {str(value) for _, value in peercert.get("subjectAltName", ())}
        return any(san in names for san in self.allowed_sans)


def _fail(path: str, problem: str) -> ConfigError:
    return ConfigError(FLAG, f"{path}: {problem}")


def _mapping(value: Any, path: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{key}: expected a mapping")
    return value


def _string(value: Any, path: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(path, f"{key}: expected a string")
    return value


def _check_keys(found: Mapping[str, Any], known: set[str], refused: set[str], path: str,
                where: str) -> None:
    for key in found:
        if key in refused:
            raise _fail(path, f"{where}{key}: not supported by carbond")
        if key not in known:
            raise _fail(path, f"{where}{key}: unknown key")


def _resolve(directory: str, name: str) -> str:
    return name if not name or os.path.isabs(name) else os.path.join(directory, name)


def _tls_version(value: Any, path: str, key: str, default: ssl.TLSVersion) -> ssl.TLSVersion:
    text = _string(value, path, key)
    if not text:
        return default
    if text in REFUSED_TLS_VERSIONS:
        raise _fail(path, f"{key}: {text} is not supported by carbond (TLS 1.0 and 1.1 are "
                    "deprecated, RFC 8996, and OpenSSL refuses them at its default security "
                    "level); use TLS12 or TLS13")
    if text not in TLS_VERSIONS:
        raise _fail(path, f"{key}: expected one of {', '.join(TLS_VERSIONS)}, got {shown(text)}")
    return TLS_VERSIONS[text]


def _tls(section: Mapping[str, Any], directory: str, path: str) -> tuple[
        ssl.SSLContext | None, tuple[str, ...], tuple[str, ...]]:
    """(context or None when TLS is off, client_allowed_sans, files read)."""
    _check_keys(section, TLS_KEYS, REFUSED_TLS_KEYS, path, "tls_server_config.")
    cert = _resolve(directory, _string(section.get("cert_file"), path, "cert_file"))
    key = _resolve(directory, _string(section.get("key_file"), path, "key_file"))
    client_ca = _resolve(directory, _string(section.get("client_ca_file"), path,
                                            "client_ca_file"))
    client_auth = _string(section.get("client_auth_type"), path, "client_auth_type")
    if not (cert or key or client_ca or client_auth):
        return None, (), ()  # exporter-toolkit: an empty section is plain HTTP
    if not cert:
        raise _fail(path, "tls_server_config.cert_file: missing")
    if not key:
        raise _fail(path, "tls_server_config.key_file: missing")
    if client_auth in UNVERIFIED_CLIENT_AUTH:
        raise _fail(path, f"client_auth_type: {client_auth} (an unverified client "
                    "certificate) is not supported by carbond; use VerifyClientCertIfGiven or "
                    "RequireAndVerifyClientCert with client_ca_file")
    if client_auth not in CLIENT_AUTH:
        raise _fail(path, f"client_auth_type: unknown value {shown(client_auth)}")
    verify = CLIENT_AUTH[client_auth]
    if client_ca and verify == ssl.CERT_NONE:
        raise _fail(path, "client_ca_file is set but client_auth_type does not ask for "
                    "client certificates")
    if verify != ssl.CERT_NONE and not client_ca:
        raise _fail(path, f"client_auth_type: {client_auth} needs client_ca_file")
    sans = section.get("client_allowed_sans") or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise _fail(path, "client_allowed_sans: expected a list of strings")
    if sans and verify == ssl.CERT_NONE:
        raise _fail(path, "client_allowed_sans needs client certificates (client_auth_type)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _tls_version(section.get("min_version"), path, "min_version",
                                           ssl.TLSVersion.TLSv1_2)
    context.maximum_version = _tls_version(section.get("max_version"), path, "max_version",
                                           ssl.TLSVersion.MAXIMUM_SUPPORTED)
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise _fail(path, "prefer_server_cipher_suites: expected true or false")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        # A callback, so an encrypted key is an error here, never a prompt on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        raise _fail(path, f"cannot load cert_file {cert} / key_file {key}: "
                    f"{getattr(exc, 'strerror', None) or exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise _fail(path, f"cannot load client_ca_file {client_ca}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    context.verify_mode = verify
    context.set_alpn_protocols(["http/1.1"])
    files = tuple(f for f in (cert, key, client_ca) if f)
    return context, tuple(sans), files


def _headers(section: Mapping[str, Any], path: str) -> tuple[tuple[str, str], ...]:
    _check_keys(section, {"http2", "headers"}, set(), path, "http_server_config.")
    if not isinstance(section.get("http2", True), bool):
        raise _fail(path, "http_server_config.http2: expected true or false")
    headers = _mapping(section.get("headers"), path, "http_server_config.headers")
    result = []
    for name, value in headers.items():
        allowed = {h.lower(): h for h in ALLOWED_HEADERS}
        if not isinstance(name, str) or name.lower() not in allowed:
            raise _fail(path, f"http_server_config.headers: {shown(name)} may not be set "
                        f"(allowed: {', '.join(ALLOWED_HEADERS)})")
        if not isinstance(value, str) or not value.isprintable() or not value.isascii():
            raise _fail(path, f"http_server_config.headers.{cut(name)}: expected printable text")
        result.append((allowed[name.lower()], value))
    return tuple(result)


def _users(section: Mapping[str, Any], path: str) -> dict[str, bytes]:
    users = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail(path, f"basic_auth_users: bad user name {shown(user)}")
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise _fail(path, f"basic_auth_users.{cut(user)}: expected a bcrypt hash "
                        "(htpasswd -nBC 10 USER)")
        users[user] = hashed.encode("ascii")
    return users


def load_web_config(path: str) -> WebConfig:
    """Parse and check the file, loading certificates; ConfigError naming the flag if bad."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _fail(path, "not UTF-8 text") from None
    try:
        tree = strict_yaml.load(text)
    except strict_yaml.StrictYamlError as exc:
        raise ConfigError(FLAG, f"{path}:{exc.line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise _fail(path, f"invalid YAML: {' '.join(str(exc).split())}") from None
    tree = _mapping(tree, path, "the file")
    _check_keys(tree, TOP_KEYS, REFUSED_TOP_KEYS, path, "")
    directory = os.path.dirname(os.path.abspath(path))
    context, sans, files = _tls(_mapping(tree.get("tls_server_config"), path,
                                         "tls_server_config"), directory, path)
    return WebConfig(
        tls=context,
        users=_users(_mapping(tree.get("basic_auth_users"), path, "basic_auth_users"), path),
        allowed_sans=sans,
        headers=_headers(_mapping(tree.get("http_server_config"), path,
                                  "http_server_config"), path),
        files=(path, *files),
    )


def _fingerprint(files: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    result = []
    for name in files:
        try:
            info = os.stat(name)
        except OSError:
            result.append(None)
        else:
            result.append((info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(result)


class WebConfigWatcher:
    """The web config now: re-read when the file, or a certificate it names, changes."""

    def __init__(self, path: str, *, check_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._check_seconds = check_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._config, self._fingerprint = self._load()
        self._checked = clock()

    def current(self) -> WebConfig:
        now = self._clock()
        with self._lock:
            if now - self._checked < self._check_seconds:
                return self._config
            self._checked = now
            seen = _fingerprint(self._config.files)
            if seen == self._fingerprint:
                return self._config
            try:
                self._config, self._fingerprint = self._load()
            except ConfigError as exc:
                log.error("%s; keeping the previous web configuration", exc)
                self._fingerprint = seen  # say it once per change, not once a second
                return self._config
            log.info("%s: reloaded %s", FLAG, self.path)
            return self._config

    def _load(self) -> tuple[WebConfig, tuple[tuple[int, int, int] | None, ...]]:
        """The config and the state of its files; a file that changed while being read
        leaves a fingerprint that matches nothing, so the next check reads it again."""
        before = _fingerprint((self.path,))
        config = load_web_config(self.path)
        after = _fingerprint(config.files)
        return config, (after if after[:1] == before else ())


def server_cert_file(path: str) -> str | None:
    """The certificate a web config serves, for a client on this host to trust (its key and
    hashes are not read: a user running `carbond top` may not be allowed to). None when the
    file serves plain HTTP or cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = tree.get("tls_server_config") if isinstance(tree, dict) else None
    cert = section.get("cert_file") if isinstance(section, dict) else None
    if not isinstance(cert, str) or not cert:
        return None
    return _resolve(os.path.dirname(os.path.abspath(path)), cert)
