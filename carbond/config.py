"""Configuration: defaults < YAML file < flags, validated into one frozen `Config`.

Every problem becomes a `ConfigError` naming the key (or flag) and what is wrong, so the CLI
can print one line and exit 2. Keys of capabilities that are not wired yet are still validated,
so a config file written today keeps working when they land.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from carbond.carbon.providers import PROVIDER_OPTIONS, provider_specs_from_config
from carbond.carbon.zone import validate_zone
from carbond.errors import ConfigError
from carbond.periods import PERIODS, get_zone
from carbond.units import parse_grams, parse_seconds
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
                raise ConfigError(key, f"must be positive, got {value!r}")
            return number * _LONG_UNITS_SECONDS[unit]
        if match and unit and unit not in _LONG_UNITS_SECONDS:
            raise ConfigError(key, f"unknown unit {unit!r} in {value!r}; use one of "
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
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
            raise ConfigError(key, f"must be {bound}, got {value!r}")
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
        raise ConfigError(key, f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _zone(value: Any, key: str) -> str | None:
    return None if value is None else validate_zone(value, key)


def _rules(value: Any, key: str) -> tuple[Rule, ...]:
    return compile_rules(value, key)


def _providers(value: Any, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Names and option keys; option values and credential files are checked when the
    providers are built (`build_providers`), still before anything runs."""
    specs = provider_specs_from_config(value, key)
    for index, (name, options) in enumerate(specs):
        known = PROVIDER_OPTIONS.get(name)
        if known is None:
            raise ConfigError(f"{key}[{index}]", _unknown(name, PROVIDER_OPTIONS, "provider"))
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"{key}[{index}].{name}", f"expected a mapping, got {_show(options)}")
        for option in options or {}:
            if option not in known:
                raise ConfigError(f"{key}[{index}].{name}.{option}", _unknown(option, known))
    return tuple(specs)


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
            raise ConfigError(f"{key}[{index}].name", f"duplicate budget name {entry['name']!r}")
        names.add(entry["name"])
        budgets.append(
            Budget(entry["name"], entry.get("match", {}), entry.get("period", "month"),
                   entry["limit"])
        )
    return tuple(budgets)


def _check_match(match: dict[str, str], key: str) -> None:
    if "project" in match and match.get("kind", "project") != "project":
        raise ConfigError(f"{key}.project",
                          f"matches consumers of kind project, not kind {match['kind']!r}")


def _ledger(value: Any, key: str) -> dict[str, float]:
    ledger = _section(value, key, LEDGER_SCHEMA)
    if ledger.get("flush", 0.0) > MAX_FLUSH_SECONDS:
        raise ConfigError(f"{key}.flush", f"must be at most 1h (a crash loses one flush "
                          f"interval), got {ledger['flush']:g}s")
    if ledger.get("retention", MIN_RETENTION_SECONDS) < MIN_RETENTION_SECONDS:
        raise ConfigError(f"{key}.retention", f"must be at least 1h (rows are hourly), got "
                          f"{ledger['retention']:g}s")
    return ledger


def _embodied(value: Any, key: str) -> dict[str, float]:
    embodied = _section(value, key, EMBODIED_SCHEMA)
    if "kgco2e" not in embodied:
        raise ConfigError(f"{key}.kgco2e", "is required (the host's embodied kg CO2e)")
    return embodied


# ---- structure ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list, got {_show(value)}")
    return value


def _unknown(name: str, known: Mapping[str, Any], what: str = "key") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {what} '{name}'{hint}"


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


MATCH_SCHEMA: dict[str, Any] = {"kind": _string, "consumer": _string, "project": _string}
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
}

SCHEMA: dict[str, Any] = {
    "listen": _listen,
    "interval": _interval,
    "state_dir": _string,
    "cgroup_root": _optional_string,
    "proc_root": _string,
    "web_config_file": _optional_string,
    "log_level": _choice("debug", "info", "warning", "error"),
    "meters": {
        "rapl": {"enabled": _switch, "root": _string},
        "nvml": {"enabled": _switch},
        "model": {
            "enabled": _switch,
            "cpu_watts_min": _number(0.0),
            "cpu_watts_max": _number(0.0),
            "memory_watts_per_gb": _number(0.0),
        },
    },
    "attribution": {
        "idle": _choice("separate", "proportional"),
        "idle_watts": {"cpu": _auto_or_watts, "gpu": _auto_or_watts},
        "max_consumers": _positive_int,
        "processes": _switch,
        "rules": _rules,
    },
    "intensity": {
        "zone": _zone,
        "refresh": _duration,
        "max_age": _duration,
        "providers": _providers,
    },
    "pue": _number(1.0),
    "embodied": _embodied,
    "ledger": _ledger,
    "budgets_timezone": _timezone,
    "budgets": _budgets,
}

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
    idle_policy: str = "separate"
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
    source: str | None = None  # the file read, for `carbond check`


