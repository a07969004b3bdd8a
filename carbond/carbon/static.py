"""The embedded per-country table and cloud-region map, and how zones resolve against them.

Data: Our World in Data / Ember (CC BY 4.0) per-country annual figures, and the public cloud
providers' region lists; both ship as package data under carbond/carbon/data/ with their
attribution headers. Lookups are pure functions over the parsed tables.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from importlib import resources

WORLD = "WORLD"

_ZONE_RE = re.compile(r"^[A-Za-z]{2,5}(?:[-_][A-Za-z0-9]{1,12}){0,4}$")
_CLOUD_RE = re.compile(r"^(aws|gcp|azure):([a-z0-9][a-z0-9-]{1,40})$")


@dataclass(frozen=True)
class CountryFigure:
    iso2: str
    country: str
    grams_per_kwh: float
    year: int


@dataclass(frozen=True)
class Tables:
    """Parsed package data: ISO2 (and WORLD) -> figure, (provider, region) -> ISO2."""

    countries: dict[str, CountryFigure]
    cloud_regions: dict[tuple[str, str], str]


def _data_text(name: str) -> str:
    return resources.files("carbond.carbon").joinpath("data", name).read_text(encoding="utf-8")


def _rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def parse_countries(text: str) -> dict[str, CountryFigure]:
    table: dict[str, CountryFigure] = {}
    for row in _rows(text):
        iso2 = row["iso2"].strip().upper()
        table[iso2] = CountryFigure(
            iso2=iso2,
            country=row["country"].strip(),
            grams_per_kwh=float(row["gco2e_per_kwh"]),
            year=int(row["year"]),
        )
    if WORLD not in table:
        raise ValueError("country table has no WORLD row")
    return table


def parse_cloud_regions(text: str) -> dict[tuple[str, str], str]:
    return {
        (row["provider"].strip().lower(), row["region"].strip().lower()): row["iso2"]
        .strip()
        .upper()
        for row in _rows(text)
    }


def load_tables() -> Tables:
    """Read the shipped CSVs (a few kB; callers keep the result rather than a module global)."""
    return Tables(
        countries=parse_countries(_data_text("grid-intensity-by-country.csv")),
        cloud_regions=parse_cloud_regions(_data_text("cloud-regions.csv")),
    )


def is_valid_zone(zone: str) -> bool:
    """An Electricity Maps style zone (DE, US-CAL-CISO, WORLD) or a cloud region (aws:eu-west-1)."""
    return bool(_ZONE_RE.match(zone) or _CLOUD_RE.match(zone))


def split_cloud_zone(zone: str) -> tuple[str, str] | None:
    """('aws', 'eu-west-1') for 'aws:eu-west-1', None for a grid zone."""
    match = _CLOUD_RE.match(zone)
    return (match.group(1), match.group(2)) if match else None


@dataclass(frozen=True)
class StaticLookup:
    """Which table row a zone resolved to and how (the `how` goes into `carbond check`)."""

    iso2: str
    grams_per_kwh: float
    how: str


def resolve_static(zone: str, tables: Tables) -> StaticLookup:
    """Map any zone to a table row: exact ISO2, EM sub-zone to its country, cloud region to its
    country, and anything unknown to the world average."""
    countries = tables.countries
    cloud = split_cloud_zone(zone)
    if cloud is not None:
        iso2 = tables.cloud_regions.get(cloud)
        if iso2 is None:
            return _world(countries, f"cloud region {zone} is not in the region table")
        if iso2 not in countries:
            return _world(countries, f"cloud region {zone} is in {iso2}, which has no figure")
        return _row(countries[iso2], f"cloud region {zone} is in {iso2}")
    key = zone.strip().upper()
    if key in countries:
        return _row(countries[key], "annual country average")
    country = re.split(r"[-_]", key, maxsplit=1)[0]
    if country != key and country in countries:
        return _row(countries[country], f"zone {zone} falls back to its country {country}")
    return _world(countries, f"zone {zone} is not in the country table")


def _row(figure: CountryFigure, how: str) -> StaticLookup:
    return StaticLookup(
        figure.iso2, figure.grams_per_kwh, f"{how} ({figure.country}, {figure.year})"
    )


def _world(countries: dict[str, CountryFigure], why: str) -> StaticLookup:
    world = countries[WORLD]
    return StaticLookup(WORLD, world.grams_per_kwh, f"{why}: world average ({world.year})")
