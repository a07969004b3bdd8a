"""The `metadata:` configuration section and the resolver it builds.

```yaml
metadata:
  enabled: on            # off: ID names only, no source is ever asked
  timeout: 2s            # total deadline of one call to a source
  relist: 5m             # slow re-list of the listing sources
  cri: {socket: auto}    # auto: containerd's, else CRI-O's socket; a path; or off
  podresources: {socket: /var/lib/kubelet/pod-resources/kubelet.sock}
  docker: {socket: /var/run/docker.sock}
  podman: {socket: /run/podman/podman.sock}
  slurm: {scontrol: auto}  # auto: scontrol on PATH at start; an absolute path; or off
```

Validation raises ConfigError naming the key (exit status 2 in the CLI). This module does not
import carbond.config, so the config loader can call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carbond.types import ConfigError, did_you_mean
from carbond.workloads.identity.cri import DEFAULT_SOCKETS, CriSource
from carbond.workloads.identity.engine import DOCKER_SOCKET, PODMAN_SOCKET, EngineSource
from carbond.workloads.identity.podresources import KUBELET_SOCKET, PodResourcesSource
from carbond.workloads.identity.resolver import (
    DEFAULT_RELIST_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    MetadataResolver,
    Source,
)
from carbond.workloads.identity.slurm import SlurmSource, find_scontrol

AUTO, OFF = "auto", "off"
MAX_TIMEOUT_SECONDS = 60.0
MIN_RELIST_SECONDS = 10.0


@dataclass(frozen=True)
class MetadataSettings:
    enabled: bool = True
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    relist_seconds: float = DEFAULT_RELIST_SECONDS
    cri_socket: str = AUTO
    podresources_socket: str = KUBELET_SOCKET
    docker_socket: str = DOCKER_SOCKET
    podman_socket: str = PODMAN_SOCKET
    scontrol: str = AUTO


def _path(value: Any, key: str, auto: bool) -> str:
    if value is False:
        return OFF  # YAML 1.1 reads a bare `off` as false
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected {'auto, ' if auto else ''}off or an absolute path, "
                          f"got {type(value).__name__} {value!r}")
    if value == OFF or (auto and value == AUTO):
        return value
    if not value.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {value!r}")
    return value


def _seconds(value: Any, key: str, low: float, high: float) -> float:
    # Imported here: carbond.config's package imports this module (its key table), so a
    # module-level import made `import carbond.workloads.identity.settings` a cycle.
    from carbond.config.units import parse_seconds

    try:
        seconds = parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    if not low <= seconds <= high:
        raise ConfigError(key, f"must be between {low:g}s and {high:g}s, got {seconds:g}s")
    return seconds


def _switch(value: Any, key: str) -> bool:
    if value in (True, "on", "true"):
        return True
    if value in (False, "off", "false"):
        return False
    raise ConfigError(key, f"expected on or off, got {type(value).__name__} {value!r}")


SCHEMA: dict[str, Any] = {
    "enabled": None, "timeout": None, "relist": None,
    "cri": {"socket": None}, "podresources": {"socket": None}, "docker": {"socket": None},
    "podman": {"socket": None}, "slurm": {"scontrol": None},
}
"""The keys of the section, for carbond.config.key_paths (values: nested sections)."""


def parse(value: Any, key: str = "metadata") -> MetadataSettings:
    """The `metadata` mapping, validated; every key optional."""
    section = _mapping(value, key, SCHEMA)
    values: dict[str, Any] = {}
    if "enabled" in section:
        values["enabled"] = _switch(section["enabled"], f"{key}.enabled")
    if "timeout" in section:
        values["timeout_seconds"] = _seconds(section["timeout"], f"{key}.timeout", 0.01,
                                             MAX_TIMEOUT_SECONDS)
    if "relist" in section:
        values["relist_seconds"] = _seconds(section["relist"], f"{key}.relist",
                                            MIN_RELIST_SECONDS, 86400.0)
    for name, option, field_name, auto in (
        ("cri", "socket", "cri_socket", True),
        ("podresources", "socket", "podresources_socket", False),
        ("docker", "socket", "docker_socket", False),
        ("podman", "socket", "podman_socket", False),
        ("slurm", "scontrol", "scontrol", True),
    ):
        if name in section:
            sub = _mapping(section[name], f"{key}.{name}", SCHEMA[name])
            if option in sub:
                values[field_name] = _path(sub[option], f"{key}.{name}.{option}", auto)
    return MetadataSettings(**values)


def _mapping(value: Any, key: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
    for name in value:
        if name not in schema:
            raise ConfigError(f"{key}.{name}",
                              f"unknown key {name!r}{did_you_mean(str(name), schema)}")
    return value


def sources(settings: MetadataSettings) -> list[Source]:
    """The sources the settings enable. scontrol is found now, once (docs/identity.md says
    why); a scontrol that exists but may not be run is a ConfigError."""
    if not settings.enabled:
        return []
    found: list[Source] = []
    if settings.cri_socket != OFF:
        found.append(CriSource(DEFAULT_SOCKETS if settings.cri_socket == AUTO
                               else (settings.cri_socket,)))
    if settings.podresources_socket != OFF:
        found.append(PodResourcesSource(settings.podresources_socket))
    if settings.docker_socket != OFF:
        found.append(EngineSource("docker", settings.docker_socket))
    if settings.podman_socket != OFF:
        found.append(EngineSource("podman", settings.podman_socket))
    if settings.scontrol != OFF:
        try:
            scontrol = find_scontrol(None if settings.scontrol == AUTO else settings.scontrol)
        except ValueError as exc:
            raise ConfigError("metadata.slurm.scontrol", str(exc)) from None
        found.append(SlurmSource(scontrol))
    return found


def build_resolver(settings: MetadataSettings) -> MetadataResolver:
    """The resolver of a configuration (not started)."""
    return MetadataResolver(sources(settings), timeout_seconds=settings.timeout_seconds,
                            relist_seconds=settings.relist_seconds)
