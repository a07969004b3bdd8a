"""The embedded tables, cloud-region mapping, emissions arithmetic and config validation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.carbon.emissions import grams
from carbond.carbon.intensity import Intensity, lbs_per_mwh_to_grams_per_kwh
from carbond.carbon.providers import (
    ConstantProvider,
    ElectricityMapsProvider,
    StaticProvider,
    UKGridProvider,
    WattTimeProvider,
    build_providers,
    provider_specs_from_config,
)
from carbond.carbon.static import load_tables, resolve_static
from carbond.types import ConfigError

TABLES = load_tables()


def test_package_data_ships_with_attribution():
    data = resources.files("carbond.carbon").joinpath("data")
    countries = data.joinpath("grid-intensity-by-country.csv").read_text()
    regions = data.joinpath("cloud-regions.csv").read_text()
    assert (
        countries.startswith("#") and "CC BY 4.0" in countries and "Our World in Data" in countries
    )
    assert regions.startswith("#")
    assert TABLES.countries["WORLD"].grams_per_kwh == 480.0
    assert len(TABLES.countries) > 200 and len(TABLES.cloud_regions) > 60


@pytest.mark.parametrize(
    ("zone", "iso2", "grams_per_kwh"),
    [
        ("DE", "DE", 380.9),
        ("de", "DE", 380.9),
        ("US-CAL-CISO", "US", 369.5),
        ("GB", "GB", 237.6),
        ("gcp:europe-west4", "NL", TABLES.countries["NL"].grams_per_kwh),
        ("aws:eu-west-1", "IE", TABLES.countries["IE"].grams_per_kwh),
        ("aws:eu-central-1", "DE", 380.9),
        ("azure:westeurope", "NL", TABLES.countries["NL"].grams_per_kwh),
        ("XX-YY", "WORLD", 480.0),
        ("WORLD", "WORLD", 480.0),
        ("aws:mars-north-1", "WORLD", 480.0),
    ],
)
def test_static_lookup(zone, iso2, grams_per_kwh):
    lookup = resolve_static(zone, TABLES)
    assert (lookup.iso2, lookup.grams_per_kwh) == (iso2, grams_per_kwh)
    assert lookup.how


def test_static_provider_value_is_fresh_and_labelled_by_country():
    value = StaticProvider("US-CAL-CISO", TABLES).fetch(1000.0)
    assert (value.zone, value.provider, value.grams_per_kwh) == ("US", "static", 369.5)
    assert value.age_seconds(1000.0) == 0


# ------------------------------------------------------------------ emissions


def test_grams_one_kwh():
    assert grams(3.6e6, 123.0, 1.0) == pytest.approx(123.0)
    assert grams(3.6e6, 123.0, 1.5) == pytest.approx(184.5)


@given(st.floats(min_value=0, max_value=10_000))
def test_lbs_per_mwh_conversion(lbs):
    # 1 lb = 453.59237 g, 1 MWh = 1000 kWh
    assert lbs_per_mwh_to_grams_per_kwh(lbs) == pytest.approx(lbs * 453.59237 / 1000)


def test_intensity_json_round_trip():
    value = Intensity(123.0, "DE", "electricitymaps", 10.0, 20.0, True, False)
    assert Intensity.from_json(value.to_json()) == value
    with pytest.raises(ValueError):
        Intensity.from_json({"grams_per_kwh": 1.0})


# ------------------------------------------------------------------ build_providers


@pytest.fixture
def token(tmp_path: Path) -> str:
    path = tmp_path / "em.token"
    path.write_text("tok\n")
    path.chmod(0o600)
    return str(path)


def test_build_all_providers_in_order(tmp_path, token):
    password = tmp_path / "pw"
    password.write_text("pw\n")
    specs = [
        ("electricitymaps", {"token_file": token, "url": "http://127.0.0.1:1/"}),
        ("watttime", {"username": "u", "password_file": str(password), "region": "CAISO_NORTH"}),
        ("ukgrid", {"region": 13}),
        ("constant", {"grams_per_kwh": 50}),
    ]
    providers = build_providers(specs, "DE")
    assert [type(p) for p in providers] == [
        ElectricityMapsProvider, WattTimeProvider, UKGridProvider, ConstantProvider, StaticProvider,
    ]  # fmt: skip
    assert providers[0].url == "http://127.0.0.1:1"
    assert providers[1].url == "https://api.watttime.org"
    assert providers[2].url == "https://api.carbonintensity.org.uk"
    assert providers[1].marginal and not providers[0].marginal


def test_static_is_not_appended_twice():
    providers = build_providers([("static", {}), ("ukgrid", None)], "DE")
    assert [p.name for p in providers] == ["static", "ukgrid"]


def test_yaml_provider_list():
    specs = provider_specs_from_config([{"electricitymaps": {"token_file": "x"}}, {"static": {}}])
    assert specs == [("electricitymaps", {"token_file": "x"}), ("static", {})]
    with pytest.raises(ConfigError) as info:
        provider_specs_from_config([{"a": {}, "b": {}}])
    assert info.value.key == "intensity.providers[0]"


@pytest.mark.parametrize(
    ("specs", "key", "words"),
    [
        ([("electricitymap", {})], "intensity.providers[0]", "did you mean 'electricitymaps'"),
        ([("static", {}), ("electricitymaps", {"token_fil": "x"})],
         "intensity.providers[1].electricitymaps.token_fil", "did you mean 'token_file'"),
        ([("electricitymaps", {})],
         "intensity.providers[0].electricitymaps.token_file", "required"),
        ([("electricitymaps", {"token_file": "/nonexistent/em.token"})],
         "intensity.providers[0].electricitymaps.token_file", "No such file"),
        ([("electricitymaps", {"token_file": 5})],
         "intensity.providers[0].electricitymaps.token_file", "expected a non-empty string"),
        ([("ukgrid", {"region": "13"})], "intensity.providers[0].ukgrid.region", "1..17"),
        ([("ukgrid", {"region": True})], "intensity.providers[0].ukgrid.region", "1..17"),
        ([("ukgrid", {"region": 18})], "intensity.providers[0].ukgrid.region", "1..17"),
        ([("ukgrid", {"url": "ftp://x"})], "intensity.providers[0].ukgrid.url", "http"),
        ([("constant", {"grams_per_kwh": 4000})],
         "intensity.providers[0].constant.grams_per_kwh", "between 0 and 3000"),
        ([("constant", {"grams_per_kwh": "lots"})],
         "intensity.providers[0].constant.grams_per_kwh", "between 0 and 3000"),
        ([("constant", {"grams_per_kwh": -1})],
         "intensity.providers[0].constant.grams_per_kwh", "between 0 and 3000"),
        ([("constant", {})], "intensity.providers[0].constant.grams_per_kwh", "required"),
        ([("watttime", {"username": "u", "region": "X"})],
         "intensity.providers[0].watttime.password_file", "required"),
        ([("static", {"zone": "DE"})], "intensity.providers[0].static.zone", "unknown option"),
        ([("static", []),], "intensity.providers[0].static", "expected a mapping"),
        ([("static", {}), ("static", {})], "intensity.providers[1]", "listed twice"),
    ],
)  # fmt: skip
def test_bad_provider_config(specs, key, words):
    with pytest.raises(ConfigError) as info:
        build_providers(specs, "DE")
    assert info.value.key == key
    assert words in info.value.problem


def test_empty_token_file(tmp_path):
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(ConfigError) as info:
        build_providers([("electricitymaps", {"token_file": str(path)})], "DE")
    assert "empty" in info.value.problem


def test_token_content_is_not_in_config_errors(tmp_path):
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe secret-bytes")
    with pytest.raises(ConfigError) as info:
        build_providers([("electricitymaps", {"token_file": str(path)})], "DE")
    assert "secret-bytes" not in str(info.value)


def test_world_readable_token_warns(tmp_path, caplog):
    path = tmp_path / "tok"
    path.write_text("tok")
    path.chmod(0o644)
    build_providers([("electricitymaps", {"token_file": str(path)})], "DE")
    assert "readable by every user" in caplog.text


def test_malformed_zone_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        build_providers([], "not a zone")
    assert info.value.key == "intensity.zone"
