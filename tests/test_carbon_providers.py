"""Intensity providers against a local server answering the real APIs' shapes, and misbehaving."""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from carbond.carbon.http import HttpClient, decode_json, parse_retry_after
from carbond.carbon.intensity import FetchError, ForecastUnsupported
from carbond.carbon.providers import (
    ElectricityMapsProvider,
    Secret,
    StaticProvider,
    UKGridProvider,
    WattTimeProvider,
    build_providers,
)
from tests.fakes.intensity_server import (
    EM_TOKEN,
    WT_PASSWORD,
    WT_TOKEN_PREFIX,
    WT_USERNAME,
    FakeIntensityServer,
)

NOW = 1_717_000_000.0  # a fixed "now" shared by the server's answers and the providers


@pytest.fixture
def server() -> Iterator[FakeIntensityServer]:
    fake = FakeIntensityServer(now=NOW, hang_seconds=2.0).start()
    yield fake
    fake.stop()


@pytest.fixture
def http() -> HttpClient:
    # No proxies (the test machine may have some configured) and a short timeout.
    return HttpClient(timeout_seconds=0.3, opener=urllib.request.build_opener(
        urllib.request.ProxyHandler({})))  # fmt: skip


def em(server: FakeIntensityServer, http: HttpClient, zone: str = "DE") -> ElectricityMapsProvider:
    return ElectricityMapsProvider(zone, Secret(EM_TOKEN), http, server.url)


def wt(server: FakeIntensityServer, http: HttpClient, region: str = "CAISO_NORTH"):
    return WattTimeProvider(WT_USERNAME, Secret(WT_PASSWORD), region, http, server.url)


# ------------------------------------------------------------------ electricitymaps


def test_electricitymaps_latest(server, http):
    value = em(server, http).fetch(NOW)
    assert value.grams_per_kwh == 123.0
    assert value.zone == "DE"
    assert value.provider == "electricitymaps"
    assert value.observed_at == NOW - NOW % 3600
    assert value.fetched_at == NOW
    assert value.is_estimated is False and value.marginal is False
    request = server.requests[-1]
    assert request.path == "/v3/carbon-intensity/latest"
    assert request.query == {"zone": "DE"}
    assert request.headers["auth-token"] == EM_TOKEN


def test_electricitymaps_estimated_flag(server, http):
    server.em_is_estimated = True
    assert em(server, http).fetch(NOW).is_estimated is True


def test_electricitymaps_cloud_region_uses_data_center_params(server, http):
    value = em(server, http, "aws:eu-west-1").fetch(NOW)
    assert value.zone == "IE"
    assert server.requests[-1].query == {
        "dataCenterProvider": "aws",
        "dataCenterRegion": "eu-west-1",
        "shouldUseFallbackCallerLookup": "false",
    }


def test_electricitymaps_wrong_token_is_an_http_error(server, http):
    provider = ElectricityMapsProvider("DE", Secret("not-the-token"), http, server.url)
    with pytest.raises(FetchError) as info:
        provider.fetch(NOW)
    assert info.value.reason == "http_401"


BAD_MODES = [
    ("500", "http_500"),
    ("timeout", "timeout"),
    ("429", "rate_limited"),
    ("garbage", "bad_json"),
    ("html", "html"),
    ("empty", "bad_json"),
    ("truncated", "bad_json"),
    ("short_read", "bad_json"),
    ("wrong_zone", "wrong_zone"),
    ("negative", "invalid_value"),
    ("nan", "bad_json"),  # NaN is not JSON: rejected while decoding
    ("huge", "invalid_value"),
    ("string_value", "invalid_value"),
    ("missing", "missing_field"),
]


@pytest.mark.parametrize(("mode", "reason"), BAD_MODES)
def test_electricitymaps_rejects_bad_answers(server, http, mode, reason):
    server.modes["em_latest"] = mode
    with pytest.raises(FetchError) as info:
        em(server, http).fetch(NOW)
    assert info.value.reason == reason


def test_timeout_is_bounded_by_the_request_timeout(server, http):
    server.modes["em_latest"] = "timeout"
    started = time.monotonic()
    with pytest.raises(FetchError):
        em(server, http).fetch(NOW)
    assert time.monotonic() - started < 1.5  # server hangs 2 s, client gives up at 0.3 s


def test_429_carries_retry_after(server, http):
    server.modes["em_latest"] = "429"
    server.retry_after = "120"
    with pytest.raises(FetchError) as info:
        em(server, http).fetch(NOW)
    assert info.value.retry_after_seconds == 120.0


def test_retry_after_forms():
    assert parse_retry_after("30", 0.0) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412420.0) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412500.0) == 0.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None
    assert parse_retry_after("99999999", 0.0) == 86400.0
    assert parse_retry_after("\u00b2", 0.0) is None  # str.isdigit() says yes; float() says no
    assert parse_retry_after("\u0663", 0.0) is None  # ARABIC-INDIC DIGIT THREE


