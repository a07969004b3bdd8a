"""Bounded, stable consumer series for the exporter.

At most `max_consumers` consumers are exported under their own name (`idle` and `other` are
always exported on top), series still kept for finished consumers included; the rest are
folded into `other` by energy rank. Rank is an
exponentially smoothed power, and a consumer outside the set only displaces the weakest member
when it beats it by a margin, so series don't flap. Counters never go backwards: a consumer that
finishes keeps its exported counter frozen (power 0) for `retention_seconds`, then the series
goes. A member displaced by a newcomer loses its series at once (the newcomer takes its slot:
the named series never outnumber `max_consumers`), and its new energy goes to `other`. Totals
of recently dropped consumers are remembered, so a consumer that comes back continues its
counter.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from carbond.types import IDLE, OTHER, Consumer


@dataclass(frozen=True)
class SeriesSample:
    """One exported series: carbond_consumer_energy_joules_total and _power_watts."""

    consumer: Consumer
    component: str  # cpu, dram, gpu
    joules_total: float
    watts: float


def _finite(value: object) -> float:
    """A stored count: a finite number >= 0, else ValueError (the state is outside data)."""
    number = float(value)  # type: ignore[arg-type]  # TypeError/ValueError for non-numbers
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"not a count: {number!r}")
    return number


@dataclass
class _Series:
    joules: dict[str, float] = field(default_factory=dict)
    watts: dict[str, float] = field(default_factory=dict)
    grams: float = 0.0
    embodied_grams: float = 0.0
    active: bool = True
    last_active: float = 0.0


class ConsumerSeries:
    """Feed `update()` every tick with that tick's joules per consumer and component."""

    def __init__(
        self,
        max_consumers: int = 200,
        margin: float = 0.2,
        margin_watts: float = 0.05,
        retention_seconds: float = 600.0,
        smoothing_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        remember: int | None = None,
    ) -> None:
        if max_consumers < 0:
            raise ValueError("max_consumers must be >= 0")
        self.max_consumers = max_consumers
        self.margin = margin
        self.margin_watts = margin_watts
        self.retention_seconds = retention_seconds
        self.smoothing_seconds = smoothing_seconds
        self.clock = clock
        self._series: dict[Consumer, _Series] = {
            IDLE: _Series(),
            OTHER: _Series(),
        }
        self._score: dict[Consumer, float] = {}
        self._active: set[Consumer] = set()
        self._memory: OrderedDict[Consumer, _Series] = OrderedDict()
        self._remember = remember if remember is not None else 4 * max(max_consumers, 1)

    @property
    def active(self) -> frozenset[Consumer]:
        """Consumers currently exported under their own name (idle/other not included)."""
        return frozenset(self._active)

    def restore(
        self,
        totals: Mapping[Consumer, Mapping[str, float]],
        grams: Mapping[Consumer, float] | None = None,
        embodied_grams: Mapping[Consumer, float] | None = None,
        idle_seconds: Mapping[Consumer, float] | None = None,
    ) -> None:
        """Seed counters from the ledger after a restart, so they continue, not restart.

        A consumer last active `idle_seconds[c]` ago, within the retention, is exported again
        at once (frozen, power 0) so its series has no gap; the others wait in memory.
        """
        grams, embodied_grams = grams or {}, embodied_grams or {}
        idle_seconds = idle_seconds or {}
        now = self.clock()
        for consumer in {*totals, *grams, *embodied_grams}:
            series = _Series(dict(totals.get(consumer, {})), grams=grams.get(consumer, 0.0),
                             embodied_grams=embodied_grams.get(consumer, 0.0))
            idle = idle_seconds.get(consumer)
            if consumer in (IDLE, OTHER):
                self._series[consumer] = series
            elif idle is not None and 0 <= idle < self.retention_seconds:
                series.active, series.last_active = False, now - idle
                self._series[consumer] = series
            else:
                self._memory[consumer] = series
                self._memory.move_to_end(consumer)
        while len(self._memory) > self._remember:
            self._memory.popitem(last=False)

    def folded(self) -> dict[str, Any]:
        """The `other` series as exported, for the next start: it holds the consumers folded
        into it besides attribution's own `other`, which is all the ledger knows by that name."""
        other = self._series[OTHER]
        return {"joules": dict(other.joules), "grams": other.grams,
                "embodied_grams": other.embodied_grams}

    def continue_folded(self, state: Mapping[str, Any]) -> None:
        """After `restore`: `other` continues from its value at the stop (`folded()`), never
        from the ledger's smaller `other` alone: a counter does not go back."""
        other = self._series[OTHER]
        for component, joules in dict(state.get("joules", {})).items():
            other.joules[str(component)] = max(other.joules.get(str(component), 0.0),
                                                _finite(joules))
        other.grams = max(other.grams, _finite(state.get("grams", 0.0)))
        other.embodied_grams = max(other.embodied_grams,
                                   _finite(state.get("embodied_grams", 0.0)))

    def _rank(self, live: Mapping[Consumer, float], interval: float) -> None:
        alpha = 1.0 if interval <= 0 else 1.0 - math.exp(-interval / self.smoothing_seconds)
        scores = {}
        for consumer, watts in live.items():
            old = self._score.get(consumer)
            scores[consumer] = watts if old is None else old + alpha * (watts - old)
        self._score = scores

    def _select(self) -> None:
        """Choose this tick's named set. Named series (live members, and the frozen series of
        finished consumers) never number more than `max_consumers`: a newcomer takes a free
        slot, or the weakest member's by the margin, and then the member's series goes (to
        memory, so it continues if it comes back) instead of staying frozen on top."""
        score = self._score
        self._active &= score.keys()  # finished consumers leave the top set
        self._bound()
        # A live consumer that still holds a (frozen) series takes it up again: no new slot.
        self._active.update(c for c in score if c in self._series and c not in (IDLE, OTHER))
        candidates = sorted(
            (c for c in score if c not in self._active), key=lambda c: (-score[c], c)
        )
        free = self.max_consumers - self._named()
        if free > 0:
            self._active.update(candidates[:free])
            candidates = candidates[free:]
        members = sorted(self._active, key=lambda c: (score[c], c))
        for candidate, weakest in zip(candidates, members, strict=False):
            if score[candidate] <= score[weakest] * (1 + self.margin) + self.margin_watts:
                break
            self._active.discard(weakest)
            self._forget(weakest)
            self._active.add(candidate)

    def _named(self) -> int:
        return len(self._series) - 2  # idle and other are always there, on top

    def _bound(self) -> None:
        """After a restore or a smaller `max_consumers`: the frozen series that were active
        longest ago go first, then the weakest members."""
        excess = self._named() - self.max_consumers
        if excess <= 0:
            return
        frozen = sorted((c for c in self._series if c not in self._active and c not in
                         (IDLE, OTHER)), key=lambda c: (self._series[c].last_active, c))
        members = sorted(self._active, key=lambda c: (self._score.get(c, 0.0), c))
        for consumer in [*frozen, *members][:excess]:
            self._active.discard(consumer)
            self._forget(consumer)

    def _forget(self, consumer: Consumer) -> None:
        """The series stops being exported; its totals wait in memory."""
        series = self._series.pop(consumer, None)
        if series is None:
            return
        series.active = False
        self._memory[consumer] = series
        self._memory.move_to_end(consumer)
        while len(self._memory) > self._remember:
            self._memory.popitem(last=False)

    def update(
        self,
        energy: Mapping[Consumer, Mapping[str, float]],
        interval_seconds: float,
        grams: Mapping[Consumer, float] | None = None,
        embodied_grams: Mapping[Consumer, float] | None = None,
    ) -> None:
        """Account one tick: `energy[consumer][component]` joules over `interval_seconds`,
        and each consumer's operational and embodied CO2e grams, which fold with its energy."""
        now = self.clock()
        # A consumer gets a series once it has used energy: an idle kernel thread never does.
        energy = {
            c: parts for c, parts in energy.items()
            if c in self._series or any(parts.values())
        }
        per_second = 1.0 / interval_seconds if interval_seconds > 0 else 0.0
        live = {
            c: math.fsum(parts.values()) * per_second
            for c, parts in energy.items()
            if c not in (IDLE, OTHER)
        }
        self._rank(live, interval_seconds)
        self._select()

        for series in self._series.values():
            series.watts = dict.fromkeys(series.watts, 0.0)
        other = self._series[OTHER]
        for consumer, parts in energy.items():
            if consumer in (IDLE, OTHER) or consumer in self._active:
                series = self._series.get(consumer)
                if series is None:
                    series = self._memory.pop(consumer, None) or _Series()
                    series.watts = {}
                    self._series[consumer] = series
                series.active, series.last_active = True, now
                target = series
            else:
                target = other
            if grams:
                target.grams += grams.get(consumer, 0.0)
            if embodied_grams:
                target.embodied_grams += embodied_grams.get(consumer, 0.0)
            for component, joules in parts.items():
                target.joules[component] = target.joules.get(component, 0.0) + joules
                target.watts[component] = target.watts.get(component, 0.0) + joules * per_second
        self._expire(now)

    def _expire(self, now: float) -> None:
        for consumer in list(self._series):
            if consumer in (IDLE, OTHER) or consumer in self._active:
                continue
            series = self._series[consumer]
            series.active = False  # folded or finished: counter frozen, power 0
            if now - series.last_active > self.retention_seconds:
                self._forget(consumer)

    def samples(self) -> list[SeriesSample]:
        """Everything to export now, stable order (idle, other, then by consumer)."""
        out = []
        for consumer in self._order():
            series = self._series[consumer]
            for component in sorted(series.joules):
                out.append(
                    SeriesSample(
                        consumer,
                        component,
                        series.joules[component],
                        series.watts.get(component, 0.0) if series.active else 0.0,
                    )
                )
        return out

    def _order(self) -> list[Consumer]:
        return sorted(self._series, key=lambda c: (c not in (IDLE, OTHER), c))

    def emissions(self) -> list[tuple[Consumer, float]]:
        """carbond_consumer_emissions_grams_total: the same consumers as `samples()`."""
        return [(consumer, self._series[consumer].grams) for consumer in self._order()]

    def embodied(self) -> list[tuple[Consumer, float]]:
        """carbond_consumer_embodied_grams_total: the same consumers as `samples()`."""
        return [(c, self._series[c].embodied_grams) for c in self._order()]
