"""Grid carbon-intensity providers behind one small interface, and building them from config.

Every provider answers `fetch(now) -> Intensity` or raises FetchError; network providers also
answer `forecast(now)`. Each lives in its own module with its `PROVIDER_TYPE` (the options it
takes and how to build it); this package holds the registry of them and the one validation of
a configured provider list, `provider_specs_from_config`, which both the configuration and
`build_providers` use. Answers are validated in the provider modules (shape, zone, units,
range) so a bad answer never replaces a good value. Credentials live in `Secret`, which never
prints itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from carbond.carbon.http import HttpClient
from carbond.carbon.intensity import FetchError, check_grams_per_kwh
from carbond.carbon.providers import constant, electricitymaps, static, ukgrid, watttime
from carbond.carbon.providers.base import (
    BuildContext,
    Provider,
    ProviderBase,
    ProviderType,
    Secret,
    points_from_starts,
    read_secret_file,
)
from carbond.carbon.providers.constant import ConstantProvider
from carbond.carbon.providers.electricitymaps import ELECTRICITYMAPS_URL, ElectricityMapsProvider
from carbond.carbon.providers.static import StaticProvider
from carbond.carbon.providers.ukgrid import UKGRID_REGIONS, UKGRID_URL, UKGridProvider
from carbond.carbon.providers.watttime import WATTTIME_URL, WattTimeProvider
from carbond.carbon.static import Tables, is_valid_zone, load_tables
from carbond.types import ConfigError, did_you_mean, shown

log = logging.getLogger(__name__)

__all__ = [
    "ELECTRICITYMAPS_URL",
    "PROVIDER_OPTIONS",
    "PROVIDER_TYPES",
    "UKGRID_URL",
    "WATTTIME_URL",
    "BuildContext",
    "ConstantProvider",
    "ElectricityMapsProvider",
    "Provider",
    "ProviderBase",
    "ProviderType",
    "Secret",
    "StaticProvider",
    "UKGridProvider",
    "WattTimeProvider",
    "build_providers",
    "points_from_starts",
    "provider_specs_from_config",
    "read_secret_file",
]

# Configured name -> provider type, in the order messages list them.
PROVIDER_TYPES: Mapping[str, ProviderType] = MappingProxyType(
    {
        module.PROVIDER_TYPE.name: module.PROVIDER_TYPE
        for module in (electricitymaps, watttime, ukgrid, constant, static)
    }
)
# Name -> {option -> kind of value}: the keys docs/configuration.md documents (config.key_paths).
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    name: dict(kind.options) for name, kind in PROVIDER_TYPES.items()
}

ProviderSpec = tuple[str, dict[str, Any]]


def provider_specs_from_config(
    value: Any, key: str = "intensity.providers"
) -> list[ProviderSpec]:
    """The one validation of a provider list, for the configuration and `build_providers` alike.

    Takes the YAML list form `[{electricitymaps: {...}}, static]` or (name, options) pairs, and
    returns (name, options) pairs with every name, option name and option value checked, values
    normalised (text stripped, URLs without a trailing slash), so checking its own answer again
    changes nothing. Credential files are read when the providers are built. Raises ConfigError
    naming the key, e.g. `intensity.providers[0].electricitymaps.token_file`.
    """
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list of providers, got {type(value).__name__}")
    specs: list[ProviderSpec] = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if isinstance(item, str):
            name, raw = item, None
        elif isinstance(item, dict) and len(item) == 1:
            ((name, raw),) = item.items()
        elif isinstance(item, tuple) and len(item) == 2:  # a pair, as this function returns
            name, raw = item
        else:
            raise ConfigError(item_key, "expected one provider name mapping to its options")
        name = str(name)
        kind = PROVIDER_TYPES.get(name)
        if kind is None:
            raise ConfigError(
                item_key,
                f"unknown provider {shown(name)}{did_you_mean(name, PROVIDER_TYPES)}"
                f"; known: {', '.join(PROVIDER_TYPES)}",
            )
        if any(seen == name for seen, _ in specs):
            raise ConfigError(item_key, f"provider {shown(name)} is listed twice")
        specs.append((name, _checked_options(kind, raw, f"{item_key}.{name}")))
    return specs


def _checked_options(kind: ProviderType, raw: Any, key: str) -> dict[str, Any]:
    """One provider's options: known names, required ones present, each value of its kind."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping of options, got {type(raw).__name__}")
    for option in raw:
        if option not in kind.options:
            known = ", ".join(kind.options) or "none"
            raise ConfigError(
                f"{key}.{option}",
                f"unknown option {shown(str(option))}{did_you_mean(str(option), kind.options)}"
                f"; known: {known}",
            )
    for option in kind.required:
        if raw.get(option) is None:
            raise ConfigError(f"{key}.{option}", "required")
    checked: dict[str, Any] = {}
    for option, value_kind in kind.options.items():
        if option in raw:
            try:
                checked[option] = _checked_value(value_kind, raw[option])
            except ValueError as exc:
                raise ConfigError(f"{key}.{option}", str(exc)) from None
    return checked


def _checked_value(kind: str, value: Any) -> Any:
    """A value of the kind PROVIDER_OPTIONS names, normalised; ValueError says what is wrong."""
    if kind in ("path", "text"):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected a non-empty string, got {type(value).__name__}")
        return value.strip()
    if kind == "url":
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")
    if kind == "ukregion":  # null means national
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value not in UKGRID_REGIONS
        ):
            raise ValueError(f"expected a region id 1..17, got {shown(value)}")
        return value
    if kind == "grams":
        try:
            return check_grams_per_kwh(value)
        except FetchError:
            raise ValueError(
                f"expected a number of g/kWh between 0 and 3000, got {shown(value)}"
            ) from None
    raise AssertionError(f"no check for option kind {kind!r}")


def build_providers(
    specs: Sequence[tuple[str, Mapping[str, Any] | None]],
    zone: str,
    *,
    http: HttpClient | None = None,
    tables: Tables | None = None,
    key: str = "intensity.providers",
    zone_key: str = "intensity.zone",
) -> list[Provider]:
    """Validate the provider list (`provider_specs_from_config`) and build the providers in
    order, `static` always last; credential files are read here.

    Raises ConfigError naming the exact key (`intensity.providers[0].electricitymaps.token_file`)
    for unknown providers or options, wrong values, and unreadable credential files.
    """
    if not isinstance(zone, str) or not is_valid_zone(zone):
        raise ConfigError(
            zone_key,
            f"malformed zone {shown(zone)}: use an Electricity Maps zone "
            "(DE, US-CAL-CISO), an ISO country code, or a cloud region "
            "(aws:eu-west-1, gcp:europe-west4, azure:westeurope)",
        )
    checked = provider_specs_from_config(specs, key)
    http = http or HttpClient()
    tables = tables or load_tables()
    providers: list[Provider] = []
    for index, (name, options) in enumerate(checked):
        context = BuildContext(options, zone, http, tables, f"{key}[{index}].{name}")
        providers.append(PROVIDER_TYPES[name].build(context))
    if not any(name == "static" for name, _ in checked):
        providers.append(StaticProvider(zone, tables))
    elif providers[-1].name != "static":
        log.info("static provider is not last: providers after it are never used")
    return providers
