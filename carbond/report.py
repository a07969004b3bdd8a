"""`carbond report`: energy and CO2e over a period, from this host's ledger or from Prometheus.

From the ledger the rows are whole hours (UTC): a range takes every hourly row that starts in
[floor_hour(since), until). From Prometheus (a fleet: Prometheus, Thanos, Mimir) the figures
are PromQL `increase()` over the exported counters, which Prometheus extrapolates to the range's
edges. Tables show kWh and kg CO2e; CSV and JSON keep base units (joules, grams).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from carbond.errors import ConfigError
from carbond.ledger import Usage, aggregate
from carbond.periods import local_date, local_midnight
from carbond.report_html import DayUsage, PageInfo, render_html

GROUPS = ("consumer", "kind", "day", "project")
FORMATS = ("table", "csv", "json", "html")
KEY_COLUMNS = {"consumer": ("consumer", "kind"), "kind": ("kind",), "day": ("day",),
               "project": ("project",)}
JOULES_PER_KWH = 3.6e6
DEFAULT_TIMEOUT_SECONDS = 30.0
_AGE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|d|w)\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

ENERGY = "carbond_consumer_energy_joules_total"
EMISSIONS = "carbond_consumer_emissions_grams_total"
EMBODIED = "carbond_consumer_embodied_grams_total"
INTENSITY = "carbond_grid_intensity_grams_per_kwh"


class FetchFailed(Exception):
    """Prometheus could not answer; the message names the URL (without credentials)."""


@dataclass(frozen=True)
class ReportRow:
    key: tuple[str, ...]  # values of KEY_COLUMNS[by]
    usage: Usage


@dataclass
class Report:
    since: float
    until: float
    by: str
    timezone: str
    source: str  # "ledger" or "prometheus"
    origin: str  # the ledger file or the Prometheus URL
    rows: list[ReportRow] = field(default_factory=list)

    @property
    def total(self) -> Usage:
        total = Usage()
        for row in self.rows:
            total.add(row.usage)
        return total


# ---- arguments -------------------------------------------------------------------------------


def parse_instant(text: str, flag: str, now: float, zone: tzinfo) -> float:
    """`now`, `today`, `yesterday` (local midnight), an age (`30d`, `12h`), an ISO date
    (local midnight) or an ISO date and time (local unless it carries an offset or Z)."""
    value = text.strip().lower()
    if value == "now":
        return now
    if value in ("today", "yesterday"):
        day = local_date(now, zone) - timedelta(days=1 if value == "yesterday" else 0)
        return local_midnight(day, zone)
    age = _AGE.match(value)
    if age:
        return now - float(age.group(1)) * _AGE_SECONDS[age.group(2)]
    try:
        if len(value) == 10:
            return local_midnight(date.fromisoformat(value), zone)
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(flag, f"cannot parse {text!r}: use an ISO date or time (2024-05-01, "
                          "2024-05-01T12:00), today, yesterday, now, or an age (30d, 12h)")\
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


def parse_range(since: str, until: str, now: float, zone: tzinfo) -> tuple[float, float]:
    start = parse_instant(since, "--since", now, zone)
    end = parse_instant(until, "--until", now, zone)
    if start >= end:
        raise ConfigError("--since", f"must be before --until ({since!r} is not before "
                          f"{until!r})")
    return start, end


# ---- from the ledger -------------------------------------------------------------------------


def _sort(rows: list[ReportRow], by: str) -> list[ReportRow]:
    if by == "day":
        return sorted(rows, key=lambda r: r.key)
    return sorted(rows, key=lambda r: (-r.usage.grams, -r.usage.joules, r.key))


def from_ledger(conn: sqlite3.Connection, origin: str, since: float, until: float, by: str,
                zone: tzinfo, timezone: str) -> Report:
    if by == "day":
        days: dict[str, Usage] = {}
        for (hour,), usage in aggregate(conn, since, until, "hour"):
            day = local_date(hour, zone).isoformat()
            days.setdefault(day, Usage()).add(usage)
        rows = [ReportRow((day,), usage) for day, usage in days.items()]
    else:
        rows = [ReportRow(tuple(str(k) for k in key), usage)
                for key, usage in aggregate(conn, since, until, by)]
    return Report(since, until, by, timezone, "ledger", origin, _sort(rows, by))


# ---- from Prometheus ---------------------------------------------------------------------------


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """The URL without user:password, and the Basic auth header they make."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--prometheus", f"expected an http(s) URL, got {redact(url)!r}")
    headers = {}
    netloc = parts.netloc
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return base, headers


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, ""))


Query = Callable[[str, float], list[dict[str, Any]]]


