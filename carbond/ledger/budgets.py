"""Emission budgets: used and projected operational CO2e per calendar period.

Used comes from the ledger at start (so a restart does not reset it) and then grows with each
tick's grams, in memory. Projected = used + burn rate x time left in the period, the burn rate
taken over the shorter of the last 24 hours and the period so far (and never over time before
the ledger began, which would dilute it). Embodied emissions are kept out: budgets are about
what running the workloads emits.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from carbond.ledger.periods import (
    SECONDS_PER_HOUR,
    get_zone,
    hour_fraction,
    period_bounds,
    share_within,
    spread_over_hours,
)
from carbond.types import Consumer, TickRecord

BURN_WINDOW_SECONDS = 86400.0
OWNER_KEYS = ("namespace", "account", "user")
"""`match` keys on a consumer's metadata (carbond_consumer_info labels), each a shell glob."""

MetadataLookup = Callable[[tuple[str, str]], Mapping[str, str]]
"""A consumer's metadata labels (namespace, account, user, ...), {} when none are known."""


def no_metadata(consumer: tuple[str, str]) -> Mapping[str, str]:
    return {}


class BudgetSpec(Protocol):
    """What a budget needs from the config (`carbond.config.Budget`)."""

    name: str
    match: dict[str, str]
    period: str
    limit_grams: float


class GramsSource(Protocol):
    """What the tracker reads from the ledger at start (`carbond.ledger.ledger.Ledger`)."""

    @property
    def first_record(self) -> float | None: ...

    def consumer_grams(self, since: float, until: float) -> dict[Consumer, float]: ...

    def hourly_grams(self, since: float, until: float) -> dict[int, dict[Consumer, float]]: ...


@dataclass(frozen=True)
class BudgetStatus:
    """One budget now: carbond_budget_limit_grams / _used_grams / _projected_grams."""

    name: str
    period: str
    period_start: float
    period_end: float
    limit_grams: float
    used_grams: float
    projected_grams: float
    burn_grams_per_second: float

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "period": self.period,
            "period_start": self.period_start, "period_end": self.period_end,
            "limit_grams": self.limit_grams, "used_grams": self.used_grams,
            "projected_grams": self.projected_grams,
            "burn_grams_per_second": self.burn_grams_per_second,
        }


def matches(match: Mapping[str, str], consumer: tuple[str, str],
            metadata: Mapping[str, str] | None = None) -> bool:
    """`kind` exactly, `consumer` as a shell glob on the name, `project` as a glob on the
    name of a consumer of kind `project`; `namespace`, `account`, `user` as globs on the
    consumer's metadata (a `user` consumer's own name is its user); every given key must hold,
    and an owner key holds only where that metadata is known. No keys: everything."""
    kind, name = consumer
    if "kind" in match and kind != match["kind"]:
        return False
    if "consumer" in match and not fnmatch.fnmatchcase(name, match["consumer"]):
        return False
    for key in OWNER_KEYS:
        if key in match:
            value = (metadata or {}).get(key) or (name if key == "user" and kind == "user"
                                                  else "")
            if not value or not fnmatch.fnmatchcase(value, match[key]):
                return False
    return "project" not in match or (
        kind == "project" and fnmatch.fnmatchcase(name, match["project"]))


