"""A report as a terminal table, CSV, JSON or the html page."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, tzinfo
from typing import Any

from carbond.commands.figures import decimal, human_grams, human_joules
from carbond.commands.report.html import render_html
from carbond.commands.report.model import KEY_COLUMNS, DayUsage, PageInfo, Report
from carbond.commands.report.sources import days_of
from carbond.ledger.ledger import Usage

JOULES_PER_KWH = 3.6e6


def _iso(instant: float, zone: tzinfo) -> str:
    return datetime.fromtimestamp(instant, zone).isoformat(timespec="seconds")


def _grams_per_kwh(usage: Usage) -> float | None:
    """What the row's emissions come to per kWh (PUE included)."""
    return usage.grams / (usage.joules / JOULES_PER_KWH) if usage.joules > 0 else None


def _fields(usage: Usage) -> dict[str, Any]:
    return {
        "cpu_joules": usage.cpu_joules, "dram_joules": usage.dram_joules,
        "gpu_joules": usage.gpu_joules, "platform_joules": usage.platform_joules,
        "joules": usage.joules, "grams": usage.grams,
        "embodied_grams": usage.embodied_grams, "grams_per_kwh": _grams_per_kwh(usage),
        "grid_grams_per_kwh": usage.grid_grams_per_kwh,
        "providers": sorted(usage.providers),
    }


def render_json(report: Report, zone: tzinfo) -> str:
    columns = KEY_COLUMNS[report.by]
    document = {
        "source": report.source, report.source: report.origin,
        "since": _iso(report.since, zone), "until": _iso(report.until, zone),
        "timezone": report.timezone, "by": report.by,
        "rows": [dict(zip(columns, row.key, strict=True)) | _fields(row.usage)
                 for row in report.rows],
        "total": _fields(report.total),
    }
    return json.dumps(document, indent=2) + "\n"


def render_csv(report: Report) -> str:
    columns = KEY_COLUMNS[report.by]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [*columns, "cpu_joules", "dram_joules", "gpu_joules", "platform_joules", "joules",
              "grams",
              "embodied_grams", "grams_per_kwh", "grid_grams_per_kwh", "providers"]
    writer.writerow(header)
    total_key = ("total",) + ("",) * (len(columns) - 1)
    for key, usage in [*((row.key, row.usage) for row in report.rows),
                       (total_key, report.total)]:
        values = _fields(usage)
        writer.writerow([*key, *(_csv_number(values[name]) for name in header[len(columns):-1]),
                         ";".join(values["providers"])])
    return out.getvalue()


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _number(value: float | None) -> str:
    return "-" if value is None else decimal(value)


def _cell(text: str) -> str:
    """Names are kernel-provided: keep control characters out of a terminal table."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def render_table(report: Report, zone: tzinfo) -> str:
    """Scaled units, three significant digits (commands.figures), and a TOTAL row; the PLATFORM
    column (the node beyond its measured parts) only where a platform meter measured some."""
    columns = [c.upper() for c in KEY_COLUMNS[report.by]]
    platform = report.total.platform_joules > 0
    header = [*columns, "CPU", "DRAM", "GPU", *(["PLATFORM"] if platform else []), "ENERGY",
              "CO2e", "EMBODIED", "g/kWh", "PROVIDERS"]

    def cells(key: tuple[str, ...], usage: Usage) -> list[str]:
        parts = [usage.cpu_joules, usage.dram_joules, usage.gpu_joules,
                 *([usage.platform_joules] if platform else []), usage.joules]
        return [*(_cell(k) for k in key), *(human_joules(j) for j in parts),
                human_grams(usage.grams), human_grams(usage.embodied_grams),
                _number(_grams_per_kwh(usage)), ",".join(sorted(usage.providers)) or "-"]

    lines = [header, *(cells(row.key, row.usage) for row in report.rows),
             cells(("TOTAL",) + ("",) * (len(columns) - 1), report.total)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = range(len(columns), len(header) - 1)

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                         for i, cell in enumerate(line)).rstrip()

    title = (f"{report.source} {report.origin}: {_iso(report.since, zone)} to "
             f"{_iso(report.until, zone)} ({report.timezone}), by {report.by}")
    rule = "-" * len(fmt(lines[0]))
    body = [fmt(line) for line in lines[1:-1]]
    return "\n".join([title, fmt(lines[0]), rule, *body, rule, fmt(lines[-1])]) + "\n"


def period_days(report: Report, daily: Report | None, zone: tzinfo) -> list[DayUsage]:
    """Every day of the report's period in order, zeros included, with `daily`'s figures (a
    `--by day` report over the same period). A day `daily` has outside the period (an hourly
    row across the first midnight in a zone with a half-hour offset) is kept, so the days add
    up to the report's total."""
    found = {row.key[0]: row.usage for row in daily.rows} if daily is not None else {}
    days = {day: found.get(day, Usage()) for day, _, _ in days_of(report.since, report.until,
                                                                 zone)}
    for day, usage in found.items():
        days.setdefault(day, usage)
    return [DayUsage(day, days[day]) for day in sorted(days)]


def render(report: Report, fmt: str, zone: tzinfo, daily: Report | None = None,
           info: PageInfo | None = None) -> str:
    """`daily` and `info` are for html only: the period by day, and what the page says about
    where the figures come from."""
    if fmt == "html":
        days = period_days(report, report if report.by == "day" else daily, zone)
        return render_html(report, days, zone, info or PageInfo(host=report.origin),
                           KEY_COLUMNS[report.by])
    if fmt == "json":
        return render_json(report, zone)
    if fmt == "csv":
        return render_csv(report)
    return render_table(report, zone)
