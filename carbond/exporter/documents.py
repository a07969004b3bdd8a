"""The JSON API's documents (docs/http.md): /api/v1/consumers and /api/v1/budgets."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from carbond.attribution import ATTRIBUTED, is_platform_meter
from carbond.exporter.snapshot import Snapshot
from carbond.types import Consumer, name_text

API_VERSION = 1


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity; an undefined figure is null."""
    return value if math.isfinite(value) else None


def _iso(epoch_seconds: float) -> str | None:
    if not epoch_seconds or not math.isfinite(epoch_seconds):
        return None
    try:
        moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat().replace("+00:00", "Z")


def _header(snap: Snapshot) -> dict[str, Any]:
    """What every API document starts with: version, when, and the conditions of that tick."""
    stamp = snap.last_tick_timestamp_seconds
    intensity = None
    if snap.intensity is not None:
        intensity = {
            "grams_per_kwh": _finite(snap.intensity.grams_per_kwh),
            "zone": name_text(snap.zone or snap.intensity.zone),
            "provider": name_text(snap.intensity.provider),
            "age_seconds": (None if snap.intensity_age_seconds is None
                            else _finite(snap.intensity_age_seconds)),
            "marginal": snap.intensity.marginal,
        }
    return {
        "version": API_VERSION,
        "timestamp": _finite(stamp) if stamp else None,
        "time": _iso(stamp),
        "intensity": intensity,
        "pue": _finite(snap.pue),
    }


def _sum(values: Iterable[float]) -> float:
    """A careful sum; NaN (not an exception) when the parts are not finite."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):  # inf - inf, or an intermediate overflow
        return math.nan


def _component_map(values: Mapping[str, float], with_total: bool) -> dict[str, float | None]:
    result: dict[str, float | None] = {k: _finite(v) for k, v in sorted(values.items())}
    if with_total:
        result["total"] = _finite(_sum(values.values()))
    return result


def consumers_document(snap: Snapshot) -> dict[str, Any]:
    """The /api/v1/consumers document (docs/http.md): one entry per exported consumer,
    highest total power first."""
    watts: dict[Consumer, dict[str, float]] = {}
    joules: dict[Consumer, dict[str, float]] = {}
    for sample in snap.consumers:
        watts.setdefault(sample.consumer, {})[sample.component] = sample.watts
        joules.setdefault(sample.consumer, {})[sample.component] = sample.joules_total
    grams = dict(snap.consumer_grams_total)
    embodied = dict(snap.consumer_embodied_grams_total)
    everyone = set(watts) | set(grams) | set(embodied)

    def rank(consumer: Consumer) -> tuple[float, str, str]:
        total = _sum(watts.get(consumer, {}).values())
        return (-total if math.isfinite(total) else 0.0, consumer.kind, consumer.name)

    host_watts: dict[str, float] = {}
    host_joules: dict[str, float] = {}
    for device in snap.devices:
        host_watts[device.component] = host_watts.get(device.component, 0.0) + device.watts
        host_joules[device.component] = (host_joules.get(device.component, 0.0)
                                         + device.joules_total)
    document = _header(snap)
    document["host"] = {
        "watts": _component_map(host_watts, with_total=True),
        "joules": _component_map(host_joules, with_total=True),
        "emissions_grams": _finite(snap.host_grams_total),
        # Parts against the whole node, where a platform meter measures it (docs/platform.md):
        "parts_watts": _finite(_sum(d.watts for d in snap.devices
                                    if d.component in ATTRIBUTED)),
        "platform_watts": (_finite(_sum(d.watts for d in snap.devices if is_platform_meter(d)))
                           if any(is_platform_meter(d) for d in snap.devices) else None),
        "coverage_ratio": (None if snap.coverage_ratio is None
                           else _finite(snap.coverage_ratio)),
        "devices": [
            {"component": name_text(d.component), "device": name_text(d.device),
             "source": name_text(d.source), "watts": _finite(d.watts),
             "joules": _finite(d.joules_total)}
            for d in snap.devices
        ],
    }
    document["consumers"] = [
        {
            "kind": name_text(consumer.kind),
            "name": name_text(consumer.name),
            "watts": _component_map(watts.get(consumer, {}), with_total=True),
            "joules": _component_map(joules.get(consumer, {}), with_total=True),
            "emissions_grams": _finite(grams.get(consumer, 0.0)),
            "embodied_grams": _finite(embodied.get(consumer, 0.0)),
        }
        for consumer in sorted(everyone, key=rank)
    ]
    return document


def budgets_document(snap: Snapshot) -> dict[str, Any]:
    """The /api/v1/budgets document (docs/http.md)."""
    document = _header(snap)
    document["budgets"] = [
        {
            "name": name_text(b.name),
            "limit_grams": _finite(b.limit_grams),
            "used_grams": _finite(b.used_grams),
            "projected_grams": _finite(b.projected_grams),
            "period_start": _finite(b.period_start),
            "period_end": _finite(b.period_end),
            "period_start_time": _iso(b.period_start),
            "period_end_time": _iso(b.period_end),
        }
        for b in snap.budgets
    ]
    return document


def json_bytes(document: Mapping[str, Any]) -> bytes:
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")
