"""Configuration of the platform meters (`meters.acpi`, `meters.redfish`, `meters.ipmi`).

Each section is validated here into one frozen settings object, so `carbond.config` carries
three fields instead of a dozen and the rules that tie a section's keys together (a Redfish
URL is required once it is on, a timeout fits in its interval) sit beside the keys. Bad input
is a ConfigError naming the key, like every other key.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from carbond.config.validators import choice, duration, show
from carbond.types import ConfigError, did_you_mean

DEFAULT_HWMON_ROOT = "/sys/class/hwmon"
DEFAULT_IPMI_DEVICE = "/dev/ipmi0"
AUTH_SESSION, AUTH_BASIC = "session", "basic"


@dataclass(frozen=True)
class AcpiSettings:
    enabled: str = "auto"  # auto: where hwmon has a power_meter; on: down with a reason if not
    root: str = DEFAULT_HWMON_ROOT


@dataclass(frozen=True)
class IpmiSettings:
    enabled: str = "off"  # auto: where the device exists
    device: str = DEFAULT_IPMI_DEVICE
    interval_seconds: float = 5.0


@dataclass(frozen=True)
class RedfishSettings:
    enabled: str = "off"
    url: str | None = None
    username_file: str | None = None
    password_file: str | None = None
    ca_file: str | None = None  # None: the system trust store
    insecure: bool = False
    chassis: str | None = None  # None: the one top-level chassis
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    stale_after_seconds: float = 60.0
    auth: str = AUTH_SESSION


Check = Callable[[Any, str], Any]


def _path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(key, f"expected a path, got {show(value)}")
    return value


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {show(value)}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {show(value)}")
    return value


def _switch(*allowed: str) -> Check:
    """YAML booleans and on/off/auto, normalised to 'on', 'off' or 'auto' where allowed."""

    def check(value: Any, key: str) -> str:
        if value is True or value in ("on", "true", "yes"):
            normal = "on"
        elif value is False or value in ("off", "false", "no"):
            normal = "off"
        else:
            normal = value if value == "auto" else ""
        if normal not in allowed:
            words = {"on": "true/on", "off": "false/off", "auto": "auto"}
            raise ConfigError(key, f"expected {', '.join(words[a] for a in allowed)}, "
                              f"got {show(value)}")
        return normal

    return check


def _https_url(value: Any, key: str) -> str:
    text = _text(value, key)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - ValueError when the port is not a number
    except ValueError:
        raise ConfigError(key, f"not a valid URL: {text!r}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(key, f"expected an https:// URL of the BMC (credentials never travel "
                          f"in clear), got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "credentials do not belong in the URL: use username_file and "
                          "password_file")
    if parts.query or parts.fragment:
        raise ConfigError(key, f"expected the BMC's base URL, got {text!r}")
    return text.rstrip("/")


def _chassis(value: Any, key: str) -> str:
    text = _text(value, key)
    if "/" in text or text in (".", "..") or not text.isprintable():
        raise ConfigError(key, f"expected a chassis Id (as in /redfish/v1/Chassis/ID), "
                          f"got {text!r}")
    return text


ACPI_SCHEMA: dict[str, Check] = {"enabled": _switch("auto", "on", "off"), "root": _path}
IPMI_SCHEMA: dict[str, Check] = {"enabled": _switch("auto", "on", "off"), "device": _path,
                                 "interval": duration}
REDFISH_SCHEMA: dict[str, Check] = {
    "enabled": _switch("on", "off"), "url": _https_url, "username_file": _path,
    "password_file": _path, "ca_file": _path, "insecure": _boolean, "chassis": _chassis,
    "interval": duration, "timeout": duration, "stale_after": duration,
    "auth": choice(AUTH_SESSION, AUTH_BASIC),
}
# the settings field each key sets, where the names differ
_FIELDS = {"interval": "interval_seconds", "timeout": "timeout_seconds",
           "stale_after": "stale_after_seconds"}


def _section(value: Any, key: str, schema: Mapping[str, Check]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {show(value)}")
    result = {}
    for name, item in value.items():
        check = schema.get(name)
        if check is None:
            raise ConfigError(f"{key}.{name}",
                              f"unknown key {str(name)!r}{did_you_mean(name, schema)}")
        result[_FIELDS.get(name, name)] = check(item, f"{key}.{name}")
    return result


def acpi_settings(value: Any, key: str) -> AcpiSettings:
    return AcpiSettings(**_section(value, key, ACPI_SCHEMA))


def ipmi_settings(value: Any, key: str) -> IpmiSettings:
    return IpmiSettings(**_section(value, key, IPMI_SCHEMA))


def redfish_settings(value: Any, key: str) -> RedfishSettings:
    settings = RedfishSettings(**_section(value, key, REDFISH_SCHEMA))
    if settings.enabled == "off":
        return settings
    for required in ("url", "username_file", "password_file"):
        if getattr(settings, required) is None:
            raise ConfigError(f"{key}.{required}", "is required when the Redfish meter is on")
    if settings.insecure and settings.ca_file is not None:
        raise ConfigError(f"{key}.insecure", "and ca_file exclude each other: with a CA file "
                          "the certificate is verified")
    if settings.timeout_seconds > settings.interval_seconds:
        raise ConfigError(f"{key}.timeout", f"must be at most the interval "
                          f"({settings.interval_seconds:g}s), got {settings.timeout_seconds:g}s")
    if not settings.stale_after_seconds > settings.interval_seconds:
        raise ConfigError(f"{key}.stale_after", f"must be longer than the interval "
                          f"({settings.interval_seconds:g}s), got "
                          f"{settings.stale_after_seconds:g}s")
    return settings


# For carbond.config: each section is one key whose validator returns its settings object
# (path, Config field, validator), and the keys below it for docs/configuration.md.
PLATFORM_KEYS: tuple[tuple[str, str, Check], ...] = (
    ("meters.acpi", "acpi", acpi_settings),
    ("meters.redfish", "redfish", redfish_settings),
    ("meters.ipmi", "ipmi", ipmi_settings),
)
PLATFORM_SCHEMAS: dict[str, Mapping[str, Check]] = {
    "meters.acpi": ACPI_SCHEMA, "meters.redfish": REDFISH_SCHEMA, "meters.ipmi": IPMI_SCHEMA,
}
