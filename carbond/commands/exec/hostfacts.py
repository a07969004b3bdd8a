"""The host columns of a CodeCarbon emissions.csv row: country from the zone, CPU and memory
from /proc, GPU models from the meters."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import resources

from carbond import __version__
from carbond.carbon.static import split_cloud_zone
from carbond.commands.exec.summary import HostFacts


def _country_rows() -> dict[str, tuple[str, str]]:
    """ISO2 -> (ISO3, country name) from the shipped table."""
    text = resources.files("carbond.carbon").joinpath(
        "data", "grid-intensity-by-country.csv").read_text(encoding="utf-8")
    rows: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", "iso2,")):
            continue
        parts = line.split(",")
        if len(parts) >= 3:
            rows[parts[0].strip().upper()] = (parts[1].strip(), parts[2].strip())
    return rows


def _cloud_country(provider: str, region: str) -> str:
    text = resources.files("carbond.carbon").joinpath(
        "data", "cloud-regions.csv").read_text(encoding="utf-8")
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) == 4 and parts[0].lower() == provider and parts[1].lower() == region:
            return parts[3].strip().upper()
    return ""


def _first_line_value(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def _gib(meminfo_value: str) -> float | None:
    """A /proc/meminfo figure ("24576000 kB") in GiB, as CodeCarbon reports memory."""
    try:
        return int(meminfo_value.split()[0]) * 1024 / (1 << 30)
    except (IndexError, ValueError):
        return None


def driver_gpu_models(proc_root: str) -> list[str]:
    """NVIDIA GPUs as the driver lists them (/proc/driver/nvidia/gpus/BUS/information,
    "Model:"), for a row written without opening NVML; [] without the driver."""
    top = os.path.join(proc_root, "driver", "nvidia", "gpus")
    try:
        buses = sorted(os.listdir(top))
    except OSError:
        return []
    models = [_first_line_value(os.path.join(top, bus, "information"), "Model")
              for bus in buses]
    return [model for model in models if model]


def host_facts(zone: str, proc_root: str, gpu_models: Sequence[str]) -> HostFacts:
    """The host columns of a CodeCarbon row, from the zone and /proc."""
    cloud = split_cloud_zone(zone)
    iso2 = zone.split("-", 1)[0].upper() if cloud is None else _cloud_country(*cloud)
    iso3, country = _country_rows().get(iso2, ("", ""))
    region = zone if cloud is None and zone.upper() != iso2 else ""
    meminfo = os.path.join(proc_root, "meminfo")
    total_gb = _gib(_first_line_value(meminfo, "MemTotal"))
    available_gb = _gib(_first_line_value(meminfo, "MemAvailable"))
    used_gb = (total_gb - available_gb if total_gb is not None and available_gb is not None
               else None)
    models = sorted(set(gpu_models))
    return HostFacts(
        country_name=country, country_iso_code=iso3, region=region,
        cloud_provider=cloud[0] if cloud else "", cloud_region=cloud[1] if cloud else "",
        os=platform.platform(), python_version=platform.python_version(),
        version=f"carbond {__version__}", cpu_count=os.cpu_count() or 0,
        cpu_model=_first_line_value(os.path.join(proc_root, "cpuinfo"), "model name"),
        gpu_count=len(gpu_models), gpu_model=", ".join(models), ram_total_gb=total_gb or 0.0,
        ram_used_gb=used_gb,
    )
