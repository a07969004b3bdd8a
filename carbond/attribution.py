"""Energy -> consumers: pure functions of one tick's deltas, plus the idle-baseline learner.

Invariant (DESIGN.md): every tick the consumers, `idle` and `other` included, sum to the host
energy within 1e-9 relative. Splits are computed share by share and the rounding remainder is
put on the largest part, so `math.fsum` of the result equals the input energy.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

from carbond.consumers import IDLE, Consumer

SEPARATE, PROPORTIONAL = "separate", "proportional"
POLICIES = (SEPARATE, PROPORTIONAL)


def _split(joules: float, weights: Mapping[Consumer, float]) -> dict[Consumer, float]:
    """`joules` in proportion to positive weights; exact sum by putting rounding on the max."""
    positive = {c: w for c, w in weights.items() if w > 0 and math.isfinite(w)}
    total = math.fsum(positive.values())
    if total <= 0:
        return {}
    parts = {c: joules * (w / total) for c, w in positive.items()}
    largest = max(parts, key=parts.__getitem__)
    parts[largest] += joules - math.fsum(parts.values())
    return parts


def _add(into: dict[Consumer, float], parts: Mapping[Consumer, float]) -> None:
    for consumer, joules in parts.items():
        into[consumer] = into.get(consumer, 0.0) + joules


def split_energy(
    energy_joules: float,
    interval_seconds: float,
    idle_watts: float,
    policy: str,
    usage_cpu_seconds: Mapping[Consumer, float],
) -> dict[Consumer, float]:
    """One tick of CPU energy per consumer.

    Dynamic energy ΔE - P_idle·Δt is split by CPU-time share; idle energy goes to `idle`
    (separate) or is shared by CPU time too (proportional). ΔE below the idle baseline is all
    idle; no CPU time at all is all `idle`. Every consumer in `usage_cpu_seconds` appears in
    the result (0.0 if it used nothing) and `idle` always does.
    """
    if policy not in POLICIES:
        raise ValueError(f"idle policy must be one of {POLICIES}, not {policy!r}")
    if idle_watts < 0 or interval_seconds < 0:
        raise ValueError("idle_watts and interval_seconds must not be negative")
    result = dict.fromkeys(usage_cpu_seconds, 0.0)
    result[IDLE] = 0.0
    if energy_joules <= 0 or not math.isfinite(energy_joules):
        result[IDLE] = energy_joules if math.isfinite(energy_joules) else 0.0
        return result
    weights = {c: s for c, s in usage_cpu_seconds.items() if c != IDLE}
    idle_joules = min(energy_joules, idle_watts * interval_seconds)
    if policy == PROPORTIONAL:
        parts = _split(energy_joules, weights)
        if not parts:
            parts = {IDLE: energy_joules}
    else:
        parts = _split(energy_joules - idle_joules, weights)
        if parts:
            parts[IDLE] = parts.get(IDLE, 0.0) + idle_joules
        else:
            parts = {IDLE: energy_joules}
    _add(result, parts)
    return result


def follow_split(energy_joules: float, split: Mapping[Consumer, float]) -> dict[Consumer, float]:
    """Another component's energy (DRAM) with the same shares as a computed CPU split."""
    result = dict.fromkeys(split, 0.0)
    result.setdefault(IDLE, 0.0)
    if energy_joules <= 0 or not math.isfinite(energy_joules):
        result[IDLE] = energy_joules if math.isfinite(energy_joules) else 0.0
        return result
    parts = _split(energy_joules, split)
    _add(result, parts or {IDLE: energy_joules})
    return result


def cpu_share(usage_cpu_seconds: Mapping[Consumer, float]) -> dict[Consumer, float]:
    """Fractions of CPU time (for tests, `carbond top`); empty when nothing ran."""
    total = math.fsum(s for s in usage_cpu_seconds.values() if s > 0)
    if total <= 0:
        return {}
    return {c: max(0.0, s) / total for c, s in usage_cpu_seconds.items()}


class IdleBaseline:
    """P_idle for one component: configured watts, or learned from observed host power.

    Learned: a low percentile (default the 5th) of the per-tick mean power over a rolling
    window (default one hour), kept in a bounded deque. Until `min_samples` ticks have been
    seen it returns 0 W, so a fresh start attributes everything as dynamic rather than calling
    the first busy minute "idle".
    """

    def __init__(
        self,
        fixed_watts: float | None = None,
        percentile: float = 5.0,
        window_seconds: float = 3600.0,
        min_samples: int = 12,
        max_samples: int = 4096,
    ) -> None:
        if fixed_watts is not None and (fixed_watts < 0 or not math.isfinite(fixed_watts)):
            raise ValueError("fixed idle watts must be a finite number >= 0")
        if not 0 <= percentile <= 100:
            raise ValueError("percentile must be within 0..100")
        self.fixed_watts = fixed_watts
        self.percentile = percentile
        self.window_seconds = window_seconds
        self.min_samples = min_samples
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def observe(self, watts: float, now_seconds: float) -> None:
        """Record one tick's mean host power (for this component) at monotonic time `now`."""
        if self.fixed_watts is not None or not math.isfinite(watts) or watts < 0:
            return
        self._samples.append((now_seconds, watts))
        horizon = now_seconds - self.window_seconds
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def watts(self) -> float:
        if self.fixed_watts is not None:
            return self.fixed_watts
        if len(self._samples) < self.min_samples:
            return 0.0
        ordered = sorted(w for _, w in self._samples)
        rank = (len(ordered) - 1) * self.percentile / 100.0
        low, high = math.floor(rank), math.ceil(rank)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
