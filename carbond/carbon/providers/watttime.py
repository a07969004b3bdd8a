"""WattTime v3: the marginal operating emission rate (MOER) of a balancing region, now and
forecast, converted from lbs/MWh to g/kWh; logs in with a password and renews its token."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from carbond.carbon.http import HttpClient, with_query
from carbond.carbon.intensity import (
    FetchError,
    ForecastPoint,
    Intensity,
    check_grams_per_kwh,
    lbs_per_mwh_to_grams_per_kwh,
    parse_timestamp,
    snippet,
)
from carbond.carbon.providers.base import (
    BuildContext,
    ProviderBase,
    ProviderType,
    Secret,
    expect_object,
    finite_number,
    points_from_starts,
    read_secret_file,
    require_field,
)

WATTTIME_URL = "https://api.watttime.org"
WATTTIME_TOKEN_SECONDS = 30 * 60
WATTTIME_RENEW_MARGIN_SECONDS = 5 * 60


class WattTimeProvider(ProviderBase):
    """WattTime v3 marginal operating emission rate (MOER, co2_moer), lbs/MWh -> g/kWh.

    The current rate is the first point of `/v3/forecast` with horizon_hours=0 (WattTime's
    documented way to get the real-time MOER). `/v3/signal-index` is a 0-100 percentile, not a
    rate, and is never used.
    """

    name = "watttime"
    marginal = True

    def __init__(
        self,
        username: str,
        password: Secret,
        region: str,
        http: HttpClient,
        url: str = WATTTIME_URL,
    ) -> None:
        self.username = username
        self._password = password
        self.region = region
        self.http = http
        self.url = url.rstrip("/")
        self._token: Secret | None = None
        self._token_expires_at = 0.0

    def describe(self) -> str:
        return f"watttime {self.url} region {self.region} (marginal)"

    def _login(self, now: float) -> Secret:
        if self._token is not None and now < self._token_expires_at - WATTTIME_RENEW_MARGIN_SECONDS:
            return self._token
        pair = f"{self.username}:{self._password.reveal()}".encode()
        basic = base64.b64encode(pair).decode("ascii")
        try:
            answer = self.http.get_json(f"{self.url}/login", {"Authorization": f"Basic {basic}"})
        except FetchError as exc:
            raise FetchError(
                f"login_{exc.reason}", "WattTime login failed", exc.retry_after_seconds
            ) from None
        self._token = Secret(self.parse_login(answer))
        self._token_expires_at = now + WATTTIME_TOKEN_SECONDS
        return self._token

    def _get(self, path: str, params: Mapping[str, str | int], now: float) -> Any:
        url = with_query(f"{self.url}{path}", params)
        for attempt in (1, 2):
            token = self._login(now)
            try:
                return self.http.get_json(url, {"Authorization": f"Bearer {token.reveal()}"})
            except FetchError as exc:
                if exc.reason != "http_401" or attempt == 2:
                    raise
                self._token = None  # expired early or revoked: log in again once
        raise AssertionError("unreachable")

    @staticmethod
    def parse_login(answer: Any) -> str:
        token = expect_object(answer).get("token")
        if not isinstance(token, str) or not token:
            raise FetchError("missing_field", "WattTime login answer has no token")
        return token

    def _forecast_body(self, now: float, horizon_hours: int) -> Any:
        params = {"region": self.region, "signal_type": "co2_moer", "horizon_hours": horizon_hours}
        return self._get("/v3/forecast", params, now)

    def parse_series(self, answer: Any) -> tuple[list[tuple[float, float]], float]:
        """(start, g/kWh) points of a /v3/forecast answer and their period in seconds."""
        body = expect_object(answer)
        meta = expect_object(require_field(body, "meta"))
        units = meta.get("units")
        if units != "lbs_co2_per_mwh":
            raise FetchError("wrong_units", f"expected lbs_co2_per_mwh, got {snippet(units)}")
        signal = meta.get("signal_type", "co2_moer")
        if signal != "co2_moer":
            raise FetchError("wrong_signal", f"expected co2_moer, got {snippet(signal)}")
        region = meta.get("region")
        if region is not None and region != self.region:
            raise FetchError("wrong_zone", f"asked for {self.region}, got {snippet(region)}")
        period = meta.get("data_point_period_seconds", 300)
        try:
            period = finite_number(period)
        except FetchError:
            period = 300.0
        if period <= 0:
            period = 300.0
        data = require_field(body, "data")
        if not isinstance(data, list) or not data:
            raise FetchError("missing_field", "no data points")
        series = []
        for row in data:
            row = expect_object(row)
            lbs = finite_number(require_field(row, "value"))
            grams = check_grams_per_kwh(lbs_per_mwh_to_grams_per_kwh(lbs))
            series.append((parse_timestamp(require_field(row, "point_time")), grams))
        return series, float(period)

    def fetch(self, now: float) -> Intensity:
        return self.parse_latest(self._forecast_body(now, horizon_hours=0), now)

    def forecast(self, now: float) -> list[ForecastPoint]:
        return self.parse_forecast(self._forecast_body(now, horizon_hours=24))

    def parse_latest(self, answer: Any, now: float) -> Intensity:
        series, _ = self.parse_series(answer)
        observed_at, grams = series[0]
        return Intensity(
            grams_per_kwh=grams,
            zone=self.region,
            provider=self.name,
            observed_at=observed_at,
            fetched_at=now,
            is_estimated=False,
            marginal=True,
        )

    def parse_forecast(self, answer: Any) -> list[ForecastPoint]:
        series, period = self.parse_series(answer)
        return points_from_starts(series, default_period_seconds=period)


def build(context: BuildContext) -> WattTimeProvider:
    """The provider for the configured region, its password read from `password_file` now."""
    options = context.options
    password = read_secret_file(options["password_file"], f"{context.key}.password_file")
    url = options.get("url", WATTTIME_URL)
    return WattTimeProvider(options["username"], password, options["region"], context.http, url)


PROVIDER_TYPE = ProviderType(
    name="watttime",
    options={"username": "text", "password_file": "path", "region": "text", "url": "url"},
    required=("username", "password_file", "region"),
    build=build,
)