def test_decode_json_tells_html_from_json():
    assert decode_json(b'{"a": 1}') == {"a": 1}
    with pytest.raises(FetchError) as info:
        decode_json(b"  <html><body>Sorry</body></html>")
    assert info.value.reason == "html"
    with pytest.raises(FetchError) as info:
        decode_json(b'{"a": Infinity}')
    assert info.value.reason == "bad_json"


def test_electricitymaps_forecast(server, http):
    points = em(server, http).forecast(NOW)
    assert [p.grams_per_kwh for p in points] == [300, 250, 120, 140, 260, 310]
    assert all(p.end - p.start == 3600 for p in points)
    assert server.requests[-1].path == "/v3/carbon-intensity/forecast"


# ------------------------------------------------------------------ watttime


def test_watttime_converts_lbs_per_mwh_and_is_marginal(server, http):
    server.wt_lbs_per_mwh = 1000.0
    value = wt(server, http).fetch(NOW)
    assert value.grams_per_kwh == pytest.approx(453.59237)
    assert value.marginal is True
    assert value.zone == "CAISO_NORTH"
    assert value.provider == "watttime"
    forecast = [r for r in server.requests if r.route == "wt_forecast"][-1]
    assert forecast.query == {
        "region": "CAISO_NORTH",
        "signal_type": "co2_moer",
        "horizon_hours": "0",
    }
    assert "wt_signal_index" not in server.routes_hit()


def test_watttime_logs_in_with_basic_auth_and_reuses_the_token(server, http):
    provider = wt(server, http)
    provider.fetch(NOW)
    provider.fetch(NOW + 20 * 60)  # within 30 min minus the renewal margin
    assert server.routes_hit().count("wt_login") == 1
    login = server.requests[0]
    assert login.headers["authorization"].startswith("Basic ")
    assert server.requests[1].headers["authorization"] == f"Bearer {WT_TOKEN_PREFIX}1"


def test_watttime_renews_the_token_before_expiry(server, http):
    provider = wt(server, http)
    provider.fetch(NOW)
    provider.fetch(NOW + 26 * 60)  # past 30 min - 5 min margin
    assert server.routes_hit().count("wt_login") == 2
    assert server.requests[-1].headers["authorization"] == f"Bearer {WT_TOKEN_PREFIX}2"


def test_watttime_logs_in_again_after_401(server, http):
    provider = wt(server, http)
    provider.fetch(NOW)
    server.modes["wt_forecast"] = "401"
    with pytest.raises(FetchError) as info:
        provider.fetch(NOW + 60)
    assert info.value.reason == "http_401"
    assert server.routes_hit().count("wt_login") == 2  # one retry with a fresh token, no loop


def test_watttime_login_failure(server, http):
    server.modes["wt_login"] = "500"
    with pytest.raises(FetchError) as info:
        wt(server, http).fetch(NOW)
    assert info.value.reason == "login_http_500"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("wrong_units", "wrong_units"), ("wrong_zone", "wrong_zone"), ("missing", "missing_field"),
     ("negative", "invalid_value"), ("huge", "invalid_value"), ("html", "html")],
)  # fmt: skip
def test_watttime_rejects_bad_answers(server, http, mode, reason):
    server.modes["wt_forecast"] = mode
    with pytest.raises(FetchError) as info:
        wt(server, http).fetch(NOW)
    assert info.value.reason == reason


def test_watttime_rate_above_3000_g_after_conversion_is_rejected(server, http):
    server.wt_lbs_per_mwh = 7000.0  # 3175 g/kWh
    with pytest.raises(FetchError) as info:
        wt(server, http).fetch(NOW)
    assert info.value.reason == "invalid_value"
    server.wt_lbs_per_mwh = 6000.0  # 2722 g/kWh: a (bad) marginal plant, but plausible
    assert wt(server, http).fetch(NOW).grams_per_kwh == pytest.approx(2721.55422)


def test_watttime_forecast_uses_five_minute_points(server, http):
    points = wt(server, http).forecast(NOW)
    assert len(points) == 24 * 12
    assert all(p.end - p.start == 300 for p in points)
    assert points[0].grams_per_kwh == pytest.approx(600 * 0.45359237)
    assert server.requests[-1].query["horizon_hours"] == "24"


# ------------------------------------------------------------------ ukgrid


def test_ukgrid_national_prefers_actual(server, http):
    value = UKGridProvider(http, server.url).fetch(NOW)
    assert value.grams_per_kwh == 180.0
    assert value.is_estimated is False
    assert value.zone == "GB"
    assert value.observed_at == NOW - NOW % 1800
    assert server.requests[-1].path == "/intensity"