def _get(tree: Mapping[str, Any], *path: str, default: Any) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return default
        tree = tree[name]
    return tree


def _build(tree: Mapping[str, Any], source: str | None) -> Config:
    base = Config()
    listen = tree.get("listen", (base.listen_host, base.listen_port))
    model = _get(tree, "meters", "model", default={})
    config = Config(
        listen_host=listen[0],
        listen_port=listen[1],
        interval_seconds=tree.get("interval", base.interval_seconds),
        state_dir=tree.get("state_dir", base.state_dir),
        cgroup_root=tree.get("cgroup_root", base.cgroup_root),
        proc_root=tree.get("proc_root", base.proc_root),
        web_config_file=tree.get("web_config_file", base.web_config_file),
        log_level=tree.get("log_level", base.log_level),
        rapl_enabled=_get(tree, "meters", "rapl", "enabled", default=base.rapl_enabled),
        powercap_root=_get(tree, "meters", "rapl", "root", default=base.powercap_root),
        nvml_enabled=_get(tree, "meters", "nvml", "enabled", default=base.nvml_enabled),
        model_enabled=model.get("enabled", base.model_enabled),
        model_cpu_watts_min=model.get("cpu_watts_min", base.model_cpu_watts_min),
        model_cpu_watts_max=model.get("cpu_watts_max", base.model_cpu_watts_max),
        model_memory_watts_per_gb=model.get("memory_watts_per_gb",
                                            base.model_memory_watts_per_gb),
        idle_policy=_get(tree, "attribution", "idle", default=base.idle_policy),
        idle_watts_cpu=_get(tree, "attribution", "idle_watts", "cpu", default=None),
        idle_watts_gpu=_get(tree, "attribution", "idle_watts", "gpu", default=None),
        max_consumers=_get(tree, "attribution", "max_consumers", default=base.max_consumers),
        processes=_get(tree, "attribution", "processes", default=base.processes),
        rules=_get(tree, "attribution", "rules", default=base.rules),
        zone=_get(tree, "intensity", "zone", default=base.zone),
        intensity_refresh_seconds=_get(tree, "intensity", "refresh",
                                       default=base.intensity_refresh_seconds),
        intensity_max_age_seconds=_get(tree, "intensity", "max_age",
                                       default=base.intensity_max_age_seconds),
        providers=_get(tree, "intensity", "providers", default=base.providers),
        pue=tree.get("pue", base.pue),
        embodied_kgco2e=_get(tree, "embodied", "kgco2e", default=base.embodied_kgco2e),
        embodied_lifetime_seconds=_get(tree, "embodied", "lifetime",
                                       default=base.embodied_lifetime_seconds),
        ledger_flush_seconds=_get(tree, "ledger", "flush", default=base.ledger_flush_seconds),
        ledger_retention_seconds=_get(tree, "ledger", "retention",
                                      default=base.ledger_retention_seconds),
        budgets_timezone=tree.get("budgets_timezone", base.budgets_timezone),
        budgets=tree.get("budgets", base.budgets),
        source=source,
    )
    if config.model_cpu_watts_max < config.model_cpu_watts_min:
        raise ConfigError(
            "meters.model.cpu_watts_max",
            f"must be >= cpu_watts_min ({config.model_cpu_watts_min:g}), "
            f"got {config.model_cpu_watts_max:g}",
        )
    return config


def read_file(path: str) -> dict[str, Any]:
    """Parse and validate one YAML file; errors name the file (and line for bad YAML)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("--config", f"malformed YAML in {path}{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"malformed YAML in {path}: {exc}") from None
    if tree is None:
        return {}
    return _section(tree, "", SCHEMA)


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
    tree = read_file(source) if source else {}
    for flag, value in flags.items():
        if value is not None:
            _set(tree, FLAG_KEYS[flag], _validate_flag(flag, value))
    return _build(tree, source)
