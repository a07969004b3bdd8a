"""Grid carbon-intensity providers behind one small interface, and building them from config.

Every provider answers `fetch(now) -> Intensity` or raises FetchError; network providers also
answer `forecast(now)`. Responses are validated here (shape, zone, units, range) so a bad answer
never replaces a good value: each network provider's `parse_*` functions take a decoded body and
return a value or raise FetchError, whatever the body holds. Credentials live in `Secret`, which
never prints itself.
"""

from __future__ import annotations

import base64
import difflib
import logging
import math
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from carbond.carbon.http import HttpClient, with_query
from carbond.carbon.intensity import (
    FetchError,
    ForecastPoint,
    ForecastUnsupported,
    Intensity,
    check_grams_per_kwh,
    format_utc,
    lbs_per_mwh_to_grams_per_kwh,
    parse_timestamp,
    snippet,
)
from carbond.carbon.static import (
    Tables,
    is_valid_zone,
    load_tables,
    resolve_static,
    split_cloud_zone,
)
from carbond.errors import ConfigError

log = logging.getLogger(__name__)

ELECTRICITYMAPS_URL = "https://api.electricitymaps.com"
WATTTIME_URL = "https://api.watttime.org"
UKGRID_URL = "https://api.carbonintensity.org.uk"
WATTTIME_TOKEN_SECONDS = 30 * 60
WATTTIME_RENEW_MARGIN_SECONDS = 5 * 60
UKGRID_REGIONS = range(1, 18)  # 1..14 DNO regions, 15 England, 16 Scotland, 17 Wales


