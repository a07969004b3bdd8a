"""The embedded annual per-country table (carbond/carbon/static.py): the fallback of last
resort, local and always fresh."""

from __future__ import annotations

from carbond.carbon.intensity import Intensity
from carbond.carbon.providers.base import BuildContext, ProviderBase, ProviderType
from carbond.carbon.static import Tables, load_tables, resolve_static


class StaticProvider(ProviderBase):
    """The embedded annual per-country table; the fallback of last resort, always fresh."""

    name = "static"
    network = False

    def __init__(self, zone: str, tables: Tables | None = None) -> None:
        self.lookup = resolve_static(zone, tables or load_tables())
        self.zone = zone

    def describe(self) -> str:
        return f"static {self.lookup.iso2} {self.lookup.grams_per_kwh:g} g/kWh: {self.lookup.how}"

    def fetch(self, now: float) -> Intensity:
        return Intensity(
            self.lookup.grams_per_kwh, self.lookup.iso2, self.name, now, now, is_estimated=True
        )


def build(context: BuildContext) -> StaticProvider:
    """The table's figure for the configured zone (its country, else the world average)."""
    return StaticProvider(context.zone, context.tables)


PROVIDER_TYPE = ProviderType(name="static", options={}, required=(), build=build)
