"""Configuration: defaults < YAML file < flags, validated into one frozen `Config`.

Every problem becomes a `ConfigError` naming the key (or flag) and what is wrong, so the CLI
can print one line and exit 2. Keys of capabilities that are not wired yet are still validated,
so a config file written today keeps working when they land.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from carbond.carbon.providers import PROVIDER_OPTIONS, provider_specs_from_config
from carbond.carbon.zone import validate_zone
from carbond.config import platform, strict_yaml
from carbond.config.units import parse_grams, parse_seconds
from carbond.ledger.periods import PERIODS, get_zone
from carbond.types import ConfigError, did_you_mean, shown
from carbond.workloads.identity import settings as identity_settings
from carbond.workloads.naming import Rule, compile_rules

DEFAULT_CONFIG_PATH = "/etc/carbond/carbond.yaml"
DEFAULT_PORT = 9877
MIN_INTERVAL_SECONDS = 0.1
SECONDS_PER_YEAR = 365.25 * 86400  # an average year, leap days included
MIN_RETENTION_SECONDS = 3600.0
MAX_FLUSH_SECONDS = 3600.0

Validator = Callable[[Any, str], Any]


# ---- leaf validators: (value, key) -> normalised value, or ConfigError --------------------


def _duration(value: Any, key: str) -> float:
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


_LONG_UNITS_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0,
                       "y": SECONDS_PER_YEAR}
_LONG = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def _long_duration(value: Any, key: str) -> float:
    """Durations of days to years (retention, hardware lifetime): also `w` and `y`."""
    if isinstance(value, str):
        match = _LONG.match(value)
        unit = match.group(2) if match else ""
        if match and unit in ("w", "y"):
            number = float(match.group(1))
            if number <= 0:
                raise ConfigError(key, f"must be positive, got {shown(value)}")
            return number * _LONG_UNITS_SECONDS[unit]
        if match and unit and unit not in _LONG_UNITS_SECONDS:
            raise ConfigError(key, f"unknown unit {shown(unit)} in {shown(value)}; use one of "
                              f"{', '.join(_LONG_UNITS_SECONDS)}")
    return _duration(value, key)


def _timezone(value: Any, key: str) -> str:
    text = _string(value, key)
    try:
        get_zone(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    return text


def _mass(value: Any, key: str) -> float:
    try:
        return parse_grams(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _interval(value: Any, key: str) -> float:
    """A tick reads every cgroup and process counter: far below a second the agent would cost
    more than it measures (1 ms burned 82% of a core)."""
    seconds = _duration(value, key)
    if seconds < MIN_INTERVAL_SECONDS:
        raise ConfigError(key, f"must be at least {MIN_INTERVAL_SECONDS:g}s, got {seconds:g}s")
    return seconds


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {_show(value)}")
    return value


def _optional_string(value: Any, key: str) -> str | None:
    return None if value is None else _string(value, key)


def _number(minimum: float, *, inclusive: bool = True) -> Validator:
    def check(value: Any, key: str) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ConfigError(key, f"must be {bound}, got {shown(value)}")
        return float(value)

    return check


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"expected a positive integer, got {_show(value)}")
    return value


def _choice(*choices: str) -> Validator:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return str(value)

    return check


def _switch(value: Any, key: str) -> str:
    """`auto`, or a YAML boolean: normalised to 'auto', 'on' or 'off'."""
    if value is True or value in ("on", "true", "yes"):
        return "on"
    if value is False or value in ("off", "false", "no"):
        return "off"
    if value == "auto":
        return "auto"
    raise ConfigError(key, f"expected auto, true or false, got {_show(value)}")


def _auto_or_watts(value: Any, key: str) -> float | None:
    return None if value == "auto" else _number(0.0)(value, key)


def _listen(value: Any, key: str) -> tuple[str, int]:
    text = _string(value, key)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected HOST:PORT, got {shown(text)}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _zone(value: Any, key: str) -> str | None:
    return None if value is None else validate_zone(value, key)


def _rules(value: Any, key: str) -> tuple[Rule, ...]:
    return compile_rules(value, key)


def _providers(value: Any, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Names, option names and option values, by the providers' one validation (the same
    that `build_providers` runs); credential files are read when the providers are built,
    still before anything runs."""
    return tuple(provider_specs_from_config(value, key))


def _budgets(value: Any, key: str) -> tuple[Budget, ...]:
    budgets = []
    names: set[str] = set()
    for index, item in enumerate(_list(value, key)):
        entry = _section(item, f"{key}[{index}]", BUDGET_SCHEMA)
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
    ledger = _section(value, key, LEDGER_SCHEMA)
    if ledger.get("flush", 0.0) > MAX_FLUSH_SECONDS:
        raise ConfigError(f"{key}.flush", f"must be at most 1h (a crash loses one flush "
                          f"interval), got {ledger['flush']:g}s")
    if ledger.get("retention", MIN_RETENTION_SECONDS) < MIN_RETENTION_SECONDS:
        raise ConfigError(f"{key}.retention", f"must be at least 1h (rows are hourly), got "
                          f"{ledger['retention']:g}s")
    return (ledger.get("flush", Config.ledger_flush_seconds),
            ledger.get("retention", Config.ledger_retention_seconds))


