"""Configuration: defaults < YAML file < flags, validated into one frozen `Config`.

Every problem becomes a `ConfigError` naming the key (or flag) and what is wrong, so the CLI
can print one line and exit 2. Keys of capabilities that are not wired yet are still validated,
so a config file written today keeps working when they land.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from carbond.carbon.providers import PROVIDER_OPTIONS
from carbond.config import platform, strict_yaml
from carbond.config import validators as v
from carbond.config.validators import SECONDS_PER_YEAR
from carbond.ledger.periods import PERIODS
from carbond.types import ConfigError, shown
from carbond.workloads.identity import settings as identity_settings
from carbond.workloads.naming import Rule

DEFAULT_CONFIG_PATH = "/etc/carbond/carbond.yaml"
DEFAULT_PORT = 9877
MIN_RETENTION_SECONDS = 3600.0
MAX_FLUSH_SECONDS = 3600.0


def _budgets(value: Any, key: str) -> tuple[Budget, ...]:
    budgets = []
    names: set[str] = set()
    for index, item in enumerate(v.list_of(value, key)):
        entry = v.section(item, f"{key}[{index}]", BUDGET_SCHEMA)
        _check_match(entry.get("match", {}), f"{key}[{index}].match")
        for required in ("name", "limit"):
            if required not in entry:
                raise ConfigError(f"{key}[{index}].{required}", "is required")
        if entry["name"] in names:  # the `budget` label must identify one budget
            raise ConfigError(f"{key}[{index}].name",
                              f"duplicate budget name {shown(entry['name'])}")
        names.add(entry["name"])
        budgets.append(
            Budget(entry["name"], entry.get("match", {}), entry.get("period", "month"),
                   entry["limit"])
        )
    return tuple(budgets)


def _check_match(match: dict[str, str], key: str) -> None:
    if "project" in match and match.get("kind", "project") != "project":
        raise ConfigError(f"{key}.project",
                          f"matches consumers of kind project, not kind {shown(match['kind'])}")


def _ledger(value: Any, key: str) -> tuple[float, float]:
    ledger = v.section(value, key, LEDGER_SCHEMA)
    if ledger.get("flush", 0.0) > MAX_FLUSH_SECONDS:
        raise ConfigError(f"{key}.flush", f"must be at most 1h (a crash loses one flush "
                          f"interval), got {ledger['flush']:g}s")
    if ledger.get("retention", MIN_RETENTION_SECONDS) < MIN_RETENTION_SECONDS:
        raise ConfigError(f"{key}.retention", f"must be at least 1h (rows are hourly), got "
                          f"{ledger['retention']:g}s")
    return (ledger.get("flush", Config.ledger_flush_seconds),
            ledger.get("retention", Config.ledger_retention_seconds))


def _embodied(value: Any, key: str) -> tuple[float, float]:
    embodied = v.section(value, key, EMBODIED_SCHEMA)
    if "kgco2e" not in embodied:
        raise ConfigError(f"{key}.kgco2e", "is required (the host's embodied kg CO2e)")
    return embodied["kgco2e"], embodied.get("lifetime", Config.embodied_lifetime_seconds)


MATCH_SCHEMA: dict[str, Any] = {"kind": v.string, "consumer": v.string, "project": v.string,
                                "namespace": v.string, "account": v.string, "user": v.string}
BUDGET_SCHEMA: dict[str, Any] = {
    "name": v.string, "match": MATCH_SCHEMA, "period": v.choice(*PERIODS), "limit": v.mass,
}
LEDGER_SCHEMA: dict[str, Any] = {"flush": v.duration, "retention": v.long_duration}
EMBODIED_SCHEMA: dict[str, Any] = {"kgco2e": v.number(0.0), "lifetime": v.long_duration}
# Keys validated inside a list or by a function rather than by a nested schema above.
LIST_SCHEMAS: dict[str, Mapping[str, Any]] = {
    "budgets[]": BUDGET_SCHEMA,
    "attribution.rules[]": dict.fromkeys(("match", "kind", "name")),
    "intensity.providers[]": PROVIDER_OPTIONS,
    "ledger": LEDGER_SCHEMA,
    "embodied": EMBODIED_SCHEMA,
    **platform.PLATFORM_SCHEMAS,
    "metadata": identity_settings.SCHEMA,
}


# What a SIGHUP reload does with a changed key: applied in place; kept until a restart (the
# process was started with it); or the part built from it is rebuilt.
LIVE, RESTART, METERS, FEED, NAMER, BUDGETS, METADATA = "live", "restart", "meters", "feed", \
    "namer", "budgets", "metadata"


@dataclass(frozen=True)
class Key:
    """One configuration key: where it sits in the YAML, the `Config` field(s) it sets (a
    validator returning a tuple fills several), its validator, and what a reload does when it
    changed. Defaults live on `Config`."""

    path: tuple[str, ...]
    fields: tuple[str, ...]
    check: Any  # a Validator, or a nested schema validated by `v.section`
    on_reload: str = LIVE


def _key(path: str, fields: str, check: Any, on_reload: str = LIVE) -> Key:
    return Key(tuple(path.split(".")), tuple(fields.split()), check, on_reload)


# Every top-level and nested key, once: SCHEMA and `_build` are derived from this table.
KEYS: tuple[Key, ...] = (
    _key("listen", "listen_host listen_port", v.listen, RESTART),
    _key("interval", "interval_seconds", v.interval, RESTART),
    _key("state_dir", "state_dir", v.string, RESTART),
    _key("cgroup_root", "cgroup_root", v.optional_string, RESTART),
    _key("proc_root", "proc_root", v.string, RESTART),
    _key("web_config_file", "web_config_file", v.optional_string, RESTART),
    _key("exec_socket", "exec_socket", v.optional_string, RESTART),
    _key("log_level", "log_level", v.choice("debug", "info", "warning", "error")),
    _key("meters.rapl.enabled", "rapl_enabled", v.switch, METERS),
    _key("meters.rapl.root", "powercap_root", v.string, METERS),
    _key("meters.nvml.enabled", "nvml_enabled", v.switch, METERS),
    _key("meters.model.enabled", "model_enabled", v.switch, METERS),
    _key("meters.model.cpu_watts_min", "model_cpu_watts_min", v.number(0.0), METERS),
    _key("meters.model.cpu_watts_max", "model_cpu_watts_max", v.number(0.0), METERS),
    _key("meters.model.memory_watts_per_gb", "model_memory_watts_per_gb", v.number(0.0),
         METERS),
    *(_key(path, fields, check, METERS) for path, fields, check in platform.PLATFORM_KEYS),
    _key("attribution.idle", "idle_policy", v.choice("separate", "proportional")),
    _key("attribution.platform", "platform_policy", v.choice("proportional", "idle")),
    _key("attribution.idle_watts.cpu", "idle_watts_cpu", v.auto_or_watts),
    _key("attribution.idle_watts.gpu", "idle_watts_gpu", v.auto_or_watts),
    _key("attribution.max_consumers", "max_consumers", v.positive_int),
    _key("attribution.processes", "processes", v.switch, RESTART),
    _key("attribution.rules", "rules", v.rules, NAMER),
    _key("intensity.zone", "zone", v.zone, FEED),
    _key("intensity.refresh", "intensity_refresh_seconds", v.duration, FEED),
    _key("intensity.max_age", "intensity_max_age_seconds", v.duration, FEED),
    _key("intensity.providers", "providers", v.providers, FEED),
    _key("pue", "pue", v.number(1.0)),
    _key("embodied", "embodied_kgco2e embodied_lifetime_seconds", _embodied),
    _key("ledger", "ledger_flush_seconds ledger_retention_seconds", _ledger, RESTART),
    _key("budgets_timezone", "budgets_timezone", v.timezone, BUDGETS),
    _key("budgets", "budgets", _budgets, BUDGETS),
    _key("metadata", "metadata", identity_settings.parse, METADATA),
)


def _schema(keys: tuple[Key, ...]) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    for key in keys:
        level = schema
        for name in key.path[:-1]:
            level = level.setdefault(name, {})
        level[key.path[-1]] = key.check
    return schema


SCHEMA: dict[str, Any] = _schema(KEYS)


def fields_on_reload(on_reload: str) -> tuple[str, ...]:
    """The `Config` fields whose keys a reload treats as `on_reload` (RESTART, METERS, ...)."""
    return tuple(field for key in KEYS if key.on_reload == on_reload for field in key.fields)


def key_paths() -> list[str]:
    """Every configuration key as a dotted path (lists as `[]`): what docs/configuration.md
    must document, no more and no less."""
    paths: list[str] = []

    def walk(schema: Mapping[str, Any], prefix: str) -> None:
        for name, spec in schema.items():
            path = f"{prefix}.{name}" if prefix else name
            below = LIST_SCHEMAS.get(f"{path}[]", LIST_SCHEMAS.get(path))
            if isinstance(spec, dict) and path not in LIST_SCHEMAS:
                walk(spec, path)
            elif below is not None:
                nested = f"{path}[]" if f"{path}[]" in LIST_SCHEMAS else path
                for child, sub in below.items():
                    if isinstance(sub, dict) and sub:
                        walk(sub, f"{nested}.{child}")
                    else:
                        paths.append(f"{nested}.{child}")
            else:
                paths.append(path)

    walk(SCHEMA, "")
    return paths


# Flags: flag name -> key path. Values from argparse arrive as strings.
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "--listen": ("listen",),
    "--interval": ("interval",),
    "--state-dir": ("state_dir",),
    "--powercap-root": ("meters", "rapl", "root"),
    "--cgroup-root": ("cgroup_root",),
    "--proc-root": ("proc_root",),
    "--zone": ("intensity", "zone"),
    "--pue": ("pue",),
    "--web.config.file": ("web_config_file",),
    "--log-level": ("log_level",),
}


# ---- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    name: str
    match: dict[str, str]
    period: str
    limit_grams: float


@dataclass(frozen=True)
class Config:
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    interval_seconds: float = 5.0
    state_dir: str = "/var/lib/carbond"
    cgroup_root: str | None = None  # None: detect
    proc_root: str = "/proc"
    web_config_file: str | None = None
    exec_socket: str | None = "/run/carbond/exec.sock"  # None: no socket (docs/exec.md)
    log_level: str = "info"
    rapl_enabled: str = "auto"
    powercap_root: str = "/sys/class/powercap"
    nvml_enabled: str = "auto"
    model_enabled: str = "auto"
    model_cpu_watts_min: float = 0.74
    model_cpu_watts_max: float = 3.5
    model_memory_watts_per_gb: float = 0.392
    acpi: platform.AcpiSettings = field(default_factory=platform.AcpiSettings)
    redfish: platform.RedfishSettings = field(default_factory=platform.RedfishSettings)
    ipmi: platform.IpmiSettings = field(default_factory=platform.IpmiSettings)
    idle_policy: str = "separate"
    platform_policy: str = "proportional"
    idle_watts_cpu: float | None = None  # None: learned
    idle_watts_gpu: float | None = None
    max_consumers: int = 200
    processes: str = "auto"
    rules: tuple[Rule, ...] = ()
    zone: str | None = None  # None: from the system time zone
    intensity_refresh_seconds: float = 900.0
    intensity_max_age_seconds: float = 7200.0
    providers: tuple[tuple[str, dict[str, Any]], ...] = (("static", {}),)
    pue: float = 1.0
    embodied_kgco2e: float = 0.0  # 0: no embodied emissions
    embodied_lifetime_seconds: float = 4 * SECONDS_PER_YEAR
    ledger_flush_seconds: float = 30.0
    ledger_retention_seconds: float = 400 * 86400.0
    budgets_timezone: str = "UTC"
    budgets: tuple[Budget, ...] = field(default=())
    metadata: identity_settings.MetadataSettings = field(
        default_factory=identity_settings.MetadataSettings)
    source: str | None = None  # the file read, for `carbond check`
    # sha256 of the file's bytes as parsed: what `carbond reload` waits to see in force.
    source_sha256: str | None = None


_ABSENT = object()


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return _ABSENT
        tree = tree[name]
    return tree


def _build(tree: Mapping[str, Any], source: str | None, digest: str | None = None) -> Config:
    """A validated tree to a Config: each key present sets its field(s), the rest keep the
    dataclass defaults."""
    values: dict[str, Any] = {}
    for key in KEYS:
        value = _get(tree, key.path)
        if value is not _ABSENT:
            values.update(zip(key.fields, value if len(key.fields) > 1 else (value,),
                              strict=True))
    config = Config(**values, source=source, source_sha256=digest)
    if config.model_cpu_watts_max < config.model_cpu_watts_min:
        raise ConfigError(
            "meters.model.cpu_watts_max",
            f"must be >= cpu_watts_min ({config.model_cpu_watts_min:g}), "
            f"got {config.model_cpu_watts_max:g}",
        )
    return config


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None


def parse_file(path: str, data: bytes) -> dict[str, Any]:
    """Parse and validate one YAML file, read once (its digest is that of the bytes
    validated); errors name the file (and line for bad YAML)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        tree = strict_yaml.load(text)
    except strict_yaml.StrictYamlError as exc:
        raise ConfigError("--config", f"{path}:{exc.line}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("--config", f"malformed YAML in {path}{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"malformed YAML in {path}: {exc}") from None
    if tree is None:
        return {}
    return v.section(tree, "", SCHEMA)


def read_file(path: str) -> dict[str, Any]:
    return parse_file(path, read_bytes(path))


def _validate_flag(flag: str, value: Any) -> Any:
    spec: Any = SCHEMA
    for name in FLAG_KEYS[flag]:
        spec = spec[name]
    return spec(value, flag)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def load(config_path: str | None, flags: Mapping[str, Any]) -> Config:
    """Defaults, then the file (explicit, or the default path when present), then flags."""
    source = config_path
    if source is None and os.path.exists(DEFAULT_CONFIG_PATH):
        source = DEFAULT_CONFIG_PATH
    data = read_bytes(source) if source else b""
    tree = parse_file(source, data) if source else {}
    for flag, value in flags.items():
        if value is not None:
            _set(tree, FLAG_KEYS[flag], _validate_flag(flag, value))
    return _build(tree, source, hashlib.sha256(data).hexdigest() if source else None)
