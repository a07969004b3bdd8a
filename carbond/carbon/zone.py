"""Choosing the grid zone when none is configured, and hinting at the cloud we run in.

The system time zone is a cheap, offline, usually right guess of the country a server sits in
(tz database `zone.tab` maps each zone to one country). UTC-configured hosts, common in fleets,
fall back to the world average, and `carbond check` says so. Roots are injectable for tests.
Instance-metadata addresses are never contacted: the DMI vendor string is a local hint only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from carbond.carbon.static import WORLD, is_valid_zone
from carbond.types import ConfigError, shown

CLOUD_VENDORS = {
    "amazon ec2": "Amazon EC2 (AWS)",
    "amazon": "Amazon EC2 (AWS)",
    "google": "Google Compute Engine (GCP)",
    "microsoft corporation": "Microsoft Azure",
}
CLOUD_ZONE_PREFIX = {
    "Amazon EC2 (AWS)": "aws",
    "Google Compute Engine (GCP)": "gcp",
    "Microsoft Azure": "azure",
}


@dataclass(frozen=True)
class ZoneChoice:
    zone: str
    how: str  # one sentence for `carbond check`


def validate_zone(zone: object, key: str = "intensity.zone") -> str:
    """A well-formed zone or ConfigError naming `key` (bad input exits with status 2)."""
    if not isinstance(zone, str) or not is_valid_zone(zone.strip()):
        raise ConfigError(
            key,
            f"malformed zone {shown(zone)}: use an Electricity Maps zone (DE, "
            "US-CAL-CISO), an ISO country code, or a cloud region "
            "(aws:eu-west-1, gcp:europe-west4, azure:westeurope)",
        )
    return zone.strip()


def system_time_zone(
    etc_root: str | os.PathLike[str] = "/etc",
    zoneinfo_root: str | os.PathLike[str] = "/usr/share/zoneinfo",
) -> str | None:
    """The tz name (Europe/Berlin) from /etc/timezone, else the /etc/localtime link target."""
    etc = Path(etc_root)
    try:
        name = (etc / "timezone").read_text(encoding="utf-8").strip().splitlines()[0].strip()
        if name:
            return name
    except (OSError, UnicodeDecodeError, IndexError):
        pass
    try:
        target = os.readlink(etc / "localtime")
    except OSError:
        return None
    return tz_name_from_path(target, zoneinfo_root)


def tz_name_from_path(target: str, zoneinfo_root: str | os.PathLike[str]) -> str | None:
    """'../usr/share/zoneinfo/Europe/Berlin' -> 'Europe/Berlin' (also under a fake root)."""
    root = str(zoneinfo_root).rstrip("/") + "/"
    if target.startswith(root):
        return target[len(root) :] or None
    marker = "zoneinfo/"
    if marker in target:
        return target.split(marker, 1)[1] or None
    return None


def zone_tab_countries(
    zoneinfo_root: str | os.PathLike[str] = "/usr/share/zoneinfo",
) -> dict[str, str]:
    """tz name -> ISO 3166 country code, from zone.tab (one country per zone)."""
    table: dict[str, str] = {}
    text = (Path(zoneinfo_root) / "zone.tab").read_text(encoding="utf-8")
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) >= 3:
            table[fields[2].strip()] = fields[0].strip().upper()
    return table


def default_zone(
    etc_root: str | os.PathLike[str] = "/etc",
    zoneinfo_root: str | os.PathLike[str] = "/usr/share/zoneinfo",
) -> ZoneChoice:
    """The country of the system time zone, else WORLD, with the reason in words."""
    name = system_time_zone(etc_root, zoneinfo_root)
    if name is None:
        return ZoneChoice(
            WORLD, "no zone configured and no system time zone found: using the world average"
        )
    try:
        countries = zone_tab_countries(zoneinfo_root)
    except (OSError, UnicodeDecodeError):
        return ZoneChoice(
            WORLD,
            f"no zone configured; system time zone {name}, but "
            f"{Path(zoneinfo_root) / 'zone.tab'} is unreadable: "
            "using the world average",
        )
    country = countries.get(name)
    if country is None:
        # A link such as US/Pacific or Europe/Kiev: follow it to the canonical name.
        link = Path(zoneinfo_root) / name
        if link.is_symlink():
            canonical = tz_name_from_path(str(link.resolve()), Path(zoneinfo_root).resolve())
            if canonical is not None:
                country = countries.get(canonical)
    if country is None:
        return ZoneChoice(
            WORLD,
            f"no zone configured; system time zone {name} names no "
            "country: using the world average",
        )
    return ZoneChoice(
        country,
        f"no zone configured; system time zone {name} is in {country} (tz database zone.tab)",
    )


def resolve_zone(
    configured: str | None,
    key: str = "intensity.zone",
    etc_root: str | os.PathLike[str] = "/etc",
    zoneinfo_root: str | os.PathLike[str] = "/usr/share/zoneinfo",
) -> ZoneChoice:
    """The configured zone (validated) or the default; what `carbond check` prints."""
    if configured is not None:
        zone = validate_zone(configured, key)
        return ZoneChoice(zone, f"zone {zone} from {key}")
    return default_zone(etc_root, zoneinfo_root)


def cloud_vendor_hint(dmi_root: str | os.PathLike[str] = "/sys/class/dmi/id") -> str | None:
    """'Amazon EC2 (AWS)', 'Google Compute Engine (GCP)' or 'Microsoft Azure' from the DMI
    sys_vendor string, else None. A hint to configure a cloud-region zone, nothing more
    (Hyper-V on premises also says Microsoft Corporation)."""
    try:
        vendor = (Path(dmi_root) / "sys_vendor").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return CLOUD_VENDORS.get(vendor.strip().lower())


def cloud_hint_sentence(dmi_root: str | os.PathLike[str] = "/sys/class/dmi/id") -> str | None:
    """One line for `carbond check` when no zone is configured and a cloud vendor shows."""
    vendor = cloud_vendor_hint(dmi_root)
    if vendor is None:
        return None
    prefix = CLOUD_ZONE_PREFIX[vendor]
    return (
        f"this looks like {vendor}: set intensity.zone to the region, "
        f"e.g. {prefix}:<region>, for a better figure than the time-zone guess"
    )
