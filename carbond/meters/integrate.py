"""Whole-node power and energy readings -> cumulative joules: pure, no I/O, no threads.

The platform meters (acpi, redfish, ipmi) sample on their own cadence, slower than or
unaligned with the tick, so a tick asks "how much energy up to now?" between samples.
`PowerIntegrator` integrates a power gauge and `CounterTrack` follows an energy counter;
both answer `joules_at(now)` by holding the last power for at most a horizon, and
`Reported` keeps what was handed out from ever going backwards when the next sample shows
the estimate was high. Gaps (time between samples far longer than the cadence) are counted,
never integrated across; a reading above MAX_PLATFORM_WATTS, negative or not finite is an
error, never power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# No single node draws more: a 10 MW answer is a broken BMC or a unit mix-up, not power.
MAX_PLATFORM_WATTS = 100_000.0
TRAPEZOID = "trapezoid"  # instantaneous samples: the mean of the two ends
WINDOW_MEAN = "window mean"  # each sample is the mean over the window before it (power1_average)
RULES = (TRAPEZOID, WINDOW_MEAN)


class ReadingError(ValueError):
    """A sample that cannot be power or energy; the text says why (for `carbond check`)."""


def check_watts(watts: float) -> float:
    """The reading as watts, or ReadingError: NaN, infinite, negative or above the ceiling."""
    if isinstance(watts, bool) or not isinstance(watts, (int, float)):
        raise ReadingError(f"power is not a number ({type(watts).__name__})")
    if not math.isfinite(watts):
        raise ReadingError(f"power is {watts!r}")
    if watts < 0:
        raise ReadingError(f"power is negative ({watts:g} W)")
    if watts > MAX_PLATFORM_WATTS:
        raise ReadingError(f"power {watts:g} W is above {MAX_PLATFORM_WATTS:g} W: no node draws "
                           "that")
    return float(watts)


def check_joules(joules: float) -> float:
    if isinstance(joules, bool) or not isinstance(joules, (int, float)):
        raise ReadingError(f"energy is not a number ({type(joules).__name__})")
    if not math.isfinite(joules):
        raise ReadingError(f"energy is {joules!r}")
    if joules < 0:
        raise ReadingError(f"energy is negative ({joules:g} J)")
    return float(joules)


@dataclass
class Gaps:
    """Sampling gaps seen: intervals between samples too long to integrate across."""

    count: int = 0
    seconds: float = 0.0
    longest_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.longest_seconds = max(self.longest_seconds, seconds)


class PowerIntegrator:
    """A power gauge integrated over monotonic time.

    `max_gap_seconds` is the longest interval between two samples that is integrated: beyond
    it nothing is known about the power in between, so the interval is counted in `gaps`
    and the integration restarts at the later sample.
    """

    def __init__(self, max_gap_seconds: float, rule: str = TRAPEZOID) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
        if not max_gap_seconds > 0:
            raise ValueError("max_gap_seconds must be positive")
        self.max_gap_seconds = max_gap_seconds
        self.rule = rule
        self.joules = 0.0  # integrated up to the last sample
        self.last_seconds: float | None = None
        self.last_watts = 0.0
        self.gaps = Gaps()

    def add(self, now_seconds: float, watts: float) -> float:
        """Take a checked sample (see check_watts); returns the joules it added."""
        previous, self.last_seconds = self.last_seconds, now_seconds
        last_watts, self.last_watts = self.last_watts, watts
        if previous is None:
            return 0.0
        interval = now_seconds - previous
        if interval <= 0:  # the same instant twice: nothing elapsed
            self.last_seconds = previous
            return 0.0
        if interval > self.max_gap_seconds:
            self.gaps.add(interval)
            return 0.0
        added = (last_watts + watts) / 2 * interval if self.rule == TRAPEZOID else (
            watts * interval)
        self.joules += added
        return added

    def restart(self) -> None:
        """Forget the last sample: the next one starts a new integration (after a reading
        that was not power, such as a stale one)."""
        self.last_seconds = None

    def joules_at(self, now_seconds: float, horizon_seconds: float) -> float | None:
        """Energy up to `now`, holding the last power for at most `horizon_seconds` past the
        last sample; None before the first sample or past the horizon (no fresh sample)."""
        if self.last_seconds is None:
            return None
        ahead = max(0.0, now_seconds - self.last_seconds)
        if ahead > horizon_seconds:
            return None
        return self.joules + self.last_watts * ahead


class CounterTrack:
    """An energy counter (Redfish EnergyJoules / EnergykWh), cumulative since the track began.

    The counter is exact when it moves; between moves `joules_at` adds the power (the
    reading beside the counter where the source has one, else the counter's own rate over
    its last move) for the time since the last move. A decrease is a reset of the counter
    (BMC reboot, ResetMetrics): the track continues from the new value. A move implying more
    than MAX_PLATFORM_WATTS is an error.
    """

    def __init__(self) -> None:
        self.joules = 0.0  # cumulative at the last move
        self.last_raw: float | None = None
        self.moved_seconds: float | None = None  # when the counter last moved (or began)
        self.watts = 0.0  # power for the time since the last move
        self.resets = 0

    def add(self, now_seconds: float, raw_joules: float, watts: float | None = None) -> None:
        """A checked counter value (check_joules) and, if the source has one, its power."""
        previous, moved = self.last_raw, self.moved_seconds
        if previous is None or moved is None:
            self.last_raw, self.moved_seconds = raw_joules, now_seconds
            self.watts = watts if watts is not None else 0.0
            return
        if raw_joules < previous:
            self.resets += 1
            self._move(now_seconds, raw_joules, raw_joules, watts)
            return
        delta = raw_joules - previous
        if delta == 0:
            if watts is not None:
                self.watts = watts
            return
        elapsed = now_seconds - moved
        if elapsed > 0 and delta > MAX_PLATFORM_WATTS * elapsed:
            raise ReadingError(f"the energy counter rose by {delta:g} J in {elapsed:g} s, "
                               f"more than {MAX_PLATFORM_WATTS:g} W")
        rate = delta / elapsed if elapsed > 0 else self.watts
        self._move(now_seconds, raw_joules, delta, watts if watts is not None else rate)

    def _move(self, now_seconds: float, raw: float, added: float, watts: float | None) -> None:
        self.joules += added
        self.last_raw, self.moved_seconds = raw, now_seconds
        if watts is not None:
            self.watts = watts

    def restart(self) -> None:
        """Forget the counter: after a stale or failed spell its next move is not energy of
        this track (the host counted its parts meanwhile)."""
        self.last_raw = None
        self.moved_seconds = None

    def joules_at(self, now_seconds: float, horizon_seconds: float) -> float | None:
        """Energy up to `now`: None before the first value or `horizon_seconds` past the last
        move."""
        if self.moved_seconds is None:
            return None
        ahead = max(0.0, now_seconds - self.moved_seconds)
        if ahead > horizon_seconds:
            return None
        return self.joules + self.watts * ahead


class Freshness:
    """Whether a source's readings still move. Readings that do not change at all for
    `stale_seconds` (counter, power beside it and reading time alike) are stale: a working
    node's power is never perfectly still, and a BMC whose sensor task hung repeats its last
    answer. A coarse counter (kWh to three decimals moves every 36 s at 100 W) stays fresh
    while the power beside it moves."""

    def __init__(self, stale_seconds: float) -> None:
        self.stale_seconds = stale_seconds
        self._last: object = None
        self._changed_seconds: float | None = None

    def observe(self, now_seconds: float, reading: object) -> bool:
        """Take a reading (anything comparable); True while the readings are stale."""
        if self._changed_seconds is None or reading != self._last:
            self._last, self._changed_seconds = reading, now_seconds
        return now_seconds - self._changed_seconds > self.stale_seconds


class Reported:
    """What a meter has handed out: never decreasing, whatever the estimates do. When an
    estimate was high, the total holds until the measurements catch up with it."""

    def __init__(self) -> None:
        self.joules = 0.0

    def update(self, estimate_joules: float) -> float:
        self.joules = max(self.joules, estimate_joules)
        return self.joules
