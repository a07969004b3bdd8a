"""carbond.yaml and the flags that override it: one key table, validated into a `Config`."""

from carbond.config.schema import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_PORT,
    FLAG_KEYS,
    KEYS,
    SCHEMA,
    Budget,
    Config,
    key_paths,
    load,
    read_file,
)

__all__ = ["DEFAULT_CONFIG_PATH", "DEFAULT_PORT", "FLAG_KEYS", "KEYS", "SCHEMA", "Budget",
           "Config", "key_paths", "load", "read_file"]