class Secret:
    """A credential read from a file; repr/str never show it, only `reveal()` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # keep it out of pickles too
        raise TypeError("Secret cannot be pickled")


class Provider(Protocol):
    """One intensity source. `network` False means a local figure: always fresh, never polled."""

    name: str
    marginal: bool
    network: bool

    def fetch(self, now: float) -> Intensity: ...

    def forecast(self, now: float) -> list[ForecastPoint]: ...

    def describe(self) -> str: ...


class _Base:
    name = "base"
    marginal = False
    network = True

    def forecast(self, now: float) -> list[ForecastPoint]:
        raise ForecastUnsupported(f"{self.name} has no forecast")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        return self.name


# ---------------------------------------------------------------- electricitymaps


class ElectricityMapsProvider(_Base):
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
        body = _object(answer)
        zone = self._check_zone(body)
        grams = check_grams_per_kwh(_field(body, "carbonIntensity"))
        observed_at = parse_timestamp(_field(body, "datetime"))
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
        body = _object(answer)
        self._check_zone(body)
        rows = _field(body, "forecast")
        if not isinstance(rows, list):
            raise FetchError("missing_field", "forecast is not a list")
        starts = [
            (
                parse_timestamp(_field(_object(row), "datetime")),
                check_grams_per_kwh(_field(row, "carbonIntensity")),
            )
            for row in rows
        ]
        return points_from_starts(starts, default_period_seconds=3600.0)


# ---------------------------------------------------------------- watttime


class WattTimeProvider(_Base):
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
        token = _object(answer).get("token")
        if not isinstance(token, str) or not token:
            raise FetchError("missing_field", "WattTime login answer has no token")
        return token

    def _forecast_body(self, now: float, horizon_hours: int) -> Any:
        params = {"region": self.region, "signal_type": "co2_moer", "horizon_hours": horizon_hours}
        return self._get("/v3/forecast", params, now)

    def parse_series(self, answer: Any) -> tuple[list[tuple[float, float]], float]:
        """(start, g/kWh) points of a /v3/forecast answer and their period in seconds."""
        body = _object(answer)
        meta = _object(_field(body, "meta"))
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
            period = _number(period)
        except FetchError:
            period = 300.0
        if period <= 0:
            period = 300.0
        data = _field(body, "data")
        if not isinstance(data, list) or not data:
            raise FetchError("missing_field", "no data points")
        series = []
        for row in data:
            row = _object(row)
            lbs = _number(_field(row, "value"))
            grams = check_grams_per_kwh(lbs_per_mwh_to_grams_per_kwh(lbs))
            series.append((parse_timestamp(_field(row, "point_time")), grams))
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


# ---------------------------------------------------------------- ukgrid


class UKGridProvider(_Base):
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
        data = _field(_object(body), "data")
        if self.region is None:
            if not isinstance(data, list) or not data:
                raise FetchError("missing_field", "no periods")
            return [_object(row) for row in data]
        # /regional/regionid/N answers a list of one region; the forecast form an object.
        region = data[0] if isinstance(data, list) and data else data
        region = _object(region)
        regionid = region.get("regionid")
        if regionid != self.region:
            raise FetchError(
                "wrong_zone", f"asked for region {self.region}, got {snippet(regionid, 20)}"
            )
        periods = _field(region, "data")
        if not isinstance(periods, list) or not periods:
            raise FetchError("missing_field", "no periods")
        return [_object(row) for row in periods]

    @staticmethod
    def _value(period: dict[str, Any]) -> tuple[float, bool]:
        intensity = _object(_field(period, "intensity"))
        actual = intensity.get("actual")
        if actual is not None:
            return check_grams_per_kwh(actual), False
        return check_grams_per_kwh(_field(intensity, "forecast")), True

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
            observed_at=parse_timestamp(_field(period, "from")),
            fetched_at=now,
            is_estimated=estimated or self.region is not None,
        )

    def parse_forecast(self, answer: Any) -> list[ForecastPoint]:
        points = []
        for period in self._periods(answer):
            grams, _ = self._value(period)
            points.append(
                ForecastPoint(
                    start=parse_timestamp(_field(period, "from")),
                    end=parse_timestamp(_field(period, "to")),
                    grams_per_kwh=grams,
                )
            )
        return points


# ---------------------------------------------------------------- local figures


class ConstantProvider(_Base):
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


class StaticProvider(_Base):
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


# ---------------------------------------------------------------- response helpers


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FetchError("missing_field", f"expected an object, got {type(value).__name__}")
    return value


def _field(body: Any, key: str) -> Any:
    if not isinstance(body, dict) or key not in body or body[key] is None:
        raise FetchError("missing_field", f"no {key!r}")
    return body[key]


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FetchError("invalid_value", "not a finite number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise FetchError("invalid_value", "not a finite number") from None
    if not math.isfinite(number):
        raise FetchError("invalid_value", "not a finite number")
    return number


def points_from_starts(
    starts: Sequence[tuple[float, float]], default_period_seconds: float
) -> list[ForecastPoint]:
    """Periods from start times only: each ends where the next begins, the last after the
    typical period."""
    ordered = sorted(starts)
    points = []
    for index, (start, grams) in enumerate(ordered):
        end = ordered[index + 1][0] if index + 1 < len(ordered) else start + default_period_seconds
        points.append(ForecastPoint(start, end, grams))
    return points


# ---------------------------------------------------------------- building from config

PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    # option -> expected kind, for validation messages
    "electricitymaps": {"token_file": "path", "url": "url"},
    "watttime": {"username": "text", "password_file": "path", "region": "text", "url": "url"},
    "ukgrid": {"url": "url", "region": "ukregion"},
    "constant": {"grams_per_kwh": "grams"},
    "static": {},
}
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "electricitymaps": ("token_file",),
    "watttime": ("username", "password_file", "region"),
    "ukgrid": (),
    "constant": ("grams_per_kwh",),
    "static": (),
}


def provider_specs_from_config(
    value: Any, key: str = "intensity.providers"
) -> list[tuple[str, dict]]:
    """The YAML list form `[{electricitymaps: {...}}, {static: {}}]` as (name, options) pairs."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of providers, got {type(value).__name__}")
    specs: list[tuple[str, dict]] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            specs.append((item, {}))
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(
                f"{key}[{index}]", "expected one provider name mapping to its options"
            )
        ((name, options),) = item.items()
        specs.append((str(name), options))
    return specs


