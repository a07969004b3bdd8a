"""The platform meters a configuration asks for: `build_platform_meters(config)`.

`auto` builds a meter only where this host has its source (a hwmon power_meter, a character
device at the IPMI path), so an ordinary host gets none and pays nothing; `on` builds it
regardless, down with its reason in `carbond check` until the source appears. Redfish is
`on` or `off`: it needs a URL and credentials, which are read here, before anything runs, so
a missing or unreadable file is a ConfigError naming its key (exit 2), never a log line later.
"""

from __future__ import annotations

import os
import ssl
import stat

from carbond.carbon.providers.base import read_secret_file
from carbond.config import Config
from carbond.config.platform import RedfishSettings
from carbond.meters.acpi import AcpiMeter
from carbond.meters.acpi import discover as discover_acpi
from carbond.meters.base import Meter
from carbond.meters.ipmi import IpmiDevice, IpmiMeter
from carbond.meters.redfish import RedfishMeter
from carbond.meters.redfish_client import RedfishClient, tls_context
from carbond.types import ConfigError


def is_character_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def build_redfish_client(settings: RedfishSettings) -> RedfishClient:
    """The BMC client with its credentials read now; ConfigError names the key at fault."""
    key = "meters.redfish"
    for name in ("url", "username_file", "password_file"):
        if not getattr(settings, name):  # redfish_settings() requires them once it is on
            raise ConfigError(f"{key}.{name}", "is required when the Redfish meter is on")
    assert settings.url and settings.username_file and settings.password_file
    username = read_secret_file(settings.username_file, f"{key}.username_file")
    password = read_secret_file(settings.password_file, f"{key}.password_file")
    if settings.ca_file is not None:
        try:
            tls_context(settings.ca_file, False)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ConfigError(f"{key}.ca_file",
                              f"cannot use {settings.ca_file} as a CA file: {reason}") from None
    return RedfishClient(settings.url, username, password, auth=settings.auth,
                         timeout_seconds=settings.timeout_seconds, ca_file=settings.ca_file,
                         insecure=settings.insecure)


def build_platform_meters(config: Config, *, start_threads: bool = True) -> list[Meter]:
    """The acpi, ipmi and redfish meters `config` enables, in that order (the order
    attribution prefers them in). `start_threads` False leaves their sampling threads unstarted
    (tests drive `sample()`/`poll()` themselves)."""
    meters: list[Meter] = []
    acpi = config.acpi
    if acpi.enabled == "on" or (acpi.enabled == "auto" and discover_acpi(acpi.root)):
        meters.append(AcpiMeter(acpi.root, start_sampler=start_threads))
    ipmi = config.ipmi
    if ipmi.enabled == "on" or (ipmi.enabled == "auto" and is_character_device(ipmi.device)):
        meters.append(IpmiMeter(IpmiDevice(ipmi.device), interval_seconds=ipmi.interval_seconds,
                                start_poller=start_threads))
    redfish = config.redfish
    if redfish.enabled == "on":
        meters.append(RedfishMeter(build_redfish_client(redfish), chassis=redfish.chassis,
                                   interval_seconds=redfish.interval_seconds,
                                   stale_after_seconds=redfish.stale_after_seconds,
                                   start_poller=start_threads))
    return meters
