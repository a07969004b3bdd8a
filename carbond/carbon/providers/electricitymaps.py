"""Electricity Maps v3: the average (lifecycle) intensity of a zone's consumption mix, now and
forecast, for a zone or a cloud region."""

from __future__ import annotations

from typing import Any

from carbond.carbon.http import HttpClient, with_query
from carbond.carbon.intensity import (
    FetchError,
    ForecastPoint,
    Intensity,
    check_grams_per_kwh,
    parse_timestamp,
    snippet,
)
from carbond.carbon.providers.base import (
    BuildContext,
    ProviderBase,
    ProviderType,
    Secret,
    expect_object,
    points_from_starts,
    read_secret_file,
    require_field,
)
from carbond.carbon.static import split_cloud_zone

ELECTRICITYMAPS_URL = "https://api.electricitymaps.com"


class ElectricityMapsProvider(ProviderBase):
    """Electricity Maps v3: average (lifecycle) intensity of the zone's consumption mix."""

    name = "electricitymaps"

    def __init__(self, zone: str, token: Secret, http: HttpClient, url: str = ELECTRICITYMAPS_URL):
        self.zone = zone
        self._token = token
        self.http = http
        self.url = url.rstrip("/")

    def describe(self) -> str:
        return f"electricitymaps {self.url} zone {self.zone}"

    def _params(self) -> dict[str, str]:
        cloud = split_cloud_zone(self.zone)
        if cloud is None:
            return {"zone": self.zone}
        # Without shouldUseFallbackCallerLookup=false an unknown region silently answers for
        # wherever the caller's IP appears to be.
        return {
            "dataCenterProvider": cloud[0],
            "dataCenterRegion": cloud[1],
            "shouldUseFallbackCallerLookup": "false",
        }

    def _get(self, path: str) -> Any:
        url = with_query(f"{self.url}{path}", self._params())
        return self.http.get_json(url, {"auth-token": self._token.reveal()})

    def _check_zone(self, body: dict[str, Any]) -> str:
        zone = body.get("zone")
        if not isinstance(zone, str) or not zone:
            raise FetchError("missing_field", "no zone in the answer")
        if split_cloud_zone(self.zone) is None and zone.upper() != self.zone.upper():
            raise FetchError("wrong_zone", f"asked for {self.zone}, got {snippet(zone)}")
        return zone

    def fetch(self, now: float) -> Intensity:
        return self.parse_latest(self._get("/v3/carbon-intensity/latest"), now)

    def forecast(self, now: float) -> list[ForecastPoint]:
        return self.parse_forecast(self._get("/v3/carbon-intensity/forecast"))

    def parse_latest(self, answer: Any, now: float) -> Intensity:
        body = expect_object(answer)
        zone = self._check_zone(body)
        grams = check_grams_per_kwh(require_field(body, "carbonIntensity"))
        observed_at = parse_timestamp(require_field(body, "datetime"))
        estimated = body.get("isEstimated", False)
        return Intensity(
            grams_per_kwh=grams,
            zone=zone,
            provider=self.name,
            observed_at=observed_at,
            fetched_at=now,
            is_estimated=bool(estimated),
        )

    def parse_forecast(self, answer: Any) -> list[ForecastPoint]:
        body = expect_object(answer)
        self._check_zone(body)
        rows = require_field(body, "forecast")
        if not isinstance(rows, list):
            raise FetchError("missing_field", "forecast is not a list")
        starts = [
            (
                parse_timestamp(require_field(expect_object(row), "datetime")),
                check_grams_per_kwh(require_field(row, "carbonIntensity")),
            )
            for row in rows
        ]
        return points_from_starts(starts, default_period_seconds=3600.0)


def build(context: BuildContext) -> ElectricityMapsProvider:
    """The provider for the configured zone, its token read from `token_file` now."""
    options = context.options
    token = read_secret_file(options["token_file"], f"{context.key}.token_file")
    url = options.get("url", ELECTRICITYMAPS_URL)
    return ElectricityMapsProvider(context.zone, token, context.http, url)


PROVIDER_TYPE = ProviderType(
    name="electricitymaps",
    options={"token_file": "path", "url": "url"},
    required=("token_file",),
    build=build,
)