def prometheus_query(url: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Query:
    """An instant-query function against `url`'s /api/v1/query (and nothing else)."""
    base, headers = _split_credentials(url)

    def query(promql: str, at: float) -> list[dict[str, Any]]:
        body = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"}).encode()
        request = urllib.request.Request(
            f"{base}/api/v1/query", data=body, method="POST",
            headers={**headers, "Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(ValueError, AttributeError, OSError):
                detail = str(json.load(exc).get("error", ""))
            raise FetchFailed(f"{base}: HTTP {exc.code} {detail}".rstrip()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchFailed(f"cannot reach {base}: {reason}") from None
        except ValueError:
            raise FetchFailed(f"{base}: the answer is not JSON") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if answer.get("status") != "success" or not isinstance(data, dict):
            raise FetchFailed(f"{base}: {answer.get('error', 'query failed')}")
        if data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            raise FetchFailed(f"{base}: expected a vector, got {data.get('resultType')}")
        return data["result"]

    return query


def _value(sample: Mapping[str, Any]) -> float:
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _range(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _window(query: Query, since: float, until: float, labels: tuple[str, ...],
            selector: str) -> dict[tuple[str, ...], Usage]:
    """Usage per label tuple over (since, until], one PromQL increase() per counter."""
    by = ", ".join(labels)
    window = _range(until - since)
    usage: dict[tuple[str, ...], Usage] = {}

    def row(metric: Mapping[str, str]) -> Usage:
        key = tuple(metric.get(label, "") for label in labels)
        return usage.setdefault(key, Usage())

    for sample in query(f"sum by ({by}{', ' if by else ''}component) "
                        f"(increase({ENERGY}{selector}[{window}]))", until):
        metric = sample.get("metric", {})
        component = metric.get("component", "")
        target = row(metric)
        if component in ("cpu", "dram", "gpu"):
            setattr(target, f"{component}_joules",
                    getattr(target, f"{component}_joules") + _value(sample))
    emitted_on: dict[tuple[str, ...], set[str]] = {}
    for sample in query(f"sum by ({by}{', ' if by else ''}instance) "
                        f"(increase({EMISSIONS}{selector}[{window}]))", until):
        metric = sample.get("metric", {})
        grams = _value(sample)
        row(metric).grams += grams
        if grams > 0:
            key = tuple(metric.get(label, "") for label in labels)
            emitted_on.setdefault(key, set()).add(metric.get("instance", ""))
    grouping = f"sum by ({by})" if by else "sum"
    for sample in query(f"{grouping} (increase({EMBODIED}{selector}[{window}]))", until):
        row(sample.get("metric", {})).embodied_grams += _value(sample)
    providers: dict[str, set[str]] = {}
    for sample in query(f"count by (instance, provider) "
                        f"(count_over_time({INTENSITY}[{window}]))", until):
        metric = sample.get("metric", {})
        providers.setdefault(metric.get("instance", ""), set()).add(metric.get("provider", ""))
    for key, instances in emitted_on.items():
        for instance in instances:
            usage[key].providers |= providers.get(instance, set())
    return usage


def from_prometheus(query: Query, origin: str, since: float, until: float, by: str,
                    zone: tzinfo, timezone: str) -> Report:
    rows: list[ReportRow] = []
    if by == "day":
        for day, start, end in _days(since, until, zone):
            total = Usage()
            for usage in _window(query, start, end, (), "").values():
                total.add(usage)
            if total.joules or total.grams or total.embodied_grams:
                rows.append(ReportRow((day,), total))
    else:
        labels = {"consumer": ("consumer", "kind"), "kind": ("kind",),
                  "project": ("consumer",)}[by]
        selector = '{kind="project"}' if by == "project" else ""
        for key, usage in _window(query, since, until, labels, selector).items():
            if usage.joules or usage.grams or usage.embodied_grams:
                rows.append(ReportRow(key, usage))
    return Report(since, until, by, timezone, "prometheus", origin, _sort(rows, by))


def _days(since: float, until: float, zone: tzinfo) -> Iterable[tuple[str, float, float]]:
    day = local_date(since, zone)
    while True:
        start = max(since, local_midnight(day, zone))
        end = min(until, local_midnight(day + timedelta(days=1), zone))
        if start >= until:
            return
        if end > start:
            yield day.isoformat(), start, end
        day += timedelta(days=1)


# ---- output ------------------------------------------------------------------------------------


def _iso(instant: float, zone: tzinfo) -> str:
    return datetime.fromtimestamp(instant, zone).isoformat(timespec="seconds")


def _grams_per_kwh(usage: Usage) -> float | None:
    """What the row's emissions come to per kWh (PUE included)."""
    return usage.grams / (usage.joules / JOULES_PER_KWH) if usage.joules > 0 else None


def _fields(usage: Usage) -> dict[str, Any]:
    return {
        "cpu_joules": usage.cpu_joules, "dram_joules": usage.dram_joules,
        "gpu_joules": usage.gpu_joules, "joules": usage.joules, "grams": usage.grams,
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
    header = [*columns, "cpu_joules", "dram_joules", "gpu_joules", "joules", "grams",
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
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 0.001:
        return f"{value:.3f}"
    return f"{value:.2e}"


def _cell(text: str) -> str:
    """Names are kernel-provided: keep control characters out of a terminal table."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def render_table(report: Report, zone: tzinfo) -> str:
    columns = [c.upper() for c in KEY_COLUMNS[report.by]]
    header = [*columns, "CPU kWh", "DRAM kWh", "GPU kWh", "ENERGY kWh", "CO2e kg",
              "EMBODIED kg", "g/kWh", "PROVIDERS"]

    def cells(key: tuple[str, ...], usage: Usage) -> list[str]:
        return [*(_cell(k) for k in key),
                *(_number(j / JOULES_PER_KWH) for j in (
                    usage.cpu_joules, usage.dram_joules, usage.gpu_joules, usage.joules)),
                _number(usage.grams / 1000), _number(usage.embodied_grams / 1000),
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
    days = {day: found.get(day, Usage()) for day, _, _ in _days(report.since, report.until,
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
