"""Zone defaulting from fake tz trees, zone validation, and the DMI cloud hint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carbond.carbon.zone import (
    cloud_hint_sentence,
    cloud_vendor_hint,
    default_zone,
    resolve_zone,
    system_time_zone,
    validate_zone,
)
from carbond.types import ConfigError

ZONE_TAB = """\
# tzdb timezone descriptions (test copy)
#country-
#code\tcoordinates\tTZ\tcomments
DE\t+5230+01322\tEurope/Berlin\tmost of Germany
GB\t+513030-0000731\tEurope/London
US\t+340308-1181434\tAmerica/Los_Angeles\tPacific
UA\t+5026+03031\tEurope/Kyiv\tmost of Ukraine
"""


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    etc = tmp_path / "etc"
    zoneinfo = tmp_path / "usr/share/zoneinfo"
    etc.mkdir()
    for name in ("Europe/Berlin", "Europe/London", "America/Los_Angeles", "Etc/UTC", "Europe/Kyiv"):
        (zoneinfo / name).parent.mkdir(parents=True, exist_ok=True)
        (zoneinfo / name).write_bytes(b"TZif")
    (zoneinfo / "zone.tab").write_text(ZONE_TAB)
    (zoneinfo / "US").mkdir()
    os.symlink(zoneinfo / "America/Los_Angeles", zoneinfo / "US/Pacific")
    os.symlink("Kyiv", zoneinfo / "Europe/Kiev")  # relative, as tzdata has it
    return etc, zoneinfo


def test_etc_timezone_wins(tree):
    etc, zoneinfo = tree
    (etc / "timezone").write_text("Europe/Berlin\n")
    os.symlink(zoneinfo / "Europe/London", etc / "localtime")
    choice = default_zone(etc, zoneinfo)
    assert choice.zone == "DE"
    assert "Europe/Berlin" in choice.how and "DE" in choice.how


def test_localtime_symlink(tree):
    etc, zoneinfo = tree
    os.symlink(zoneinfo / "Europe/London", etc / "localtime")
    assert system_time_zone(etc, zoneinfo) == "Europe/London"
    assert default_zone(etc, zoneinfo).zone == "GB"


def test_relative_localtime_symlink(tree):
    etc, zoneinfo = tree
    os.symlink("../usr/share/zoneinfo/Europe/Berlin", etc / "localtime")
    assert default_zone(etc, zoneinfo).zone == "DE"


def test_utc_host_uses_world(tree):
    etc, zoneinfo = tree
    os.symlink(zoneinfo / "Etc/UTC", etc / "localtime")
    choice = default_zone(etc, zoneinfo)
    assert choice.zone == "WORLD"
    assert "Etc/UTC" in choice.how and "world average" in choice.how


def test_no_time_zone_at_all(tree):
    etc, zoneinfo = tree
    choice = default_zone(etc, zoneinfo)
    assert choice.zone == "WORLD"
    assert "no system time zone" in choice.how


def test_missing_zone_tab(tree):
    etc, zoneinfo = tree
    (etc / "timezone").write_text("Europe/Berlin\n")
    (zoneinfo / "zone.tab").unlink()
    choice = default_zone(etc, zoneinfo)
    assert choice.zone == "WORLD"
    assert "unreadable" in choice.how


@pytest.mark.parametrize(("name", "country"), [("US/Pacific", "US"), ("Europe/Kiev", "UA")])
def test_backward_links_resolve(tree, name, country):
    etc, zoneinfo = tree
    (etc / "timezone").write_text(name + "\n")
    assert default_zone(etc, zoneinfo).zone == country


def test_unknown_tz_name(tree):
    etc, zoneinfo = tree
    (etc / "timezone").write_text("Mars/Olympus_Mons\n")
    assert default_zone(etc, zoneinfo).zone == "WORLD"


def test_configured_zone_wins(tree):
    etc, zoneinfo = tree
    (etc / "timezone").write_text("Europe/Berlin\n")
    choice = resolve_zone("aws:eu-west-1", etc_root=etc, zoneinfo_root=zoneinfo)
    assert choice.zone == "aws:eu-west-1"
    assert "intensity.zone" in choice.how
    assert resolve_zone(None, etc_root=etc, zoneinfo_root=zoneinfo).zone == "DE"


@pytest.mark.parametrize(
    "zone", ["DE", "US-CAL-CISO", "WORLD", "DK-DK1", "aws:eu-west-1", "gcp:europe-west4",
             "azure:westeurope", "GB"],
)  # fmt: skip
def test_valid_zones(zone):
    assert validate_zone(zone) == zone


@pytest.mark.parametrize(
    "zone", ["", "D", "de/../x", "aws:", "oracle:eu-1", "US CAL", 42, None, "aws:EU_WEST"]
)
def test_malformed_zones(zone):
    with pytest.raises(ConfigError) as info:
        validate_zone(zone, "--zone")
    assert info.value.key == "--zone"
    assert "malformed zone" in info.value.problem


@pytest.mark.parametrize(
    ("vendor", "hint"),
    [("Amazon EC2\n", "Amazon EC2 (AWS)"), ("Google\n", "Google Compute Engine (GCP)"),
     ("Microsoft Corporation\n", "Microsoft Azure"), ("Dell Inc.\n", None), ("QEMU\n", None)],
)  # fmt: skip
def test_cloud_vendor_hint(tmp_path, vendor, hint):
    (tmp_path / "sys_vendor").write_text(vendor)
    assert cloud_vendor_hint(tmp_path) == hint
    sentence = cloud_hint_sentence(tmp_path)
    assert (sentence is None) == (hint is None)
    if sentence:
        assert hint in sentence and "intensity.zone" in sentence


def test_cloud_vendor_hint_without_dmi(tmp_path):
    assert cloud_vendor_hint(tmp_path / "missing") is None
