"""`carbond intensity` output: the current figure and the forecast table."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.carbon.forecast import Forecast, aggregate, fetch_forecast, lowest_window
from carbond.carbon.http import HttpClient
from carbond.carbon.intensity import FetchError, ForecastPoint, ForecastUnsupported, Intensity
from carbond.carbon.providers import build_providers
from carbond.commands.intensity import format_age, format_current, format_forecast
from tests.fakes.intensity_server import (
    EM_TOKEN,
    WT_PASSWORD,
    WT_USERNAME,
    FakeIntensityServer,
)

NOW = 1_717_000_200.0  # 16:30:00 UTC + 200 s


@pytest.fixture
def server() -> Iterator[FakeIntensityServer]:
    fake = FakeIntensityServer(now=NOW).start()
    yield fake
    fake.stop()


def http() -> HttpClient:
    return HttpClient(0.5, urllib.request.build_opener(urllib.request.ProxyHandler({})))


def points(values: list[float], period: float = 3600.0, start: float = 0.0) -> list[ForecastPoint]:
    return [
        ForecastPoint(start + i * period, start + (i + 1) * period, v) for i, v in enumerate(values)
    ]


def test_lowest_single_period_is_marked():
    table = format_forecast(Forecast("ukgrid", False, points([300, 250, 120, 140, 260])), "GB")
    marked = [line for line in table.splitlines() if line.startswith("* ") and "window" not in line]
    assert len(marked) == 1 and marked[0].rstrip().endswith("120")
    assert "lowest-carbon window: Thu 02:00 to Thu 03:00, mean 120 gCO2e/kWh" in table
    assert "zone GB" in table and "ukgrid" in table


def test_lowest_two_hour_window():
    table = format_forecast(
        Forecast("electricitymaps", False, points([100, 400, 130, 140, 90, 500])),
        "DE",
        window_seconds=7200,
    )
    # 130+140 (mean 135) beats 100+400 and 140+90 (115)? No: 140+90 = 115 is lowest.
    assert "Thu 03:00 to Thu 05:00, mean 115" in table
    assert (
        sum(1 for line in table.splitlines() if line.startswith("* ") and "window" not in line) == 2
    )


def test_marginal_forecast_is_labelled_and_aggregated_hourly():
    five_minute = points([100 + i % 12 for i in range(24 * 12)], period=300)
    table = format_forecast(Forecast("watttime", True, five_minute), "CAISO_NORTH")
    assert table.startswith("marginal grid intensity forecast, watttime")
    rows = [line for line in table.splitlines() if ":" in line[:12] and "window" not in line]
    assert len(rows) == 24  # hourly rows, not 288


def test_aggregate_time_weighted():
    merged = aggregate(points([100, 200, 300, 400], period=1800), 3600)
    assert [(p.start, p.end, p.grams_per_kwh) for p in merged] == [
        (0, 3600, 150.0),
        (3600, 7200, 350.0),
    ]


@given(
    st.lists(st.floats(min_value=0, max_value=3000), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=6),
)
def test_lowest_window_is_the_minimum_mean(values, hours):
    first, last = lowest_window(points(values), hours * 3600)
    if hours >= len(values):
        assert (first, last) == (0, len(values) - 1)
        return
    assert last - first + 1 == hours
    chosen = sum(values[first : last + 1]) / hours
    for start in range(len(values) - hours + 1):
        assert chosen <= sum(values[start : start + hours]) / hours + 1e-6


def test_fetch_forecast_skips_providers_without_one(server, tmp_path: Path):
    providers = build_providers(
        [("constant", {"grams_per_kwh": 10}), ("ukgrid", {"url": server.url})], "GB", http=http()
    )
    forecast = fetch_forecast(providers, NOW)
    assert forecast.provider == "ukgrid"
    assert len(forecast.points) == 6


def test_fetch_forecast_from_electricitymaps_and_watttime(server, tmp_path: Path):
    (tmp_path / "t").write_text(EM_TOKEN)
    (tmp_path / "p").write_text(WT_PASSWORD)
    em = build_providers(
        [("electricitymaps", {"token_file": str(tmp_path / "t"), "url": server.url})],
        "DE",
        http=http(),
    )
    assert fetch_forecast(em, NOW).provider == "electricitymaps"
    wt = build_providers(
        [
            (
                "watttime",
                {
                    "username": WT_USERNAME,
                    "password_file": str(tmp_path / "p"),
                    "region": "CAISO_NORTH",
                    "url": server.url,
                },
            )
        ],
        "US",
        http=http(),
    )
    forecast = fetch_forecast(wt, NOW)
    assert forecast.provider == "watttime" and forecast.marginal


def test_fetch_forecast_errors(server):
    with pytest.raises(ForecastUnsupported):
        fetch_forecast(build_providers([], "DE"), NOW)
    server.modes["uk_fw24h"] = "500"
    with pytest.raises(FetchError) as info:
        fetch_forecast(build_providers([("ukgrid", {"url": server.url})], "GB", http=http()), NOW)
    assert info.value.reason == "http_500"


def test_format_current():
    value = Intensity(453.6, "CAISO_NORTH", "watttime", NOW - 300, NOW, False, True)
    line = format_current(value, NOW)
    assert "453.6 gCO2e/kWh" in line and "zone CAISO_NORTH" in line
    assert "provider watttime" in line and "age 5m00s" in line and "marginal" in line
    average = format_current(Intensity(123.0, "DE", "electricitymaps", NOW - 7300, NOW, True), NOW)
    assert "marginal" not in average and "estimated" in average and "age 2h01m" in average
    assert format_current(None, NOW).startswith("no grid intensity")


def test_format_age():
    assert [format_age(s) for s in (0, 59, 60, 3599, 3600, -5)] == ["0s", "59s", "1m00s", "59m59s",
                                                                   "1h00m", "0s"]  # fmt: skip
