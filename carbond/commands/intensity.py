"""`carbond intensity`: the current grid intensity, its provider and age, and with
`--forecast` the provider's forecast with the lowest-carbon window marked. Formatting is pure."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone, tzinfo

from carbond.carbon import FetchError, ForecastUnsupported, fetch_forecast
from carbond.carbon.forecast import Forecast, aggregate, lowest_window
from carbond.carbon.intensity import Intensity
from carbond.commands.build import build_feed
from carbond.config import Config


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Exit 0 with a figure (static at worst); 1 when a forecast cannot be had."""
    feed, choice = build_feed(cfg)
    now = time.time()
    if args.forecast:
        try:
            print(format_forecast(fetch_forecast(feed.providers, now), choice.zone), end="")
        except ForecastUnsupported as exc:
            print(f"carbond: no forecast: {exc}", file=sys.stderr)
            return 1
        except FetchError as exc:
            print(f"carbond: forecast failed: {exc}", file=sys.stderr)
            return 1
        return 0
    feed.refresh_now(force=False)
    print(format_current(feed.current(), now, feed.zone), end="")
    return 0


def _clock(epoch: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(epoch, tz=tz).strftime("%a %H:%M")


def format_forecast(
    forecast: Forecast,
    zone: str,
    window_seconds: float | None = None,
    tz: tzinfo = timezone.utc,
    max_rows: int = 48,
) -> str:
    """A small table, one row per period (hourly when the provider's are finer), with the
    lowest-carbon window of `window_seconds` (default: one period) marked with '*'."""
    points = list(forecast.points)
    if not points:
        return f"{forecast.provider}: no forecast points\n"
    if len(points) > max_rows:
        points = aggregate(points, 3600.0)
    period = points[0].end - points[0].start
    first, last = lowest_window(points, window_seconds or period)
    kind = "marginal " if forecast.marginal else ""
    tz_name = datetime.fromtimestamp(points[0].start, tz=tz).tzname() or "UTC"
    lines = [
        f"{kind}grid intensity forecast, {forecast.provider}, zone {zone} (times {tz_name})",
        f"  {'from':<9}  {'to':<9}  {'gCO2e/kWh':>9}",
    ]
    for index, point in enumerate(points):
        mark = "*" if first <= index <= last else " "
        lines.append(
            f"{mark} {_clock(point.start, tz):<9}  {_clock(point.end, tz):<9}  "
            f"{point.grams_per_kwh:>9.0f}"
        )
    chosen = points[first : last + 1]
    weight = sum(p.end - p.start for p in chosen)
    mean = (
        sum(p.grams_per_kwh * (p.end - p.start) for p in chosen) / weight
        if weight > 0
        else chosen[0].grams_per_kwh
    )
    lines.append(
        f"* lowest-carbon window: {_clock(chosen[0].start, tz)} to "
        f"{_clock(chosen[-1].end, tz)}, mean {mean:.0f} gCO2e/kWh"
    )
    return "\n".join(lines) + "\n"


def format_age(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_current(intensity: Intensity | None, now: float, zone: str | None = None) -> str:
    """One line: value, zone, provider, age, and whether it is marginal or estimated. Where
    the provider looked up another zone than the configured one (static falls back from an
    Electricity Maps zone to its country), both are shown."""
    if intensity is None:
        return "no grid intensity available\n"
    shown = intensity.zone
    if zone and zone != intensity.zone:
        shown = f"{zone} (as {intensity.zone})"
    notes = []
    if intensity.marginal:
        notes.append("marginal (MOER): the rate of the plants that follow load, not the mix")
    if intensity.is_estimated:
        notes.append("estimated")
    extra = f"; {'; '.join(notes)}" if notes else ""
    return (
        f"{intensity.grams_per_kwh:.1f} gCO2e/kWh  zone {shown}  "
        f"provider {intensity.provider}  age {format_age(intensity.age_seconds(now))}"
        f"{extra}\n"
    )
