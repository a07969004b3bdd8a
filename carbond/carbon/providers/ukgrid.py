"""The GB Carbon Intensity API (National Grid ESO): national or regional half-hour figures,
now and forecast, with no credentials."""

from __future__ import annotations

from typing import Any

from carbond.carbon.http import HttpClient
from carbond.carbon.intensity import (
    FetchError,
    ForecastPoint,
    Intensity,
    check_grams_per_kwh,
    format_utc,
    parse_timestamp,
    snippet,
)
from carbond.carbon.providers.base import (
    BuildContext,
    ProviderBase,
    ProviderType,
    expect_object,
    require_field,
)

UKGRID_URL = "https://api.carbonintensity.org.uk"
UKGRID_REGIONS = range(1, 18)  # 1..14 DNO regions, 15 England, 16 Scotland, 17 Wales


class UKGridProvider(ProviderBase):
    """National Grid ESO Carbon Intensity API (Great Britain), half-hour periods in UTC.

    National figures carry `actual` once measured (else `forecast`); regional ones are forecast
    only, so they are marked estimated.
    """

    name = "ukgrid"

    def __init__(self, http: HttpClient, url: str = UKGRID_URL, region: int | None = None):
        self.http = http
        self.url = url.rstrip("/")
        self.region = region

    @property
    def zone(self) -> str:
        return "GB" if self.region is None else f"GB-region-{self.region}"

    def describe(self) -> str:
        where = "national" if self.region is None else f"region {self.region}"
        return f"ukgrid {self.url} {where}"

    def _periods(self, body: Any) -> list[dict[str, Any]]:
        """The list of half-hour periods, from the national or the regional shape."""
        data = require_field(expect_object(body), "data")
        if self.region is None:
            if not isinstance(data, list) or not data:
                raise FetchError("missing_field", "no periods")
            return [expect_object(row) for row in data]
        # /regional/regionid/N answers a list of one region; the forecast form an object.
        region = data[0] if isinstance(data, list) and data else data
        region = expect_object(region)
        regionid = region.get("regionid")
        if regionid != self.region:
            raise FetchError(
                "wrong_zone", f"asked for region {self.region}, got {snippet(regionid, 20)}"
            )
        periods = require_field(region, "data")
        if not isinstance(periods, list) or not periods:
            raise FetchError("missing_field", "no periods")
        return [expect_object(row) for row in periods]

    @staticmethod
    def _value(period: dict[str, Any]) -> tuple[float, bool]:
        intensity = expect_object(require_field(period, "intensity"))
        actual = intensity.get("actual")
        if actual is not None:
            return check_grams_per_kwh(actual), False
        return check_grams_per_kwh(require_field(intensity, "forecast")), True

    def fetch(self, now: float) -> Intensity:
        path = "/intensity" if self.region is None else f"/regional/regionid/{self.region}"
        return self.parse_latest(self.http.get_json(f"{self.url}{path}"), now)

    def forecast(self, now: float) -> list[ForecastPoint]:
        start = format_utc(now)
        if self.region is None:
            path = f"/intensity/{start}/fw24h"
        else:
            path = f"/regional/intensity/{start}/fw24h/regionid/{self.region}"
        return self.parse_forecast(self.http.get_json(f"{self.url}{path}"))

    def parse_latest(self, answer: Any, now: float) -> Intensity:
        period = self._periods(answer)[0]
        grams, estimated = self._value(period)
        return Intensity(
            grams_per_kwh=grams,
            zone=self.zone,
            provider=self.name,
            observed_at=parse_timestamp(require_field(period, "from")),
            fetched_at=now,
            is_estimated=estimated or self.region is not None,
        )

    def parse_forecast(self, answer: Any) -> list[ForecastPoint]:
        points = []
        for period in self._periods(answer):
            grams, _ = self._value(period)
            points.append(
                ForecastPoint(
                    start=parse_timestamp(require_field(period, "from")),
                    end=parse_timestamp(require_field(period, "to")),
                    grams_per_kwh=grams,
                )
            )
        return points


def build(context: BuildContext) -> UKGridProvider:
    """National figures unless `region` names one of UKGRID_REGIONS."""
    options = context.options
    return UKGridProvider(context.http, options.get("url", UKGRID_URL), options.get("region"))


PROVIDER_TYPE = ProviderType(
    name="ukgrid",
    options={"url": "url", "region": "ukregion"},
    required=(),
    build=build,
)