def owner_of(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The metadata a match can depend on: part of the key of cached match results, so a
    consumer whose account becomes known later starts counting for that account's budget."""
    return tuple(metadata.get(key, "") for key in OWNER_KEYS)


def burn_window_start(period_start: float, now: float, observed_since: float) -> float:
    """Start of the burn-rate window: the shorter of the last day and the period so far,
    never before the first measurement."""
    return max(period_start, now - BURN_WINDOW_SECONDS, observed_since)


def window_grams(hours: Mapping[int, float], since: float, now: float) -> float:
    """Grams in [since, now) from hourly sums, an hour cut by `since` counted in part."""
    return math.fsum(grams * hour_fraction(hour, since, now, now)
                     for hour, grams in hours.items())


def projected_grams(used_grams: float, burn_grams_per_second: float, now: float,
                    period_end: float) -> float:
    return used_grams + burn_grams_per_second * max(0.0, period_end - now)


KEPT_PERIODS = 4  # per budget: the current one and those a clock step went to lately
KEPT_HOURS = 52  # burn-rate hours kept, the nearest to the latest tick (a day each side)


@dataclass
class _Period:
    end: float
    used_grams: float = 0.0


@dataclass
class _State:
    spec: BudgetSpec
    start: float  # the current period: the one the latest tick or status landed in
    end: float
    periods: dict[float, _Period] = field(default_factory=dict)  # start -> what it holds
    hours: dict[int, float] = field(default_factory=dict)  # hour -> grams, the last 25 h

    @property
    def used_grams(self) -> float:
        return self.periods[self.start].used_grams


class BudgetTracker:
    """Budgets of one config, seeded from the ledger, then fed every tick.

    Create it between ticks (at start, or when a reload brings new budgets); then call
    `add()` with each tick's grams after `Ledger.record()` and `status()` whenever the values
    are wanted (both memory only, but for a period first seen after start).

    Each period's used grams are its own: a tick lands in the period of its wall time, and a
    wall-clock step (forward a day and back, back over midnight) moves where ticks land, never
    what a period holds. A period not in memory (a step back into one before the start, or
    into one evicted) is read from the ledger's rows, which include the tick being added.
    """

    def __init__(
        self,
        budgets: Sequence[BudgetSpec],
        timezone: str = "UTC",
        ledger: GramsSource | None = None,
        clock: Callable[[], float] = time.time,
        metadata: MetadataLookup = no_metadata,
    ) -> None:
        self._zone = get_zone(timezone)
        self._clock = clock
        self._metadata = metadata
        self._ledger = ledger
        self._lock = threading.Lock()
        self._matching: dict[tuple[tuple[str, str], tuple[str, ...]], tuple[_State, ...]] = {}
        now = clock()
        first = ledger.first_record if ledger is not None else None
        self._observed_since = first if first is not None else None
        self._states: list[_State] = []
        hourly = (ledger.hourly_grams(now - BURN_WINDOW_SECONDS - SECONDS_PER_HOUR, now)
                  if ledger is not None and budgets else {})
        seeded: dict[tuple[float, float], dict[Consumer, float]] = {}
        for spec in budgets:
            start, end = period_bounds(spec.period, now, self._zone)
            state = _State(spec, start, end)
            state.periods[start] = _Period(end, self._from_ledger(spec, start, end, seeded))
            if ledger is not None:
                for hour, row in hourly.items():
                    grams = math.fsum(g for c, g in row.items()
                                      if matches(spec.match, c, metadata(c)))
                    if grams:
                        state.hours[hour] = grams
            self._states.append(state)

    def _from_ledger(self, spec: BudgetSpec, start: float, end: float,
                     cache: dict[tuple[float, float], dict[Consumer, float]]) -> float:
        """What the ledger's rows hold for [start, end) for this budget: all of them, also
        rows later than now that a clock stepped back left behind."""
        if self._ledger is None:
            return 0.0
        if (start, end) not in cache:
            cache[(start, end)] = self._ledger.consumer_grams(start, end)
        return math.fsum(g for c, g in cache[(start, end)].items()
                         if matches(spec.match, c, self._metadata(c)))

    def _enter(self, state: _State, instant: float,
               cache: dict[tuple[float, float], dict[Consumer, float]]) -> bool:
        """Make the period of `instant` current; True when it was read from the ledger just
        now (it then holds the tick being added already)."""
        if state.start <= instant < state.end:
            return False
        start, end = period_bounds(state.spec.period, instant, self._zone)
        state.start, state.end = start, end
        if start in state.periods:
            return False
        state.periods[start] = _Period(end, self._from_ledger(state.spec, start, end, cache))
        while len(state.periods) > KEPT_PERIODS:
            del state.periods[min(p for p in state.periods if p != start)]
        return self._ledger is not None

    def add(self, wall_time: float, seconds: float,
            grams: Mapping[tuple[str, str], float]) -> None:
        """One tick's operational grams per consumer; the tick is (wall_time - seconds,
        wall_time], split at a period boundary and over hours as the ledger splits it."""
        if not math.isfinite(wall_time):
            return
        with self._lock:
            if self._observed_since is None:
                self._observed_since = wall_time - max(0.0, seconds)
            if not self._states:
                return
            hours = spread_over_hours(wall_time, seconds)
            cache: dict[tuple[float, float], dict[Consumer, float]] = {}
            shares: dict[int, list[tuple[_Period, float]]] = {}
            for state in self._states:
                read = self._enter(state, wall_time, cache)
                into = [] if read else [(state.periods[state.start],
                                         share_within(wall_time, seconds, state.start,
                                                      state.end))]
                tick_start = wall_time - max(0.0, seconds)
                if tick_start >= state.start:
                    shares[id(state)] = into
                    continue
                began = period_bounds(state.spec.period, tick_start, self._zone)[0]
                before = state.periods.get(began)
                if began != state.start and before is not None:
                    # the part of a tick before a boundary, where that period is still held
                    into.append((before, share_within(wall_time, seconds, began, before.end)))
                shares[id(state)] = into
            for key, value in grams.items():
                if not 0.0 < value < math.inf:
                    continue
                labels = self._metadata(key)
                cached = (key, owner_of(labels))
                states = self._matching.get(cached)
                if states is None:
                    if len(self._matching) > 10_000:
                        self._matching.clear()
                    states = tuple(s for s in self._states
                                   if matches(s.spec.match, key, labels))
                    self._matching[cached] = states
                for state in states:
                    for period, share in shares[id(state)]:
                        period.used_grams += value * share
                    for hour, share in hours:
                        state.hours[hour] = state.hours.get(hour, 0.0) + value * share
            latest = hours[-1][0]
            for state in self._states:
                if len(state.hours) > KEPT_HOURS:  # the farthest from this tick go
                    kept = sorted(state.hours, key=lambda h: abs(h - latest))[:KEPT_HOURS]
                    state.hours = {h: state.hours[h] for h in kept}

    def record(self, record: TickRecord) -> None:
        """The budgets' sink: one accounted tick."""
        self.add(record.wall_time, record.seconds, record.grams)

    def status(self, now: float | None = None) -> list[BudgetStatus]:
        """Every budget's limit, used and projected grams, in config order."""
        now = self._clock() if now is None else now
        result = []
        with self._lock:
            observed = self._observed_since if self._observed_since is not None else now
            cache: dict[tuple[float, float], dict[Consumer, float]] = {}
            for state in self._states:
                self._enter(state, now, cache)
                since = burn_window_start(state.start, now, observed)
                seconds = now - since
                if seconds <= 0:
                    rate = 0.0
                elif since > now - BURN_WINDOW_SECONDS:
                    rate = state.used_grams / seconds  # the window is the period so far
                else:
                    rate = window_grams(state.hours, since, now) / seconds
                result.append(BudgetStatus(
                    name=state.spec.name, period=state.spec.period,
                    period_start=state.start, period_end=state.end,
                    limit_grams=state.spec.limit_grams, used_grams=state.used_grams,
                    projected_grams=projected_grams(state.used_grams, rate, now, state.end),
                    burn_grams_per_second=rate,
                ))
        return result
