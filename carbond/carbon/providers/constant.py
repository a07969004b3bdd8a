"""A configured figure (a power purchase agreement, an on-site supply): local, always fresh."""

from __future__ import annotations

from carbond.carbon.intensity import Intensity, check_grams_per_kwh
from carbond.carbon.providers.base import BuildContext, ProviderBase, ProviderType


class ConstantProvider(ProviderBase):
    """A configured figure: a power purchase agreement, an on-site supply. Always fresh."""

    name = "constant"
    network = False

    def __init__(self, grams_per_kwh: float, zone: str) -> None:
        self.grams_per_kwh = check_grams_per_kwh(grams_per_kwh)
        self.zone = zone

    def describe(self) -> str:
        return f"constant {self.grams_per_kwh:g} g/kWh"

    def fetch(self, now: float) -> Intensity:
        return Intensity(self.grams_per_kwh, self.zone, self.name, now, now)


def build(context: BuildContext) -> ConstantProvider:
    """The configured `grams_per_kwh`, labelled with the configured zone."""
    return ConstantProvider(context.options["grams_per_kwh"], context.zone)


PROVIDER_TYPE = ProviderType(
    name="constant",
    options={"grams_per_kwh": "grams"},
    required=("grams_per_kwh",),
    build=build,
)
