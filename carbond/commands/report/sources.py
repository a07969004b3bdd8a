"""Where a report's figures come from: this host's ledger, or a Prometheus for a fleet.

From the ledger the rows are whole hours (UTC): a range takes every hourly row that starts in
[floor_hour(since), until). From Prometheus (a fleet: Prometheus, Thanos, Mimir) the figures
are PromQL `increase()` over the exported counters, which Prometheus extrapolates to the range's
edges.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from carbond.commands.report.model import OWNERS, Report, ReportRow
from carbond.ledger.ledger import Usage, aggregate
from carbond.ledger.periods import local_date, local_midnight
from carbond.types import ConfigError
from carbond.web.client import Client, ClientConfig, Unreachable

DEFAULT_TIMEOUT_SECONDS = 30.0
_AGE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|d|w)\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

ENERGY = "carbond_consumer_energy_joules_total"
EMISSIONS = "carbond_consumer_emissions_grams_total"
EMBODIED = "carbond_consumer_embodied_grams_total"
INTENSITY = "carbond_grid_intensity_grams_per_kwh"


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


Query = Callable[[str, float], list[dict[str, Any]]]


class FetchFailed(Exception):
    """Prometheus could not answer; the message names the URL (without credentials)."""


def prometheus_query(url: str, client_config: ClientConfig | None = None,
                     timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Query:
    """An instant-query function against `url`'s /api/v1/query (and nothing else)."""
    try:
        client = Client(url, client_config, timeout)
    except ValueError as exc:
        raise ConfigError("--prometheus", str(exc)) from None

    def query(promql: str, at: float) -> list[dict[str, Any]]:
        try:
            answer = client.post_form("/api/v1/query", {"query": promql, "time": f"{at:.3f}"})
        except Unreachable as exc:
            raise FetchFailed(str(exc)) from None
        base = client.base
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(answer, dict) or answer.get("status") != "success" \
                or not isinstance(data, dict):
            error = answer.get("error", "query failed") if isinstance(answer, dict) else \
                "query failed"
            raise FetchFailed(f"{base}: {error}")
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
        if component in ("cpu", "dram", "gpu", "platform"):
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
    if by in OWNERS:
        raise ConfigError("--by", f"{by} comes from the owner metadata this host's ledger "
                          "keeps; with --prometheus join carbond_consumer_info in PromQL "
                          "(see docs/ledger.md), or report from the ledger")
    if by == "day":
        for day, start, end in days_of(since, until, zone):
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


def days_of(since: float, until: float, zone: tzinfo) -> Iterable[tuple[str, float, float]]:
    day = local_date(since, zone)
    while True:
        start = max(since, local_midnight(day, zone))
        end = min(until, local_midnight(day + timedelta(days=1), zone))
        if start >= until:
            return
        if end > start:
            yield day.isoformat(), start, end
        day += timedelta(days=1)

