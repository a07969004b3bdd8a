"""carbond.yaml and the flags that override it: one key table, validated into a `Config`."""

from carbond.config.schema import (
    BUDGETS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_PORT,
    FEED,
    FLAG_KEYS,
    KEYS,
    METERS,
    NAMER,
    RESTART,
    SCHEMA,
    Budget,
    Config,
    fields_on_reload,
    key_paths,
    load,
    read_file,
)

__all__ = [
    "BUDGETS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PORT",
    "FEED",
    "FLAG_KEYS",
    "KEYS",
    "METERS",
    "NAMER",
    "RESTART",
    "SCHEMA",
    "Budget",
    "Config",
    "fields_on_reload",
    "key_paths",
    "load",
    "read_file",
]
