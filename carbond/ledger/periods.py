"""Calendar arithmetic for budgets and reports: pure, no I/O.

Periods are calendar-aligned in a time zone (weeks start on Monday), so "this month" in
Europe/Berlin starts at local midnight on the 1st whatever the UTC offset, and a day across a
DST change is 23 or 25 hours long. Instants are epoch seconds throughout.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from carbond.types import shown

PERIODS = ("day", "week", "month", "quarter", "year")
SECONDS_PER_HOUR = 3600


def get_zone(name: str) -> tzinfo:
    """A tzinfo for an IANA name; raises ValueError naming what is wrong.

    UTC needs no time zone database, so it works on hosts without tzdata.
    """
    if name in ("UTC", "Etc/UTC", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {shown(name)} (an IANA name such as Europe/Berlin)")\
            from None


def local_midnight(day: date, zone: tzinfo) -> float:
    """Epoch seconds of the first instant of `day` in `zone`.

    Where midnight does not exist (a DST gap at 00:00), this is the instant the day begins.
    """
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def local_date(instant: float, zone: tzinfo) -> date:
    return datetime.fromtimestamp(instant, zone).date()


def _first_day(period: str, day: date) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    if period == "quarter":
        return date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
    if period == "year":
        return date(day.year, 1, 1)
    raise ValueError(f"unknown period {shown(period)}; expected one of {', '.join(PERIODS)}")


def _next_first_day(period: str, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    months = {"month": 1, "quarter": 3, "year": 12}[period]
    index = first.year * 12 + first.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def period_bounds(period: str, instant: float, zone: tzinfo) -> tuple[float, float]:
    """[start, end) in epoch seconds of the calendar period that contains `instant`."""
    first = _first_day(period, local_date(instant, zone))
    start = local_midnight(first, zone)
    end = local_midnight(_next_first_day(period, first), zone)
    if instant < start:  # only in a DST gap at midnight: the instant is in the previous period
        end = start
        start = local_midnight(_first_day(period, first - timedelta(days=1)), zone)
    return start, end


def floor_hour(instant: float) -> int:
    """Start of the UTC hour (epoch seconds) that contains `instant`; ledger rows are hourly."""
    return int(instant // SECONDS_PER_HOUR) * SECONDS_PER_HOUR


def hour_fraction(hour: int, since: float, until: float, observed_until: float) -> float:
    """The part of an hourly row's amount that falls in [since, until).

    A row holds what was measured in [hour, min(hour + 1 h, observed_until)); within it the
    amount is taken as spread evenly, so a range that cuts an hour (half-hour time zones,
    "the last 24 hours") gets its share.
    """
    span_end = min(hour + SECONDS_PER_HOUR, max(observed_until, hour))
    span = span_end - hour
    if span <= 0:  # a row for an hour not yet begun: only a clock that went back makes one
        return 1.0 if since <= hour < until else 0.0
    overlap = min(span_end, until) - max(hour, since)
    return min(1.0, max(0.0, overlap / span))


# A tick longer than this (a stalled host) is booked in the hour it ended rather than spread.
MAX_SPREAD_HOURS = 168


def spread_over_hours(wall_time: float, seconds: float) -> list[tuple[int, float]]:
    """The UTC hours the interval (wall_time - seconds, wall_time] touches, with the share of
    the interval in each: a tick across an hour boundary lands in both hourly rows."""
    end_hour = floor_hour(wall_time)
    if not seconds > 0 or wall_time - seconds >= end_hour or seconds > MAX_SPREAD_HOURS * 3600:
        return [(end_hour, 1.0)]
    start = wall_time - seconds
    shares = []
    hour = floor_hour(start)
    while hour <= end_hour:
        overlap = min(hour + SECONDS_PER_HOUR, wall_time) - max(hour, start)
        if overlap > 0:
            shares.append((hour, overlap / seconds))
        hour += SECONDS_PER_HOUR
    return shares


def share_within(wall_time: float, seconds: float, start: float, end: float) -> float:
    """The share of the interval (wall_time - seconds, wall_time] that lies in [start, end)."""
    if not seconds > 0:
        return 1.0 if start <= wall_time < end else 0.0
    overlap = min(wall_time, end) - max(wall_time - seconds, start)
    return min(1.0, max(0.0, overlap / seconds))