def build_providers(
    specs: Sequence[tuple[str, Mapping[str, Any] | None]],
    zone: str,
    *,
    http: HttpClient | None = None,
    tables: Tables | None = None,
    key: str = "intensity.providers",
    zone_key: str = "intensity.zone",
) -> list[Provider]:
    """Validate provider options and build the providers in order, `static` always last.

    Raises ConfigError naming the exact key (`intensity.providers[0].electricitymaps.token_file`)
    for unknown providers or options, wrong types, and unreadable credential files.
    """
    if not isinstance(zone, str) or not is_valid_zone(zone):
        raise ConfigError(
            zone_key,
            f"malformed zone {zone!r}: use an Electricity Maps zone "
            "(DE, US-CAL-CISO), an ISO country code, or a cloud region "
            "(aws:eu-west-1, gcp:europe-west4, azure:westeurope)",
        )
    http = http or HttpClient()
    tables = tables or load_tables()
    providers: list[Provider] = []
    seen: set[str] = set()
    for index, (name, raw_options) in enumerate(specs):
        item_key = f"{key}[{index}]"
        if name not in PROVIDER_OPTIONS:
            raise ConfigError(
                item_key,
                f"unknown provider {name!r}{_suggest(name, PROVIDER_OPTIONS)}"
                f" (known: {', '.join(PROVIDER_OPTIONS)})",
            )
        if name in seen:
            raise ConfigError(item_key, f"provider {name!r} is listed twice")
        seen.add(name)
        options = _options(raw_options, name, f"{item_key}.{name}")
        providers.append(_build_one(name, options, zone, http, tables, f"{item_key}.{name}"))
    if "static" not in seen:
        providers.append(StaticProvider(zone, tables))
    elif providers[-1].name != "static":
        log.info("static provider is not last: providers after it are never used")
    return providers


def _options(raw: Mapping[str, Any] | None, name: str, key: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a mapping of options, got {type(raw).__name__}")
    allowed = PROVIDER_OPTIONS[name]
    for option in raw:
        if option not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                f"{key}.{option}",
                f"unknown option{_suggest(str(option), allowed)} (known: {known})",
            )
    for option in REQUIRED_OPTIONS[name]:
        if raw.get(option) is None:
            raise ConfigError(f"{key}.{option}", "required")
    return dict(raw)


def _build_one(
    name: str, options: dict[str, Any], zone: str, http: HttpClient, tables: Tables, key: str
) -> Provider:
    if name == "electricitymaps":
        token = read_secret_file(_text(options, "token_file", key), f"{key}.token_file")
        url = _url(options, ELECTRICITYMAPS_URL, key)
        return ElectricityMapsProvider(zone, token, http, url)
    if name == "watttime":
        username = _text(options, "username", key)
        password = read_secret_file(_text(options, "password_file", key), f"{key}.password_file")
        region = _text(options, "region", key)
        return WattTimeProvider(username, password, region, http, _url(options, WATTTIME_URL, key))
    if name == "ukgrid":
        region = options.get("region")
        if region is not None and (
            isinstance(region, bool) or not isinstance(region, int) or region not in UKGRID_REGIONS
        ):
            raise ConfigError(f"{key}.region", f"expected a region id 1..17, got {region!r}")
        return UKGridProvider(http, _url(options, UKGRID_URL, key), region)
    if name == "constant":
        value = options["grams_per_kwh"]
        try:
            return ConstantProvider(value, zone)
        except FetchError:
            raise ConfigError(
                f"{key}.grams_per_kwh",
                f"expected a number of g/kWh between 0 and 3000, got {value!r}",
            ) from None
    return StaticProvider(zone, tables)


def _text(options: dict[str, Any], option: str, key: str) -> str:
    value = options[option]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{key}.{option}", f"expected a non-empty string, got {type(value).__name__}"
        )
    return value.strip()


def _url(options: dict[str, Any], default: str, key: str) -> str:
    value = options.get("url", default)
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.url", "expected an http:// or https:// URL")
    return value.rstrip("/")


def _suggest(word: str, choices: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_secret_file(path: str, key: str) -> Secret:
    """A token or password from a file (first line, whitespace stripped) or ConfigError.

    The error names the file and the OS reason, never the content.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            value = handle.readline().strip()
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    if mode & stat.S_IROTH:
        log.warning("%s: %s is readable by every user; chmod 600 it", key, path)
    return Secret(value)