def test_ukgrid_national_falls_back_to_forecast(server, http):
    server.uk_actual = None
    value = UKGridProvider(http, server.url).fetch(NOW)
    assert value.grams_per_kwh == 190.0
    assert value.is_estimated is True


def test_ukgrid_regional(server, http):
    value = UKGridProvider(http, server.url, region=13).fetch(NOW)
    assert value.grams_per_kwh == 95.0
    assert value.zone == "GB-region-13"
    assert value.is_estimated is True
    assert server.requests[-1].path == "/regional/regionid/13"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("wrong_zone", "wrong_zone"), ("negative", "invalid_value"), ("500", "http_500"),
     ("truncated", "bad_json")],
)  # fmt: skip
def test_ukgrid_regional_rejects_bad_answers(server, http, mode, reason):
    server.modes["uk_regional"] = mode
    with pytest.raises(FetchError) as info:
        UKGridProvider(http, server.url, region=13).fetch(NOW)
    assert info.value.reason == reason


def test_ukgrid_missing_intensity(server, http):
    server.modes["uk_intensity"] = "missing"
    with pytest.raises(FetchError) as info:
        UKGridProvider(http, server.url).fetch(NOW)
    assert info.value.reason == "missing_field"


def test_ukgrid_forecast_paths(server, http):
    points = UKGridProvider(http, server.url).forecast(NOW)
    assert server.requests[-1].path.startswith("/intensity/")
    assert server.requests[-1].path.endswith("Z/fw24h")
    assert [p.grams_per_kwh for p in points] == [300, 250, 120, 140, 260, 310]
    assert all(p.end - p.start == 1800 for p in points)
    regional = UKGridProvider(http, server.url, region=13).forecast(NOW)
    assert server.requests[-1].path.endswith("/fw24h/regionid/13")
    assert len(regional) == 6


# ------------------------------------------------------------------ local providers


def test_static_has_no_forecast():
    with pytest.raises(ForecastUnsupported):
        StaticProvider("DE").forecast(NOW)


def test_constant_provider_is_always_now():
    (constant, static) = build_providers([("constant", {"grams_per_kwh": 42})], "DE")
    value = constant.fetch(NOW)
    assert (value.grams_per_kwh, value.provider, value.observed_at) == (42.0, "constant", NOW)
    assert static.name == "static"


# ------------------------------------------------------------------ token hygiene


def _all_text(caplog, *objects: object) -> str:
    return caplog.text + "\n".join(repr(o) + str(o) for o in objects)


@pytest.mark.parametrize("mode", ["ok", "500", "timeout", "429", "401", "garbage", "html"])
def test_tokens_never_appear_in_logs_errors_or_repr(server, http, tmp_path: Path, caplog, mode):
    caplog.set_level(logging.DEBUG)
    (tmp_path / "em.token").write_text(EM_TOKEN + "\n")
    (tmp_path / "wt.password").write_text(WT_PASSWORD + "\n")
    specs = [
        ("electricitymaps", {"token_file": str(tmp_path / "em.token"), "url": server.url}),
        ("watttime", {"username": WT_USERNAME, "password_file": str(tmp_path / "wt.password"),
                      "region": "CAISO_NORTH", "url": server.url}),
    ]  # fmt: skip
    providers = build_providers(specs, "DE", http=http)
    if mode == "ok":
        server.modes["em_latest"] = "ok"
    else:
        server.set_all(mode)
    seen: list[object] = [providers, [p.describe() for p in providers]]
    for provider in providers[:2]:
        try:
            seen.append(provider.fetch(NOW))
        except FetchError as exc:
            seen.extend([exc, exc.args, exc.detail])
            logging.getLogger("test").exception("fetch failed")  # the traceback text too
    from carbond.carbon.refresher import IntensityFeed

    feed = IntensityFeed(providers, "DE", state_dir=tmp_path / "state", clock=lambda: NOW)
    feed.refresh_now()
    seen.extend([feed.current(), feed.fetch_errors()])
    text = _all_text(caplog, *seen)
    for secret in (EM_TOKEN, WT_PASSWORD, WT_TOKEN_PREFIX):
        assert secret not in text
    cache = tmp_path / "state" / "intensity-cache.json"
    if cache.exists():
        assert EM_TOKEN not in cache.read_text() and WT_TOKEN_PREFIX not in cache.read_text()
    if mode != "ok":
        assert "fetch failed" in caplog.text  # the failure path really ran


def test_secret_repr_and_pickle():
    secret = Secret("hunter2-secret")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret.reveal() == "hunter2-secret"


def test_nan_value_in_object_is_rejected():
    from carbond.carbon.intensity import check_grams_per_kwh

    for bad in (math.nan, math.inf, -1.0, 3000.5, "100", None, True):
        with pytest.raises(FetchError):
            check_grams_per_kwh(bad)
    assert check_grams_per_kwh(0) == 0.0
    assert check_grams_per_kwh(3000) == 3000.0