def _embodied(value: Any, key: str) -> tuple[float, float]:
    embodied = _section(value, key, EMBODIED_SCHEMA)
    if "kgco2e" not in embodied:
        raise ConfigError(f"{key}.kgco2e", "is required (the host's embodied kg CO2e)")
    return embodied["kgco2e"], embodied.get("lifetime", Config.embodied_lifetime_seconds)


# ---- structure ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    return f"{type(value).__name__} {shown(value)}" if value is not None else "nothing"


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list, got {_show(value)}")
    return value


def _unknown(name: str, known: Mapping[str, Any], what: str = "key") -> str:
    return f"unknown {what} {shown(name)}{did_you_mean(name, known)}"


def _section(value: Any, key: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a mapping against a schema of validators and nested schemas."""
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {_show(value)}")
    result: dict[str, Any] = {}
    for name, item in value.items():
        item_key = f"{key}.{name}" if key else str(name)
        spec = schema.get(name)
        if spec is None:
            raise ConfigError(item_key, _unknown(str(name), schema))
        result[name] = _section(item, item_key, spec) if isinstance(spec, dict) else spec(
            item, item_key
        )
    return result


MATCH_SCHEMA: dict[str, Any] = {"kind": _string, "consumer": _string, "project": _string,
                                "namespace": _string, "account": _string, "user": _string}
BUDGET_SCHEMA: dict[str, Any] = {
    "name": _string, "match": MATCH_SCHEMA, "period": _choice(*PERIODS), "limit": _mass,
}
LEDGER_SCHEMA: dict[str, Any] = {"flush": _duration, "retention": _long_duration}
EMBODIED_SCHEMA: dict[str, Any] = {"kgco2e": _number(0.0), "lifetime": _long_duration}
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
    check: Any  # a Validator, or a nested schema validated by `_section`
    on_reload: str = LIVE


def _key(path: str, fields: str, check: Any, on_reload: str = LIVE) -> Key:
    return Key(tuple(path.split(".")), tuple(fields.split()), check, on_reload)


# Every top-level and nested key, once: SCHEMA and `_build` are derived from this table.
KEYS: tuple[Key, ...] = (
    _key("listen", "listen_host listen_port", _listen, RESTART),
    _key("interval", "interval_seconds", _interval, RESTART),
    _key("state_dir", "state_dir", _string, RESTART),
    _key("cgroup_root", "cgroup_root", _optional_string, RESTART),
    _key("proc_root", "proc_root", _string, RESTART),
    _key("web_config_file", "web_config_file", _optional_string, RESTART),
    _key("log_level", "log_level", _choice("debug", "info", "warning", "error")),
    _key("meters.rapl.enabled", "rapl_enabled", _switch, METERS),
    _key("meters.rapl.root", "powercap_root", _string, METERS),
    _key("meters.nvml.enabled", "nvml_enabled", _switch, METERS),
    _key("meters.model.enabled", "model_enabled", _switch, METERS),
    _key("meters.model.cpu_watts_min", "model_cpu_watts_min", _number(0.0), METERS),
    _key("meters.model.cpu_watts_max", "model_cpu_watts_max", _number(0.0), METERS),
    _key("meters.model.memory_watts_per_gb", "model_memory_watts_per_gb", _number(0.0),
         METERS),
    *(_key(path, fields, check, METERS) for path, fields, check in platform.PLATFORM_KEYS),
    _key("attribution.idle", "idle_policy", _choice("separate", "proportional")),
    _key("attribution.platform", "platform_policy", _choice("proportional", "idle")),
    _key("attribution.idle_watts.cpu", "idle_watts_cpu", _auto_or_watts),
    _key("attribution.idle_watts.gpu", "idle_watts_gpu", _auto_or_watts),
    _key("attribution.max_consumers", "max_consumers", _positive_int),
    _key("attribution.processes", "processes", _switch, RESTART),
    _key("attribution.rules", "rules", _rules, NAMER),
    _key("intensity.zone", "zone", _zone, FEED),
    _key("intensity.refresh", "intensity_refresh_seconds", _duration, FEED),
    _key("intensity.max_age", "intensity_max_age_seconds", _duration, FEED),
    _key("intensity.providers", "providers", _providers, FEED),
    _key("pue", "pue", _number(1.0)),
    _key("embodied", "embodied_kgco2e embodied_lifetime_seconds", _embodied),
    _key("ledger", "ledger_flush_seconds ledger_retention_seconds", _ledger, RESTART),
    _key("budgets_timezone", "budgets_timezone", _timezone, BUDGETS),
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
    return _section(tree, "", SCHEMA)


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
