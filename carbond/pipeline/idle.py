"""P_idle, the CPU power a host draws with nothing running, learned so that busy is not idle.

A low percentile of host power is the idle power only if the host is sometimes idle. A GPU
training server is busy around the clock, so that percentile is its busy power and nearly all
CPU energy used to land on `idle`. Utilisation tells the two apart: CPU power rises roughly
linearly with utilisation, P = P_idle + k·u, so where utilisation varies the intercept of a
line of power against utilisation is the power at u = 0, even on a host that is never at
u = 0. The fit is robust (minutes that fit badly, such as a meter glitch, are down-weighted)
and is clamped to [0, lowest power seen]: noise can carry the extrapolation below zero, and
real curves are slightly concave, which carries it high.

Where utilisation barely varies the line has no intercept to give, and the fallback must not
call busy power idle: it takes the idle share of the power, P·(1 - u), averaged per minute, from
the quietest minute. A host pinned at 100% then gets ~0 W idle (everything is dynamic, which is
true of the work it does) and a host at 0% gets all its power as idle. In between it errs high
by up to the dynamic power times u, the price of not knowing the slope.

Until `min_samples` ticks are seen P_idle is 0 W (everything dynamic). Memory is O(1): running
sums per one-minute bucket over a rolling hour, whatever the tick rate. The sums are saved as
JSON with wall-clock timestamps, since the monotonic clock does not survive a reboot, so a
restart keeps what was learned within the window. The maths does no I/O; `save`/`load` do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from carbond.runtime.files import write_atomically

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 20  # a full hour of one-minute buckets is ~18 KB
MAX_WATTS = 1e6  # a megawatt for one host's CPUs is a broken meter, not a reading
MIN_SPREAD = 0.05  # std dev of utilisation (5 points) below which the line is not fitted
MIN_SLOPE_T = 3.0  # the slope must stand 3 standard errors clear of zero
HUBER_K = 3.0  # minutes whose RMS residual exceeds 3 typical ones are down-weighted
ROBUST_ROUNDS = 4

FIXED, WARMING, FIT, FALLBACK = "fixed", "warming", "fit", "fallback"
_FIELDS = ("n", "sum_u", "sum_w", "sum_uu", "sum_uw", "sum_ww", "sum_idle", "min_w")


@dataclass
class _Bucket:
    """Running sums of one bucket's ticks: u is utilisation, w watts, idle w·(1 - u)."""

    start_seconds: float
    last_seconds: float
    n: int = 0
    sum_u: float = 0.0
    sum_w: float = 0.0
    sum_uu: float = 0.0
    sum_uw: float = 0.0
    sum_ww: float = 0.0
    sum_idle: float = 0.0
    min_w: float = math.inf

    def add(self, watts: float, utilisation: float, now_seconds: float) -> None:
        self.last_seconds = now_seconds
        self.n += 1
        self.sum_u += utilisation
        self.sum_w += watts
        self.sum_uu += utilisation * utilisation
        self.sum_uw += utilisation * watts
        self.sum_ww += watts * watts
        self.sum_idle += watts * (1.0 - utilisation)
        self.min_w = min(self.min_w, watts)

    def squared_residuals(self, intercept: float, slope: float) -> float:
        """Σ(w - a - b·u)² over this bucket's ticks, from the sums alone."""
        a, b = intercept, slope
        total = (self.sum_ww - 2 * a * self.sum_w - 2 * b * self.sum_uw + a * a * self.n
                 + 2 * a * b * self.sum_u + b * b * self.sum_uu)
        return max(0.0, total)


@dataclass(frozen=True)
class _Line:
    intercept: float
    slope: float
    spread: float  # std dev of utilisation
    slope_t: float  # slope / its standard error


def _fit(buckets: list[_Bucket], weights: list[float]) -> _Line | None:
    """Weighted least squares of watts on utilisation over whole buckets."""
    n = su = sw = suu = suw = sww = 0.0
    for wt, b in zip(weights, buckets, strict=True):
        n += wt * b.n
        su += wt * b.sum_u
        sw += wt * b.sum_w
        suu += wt * b.sum_uu
        suw += wt * b.sum_uw
        sww += wt * b.sum_ww
    if n <= 2:
        return None
    sxx, sxy, syy = suu - su * su / n, suw - su * sw / n, sww - sw * sw / n
    if not sxx > 0:
        return None
    slope = sxy / sxx
    intercept = (sw - slope * su) / n
    residual_var = max(0.0, syy - slope * sxy) / (n - 2)
    slope_se = math.sqrt(residual_var / sxx)
    slope_t = slope / slope_se if slope_se > 0 else (math.inf if slope > 0 else 0.0)
    return _Line(intercept, slope, math.sqrt(sxx / n), slope_t)


def _robust_fit(buckets: list[_Bucket]) -> _Line | None:
    """Huber-style reweighting by bucket: a bad minute counts less, a good one fully."""
    weights = [1.0] * len(buckets)
    line = _fit(buckets, weights)
    for _ in range(ROBUST_ROUNDS):
        if line is None:
            return None
        rms = [math.sqrt(b.squared_residuals(line.intercept, line.slope) / b.n) for b in buckets]
        typical = sorted(rms)[len(rms) // 2]
        if not typical > 0:
            break
        limit = HUBER_K * typical
        weights = [1.0 if r <= limit else limit / r for r in rms]
        line = _fit(buckets, weights)
    return line


class IdleBaseline:
    """P_idle for the CPU: configured watts, or learned from power against utilisation.

    Thread-safe: the daemon ticks in one thread and saves from another.
    """

    def __init__(
        self,
        fixed_watts: float | None = None,
        window_seconds: float = 3600.0,
        bucket_seconds: float = 60.0,
        min_samples: int = 12,
        min_spread: float = MIN_SPREAD,
    ) -> None:
        if fixed_watts is not None and not (math.isfinite(fixed_watts) and fixed_watts >= 0):
            raise ValueError("fixed idle watts must be a finite number >= 0")
        if not (math.isfinite(window_seconds) and window_seconds > 0):
            raise ValueError("window_seconds must be a finite number > 0")
        if not (math.isfinite(bucket_seconds) and 0 < bucket_seconds <= window_seconds):
            raise ValueError("bucket_seconds must be within (0, window_seconds]")
        if min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        if not (math.isfinite(min_spread) and 0 <= min_spread <= 0.5):
            raise ValueError("min_spread must be within 0..0.5")
        self.fixed_watts = fixed_watts
        self.window_seconds = float(window_seconds)
        self.bucket_seconds = float(bucket_seconds)
        self.min_samples = min_samples
        self.min_spread = min_spread
        # Bucket starts are >= bucket_seconds apart and all within the window (+1 bucket).
        self._buckets: deque[_Bucket] = deque(
            maxlen=math.ceil(self.window_seconds / self.bucket_seconds) + 2
        )
        self._last_seconds: float | None = None
        self._unanchored = False  # loaded buckets wait for the first monotonic time
        self._loaded_wall_seconds = 0.0  # wall time that loaded, unanchored offsets count from
        self._cached: tuple[float, str] | None = None
        self._lock = threading.Lock()

    # -- learning ------------------------------------------------------------------------

    def observe(self, watts: float, utilisation: float, now_seconds: float) -> None:
        """One tick: mean CPU watts and host CPU utilisation (0..1) over it, monotonic time.

        Non-finite or negative values, watts above MAX_WATTS and time running backwards are
        ignored; utilisation above 1 (sampling skew) counts as 1.
        """
        if self.fixed_watts is not None:
            return
        if not (math.isfinite(watts) and 0 <= watts <= MAX_WATTS):
            return
        if not (math.isfinite(utilisation) and utilisation >= 0 and math.isfinite(now_seconds)):
            return
        utilisation = min(1.0, utilisation)
        with self._lock:
            if self._unanchored:
                self._anchor(now_seconds)
            if self._last_seconds is not None and now_seconds < self._last_seconds:
                return
            self._last_seconds = now_seconds
            horizon = now_seconds - self.window_seconds
            while self._buckets and self._buckets[0].last_seconds < horizon:
                self._buckets.popleft()
            current = self._buckets[-1] if self._buckets else None
            if current is None or now_seconds - current.start_seconds >= self.bucket_seconds:
                current = _Bucket(now_seconds, now_seconds)
                self._buckets.append(current)
            current.add(watts, utilisation, now_seconds)
            self._cached = None

    def _anchor(self, now_seconds: float) -> None:
        """Loaded buckets carry times relative to 0 = the load; put them on this clock."""
        for bucket in self._buckets:
            bucket.start_seconds += now_seconds
            bucket.last_seconds += now_seconds
        self._last_seconds = now_seconds if self._buckets else None
        self._unanchored = False

    def watts(self) -> float:
        """The current P_idle in watts: finite, >= 0 and <= the lowest power in the window."""
        return self.estimate()[0]

    def source(self) -> str:
        """How `watts()` was arrived at: fixed, warming, fit or fallback."""
        return self.estimate()[1]

    def estimate(self) -> tuple[float, str]:
        """`watts()` and `source()` together, computed once per tick's worth of new data."""
        if self.fixed_watts is not None:
            return self.fixed_watts, FIXED
        with self._lock:
            if self._cached is None:
                self._cached = self._estimate(list(self._buckets))
            return self._cached

    def _estimate(self, buckets: list[_Bucket]) -> tuple[float, str]:
        if sum(b.n for b in buckets) < self.min_samples:
            return 0.0, WARMING
        lowest = min(b.min_w for b in buckets)
        line = _robust_fit(buckets)
        if (line is not None and line.spread >= self.min_spread and line.slope > 0
                and line.slope_t >= MIN_SLOPE_T and math.isfinite(line.intercept)):
            return min(max(0.0, line.intercept), lowest), FIT
        quietest = min(b.sum_idle / b.n for b in buckets)
        if not math.isfinite(quietest):
            return 0.0, FALLBACK
        return min(max(0.0, quietest), lowest), FALLBACK

    # -- persistence ---------------------------------------------------------------------

    def to_state(self, wall_now: float, now_seconds: float | None = None) -> dict[str, Any]:
        """JSON-able sums with wall-clock times; `now_seconds` defaults to the last tick's."""
        with self._lock:
            buckets = list(self._buckets)
            if self._unanchored:  # loaded, nothing observed since: offsets from the load
                wall_now, now = self._loaded_wall_seconds, 0.0
            else:
                now = now_seconds if now_seconds is not None else (self._last_seconds or 0.0)
            return {
                "version": STATE_VERSION,
                "saved_wall_seconds": wall_now,
                "buckets": [
                    {
                        "start_wall_seconds": wall_now - (now - b.start_seconds),
                        "last_wall_seconds": wall_now - (now - b.last_seconds),
                        **{name: getattr(b, name) for name in _FIELDS},
                    }
                    for b in buckets
                ],
            }

    @classmethod
    def from_state(
        cls,
        state: object,
        wall_now: float,
        now_seconds: float | None = None,
        **options: Any,
    ) -> IdleBaseline:
        """A learner with the state's buckets younger than the window; garbage gives a fresh one.

        Bucket ages come from the wall clock. Without `now_seconds` they are placed on the
        monotonic clock at the first `observe`, taken as the moment of loading.
        """
        baseline = cls(**options)
        try:
            buckets = _parse_state(state, wall_now, baseline.window_seconds,
                                   baseline.bucket_seconds)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            log.warning("idle baseline state ignored (%s): learning afresh", exc)
            return baseline
        # Offsets relative to 0 = now; anchored below or at the first observation.
        for bucket in buckets[-(baseline._buckets.maxlen or 1):]:
            baseline._buckets.append(bucket)
        baseline._unanchored = bool(baseline._buckets)
        baseline._loaded_wall_seconds = float(wall_now)
        if now_seconds is not None and math.isfinite(now_seconds):
            baseline._anchor(now_seconds)
        return baseline

    def save(self, path: str | os.PathLike[str], wall_now: float,
             now_seconds: float | None = None) -> None:
        """Replace `path` atomically (temp file, fsync, rename; mode 0640). Raises OSError."""
        text = json.dumps(self.to_state(wall_now, now_seconds), allow_nan=False)
        write_atomically(path, text)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        wall_now: float,
        now_seconds: float | None = None,
        **options: Any,
    ) -> IdleBaseline:
        """From a state file; missing, unreadable, corrupt or stale gives a fresh learner."""
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return cls.from_state(None, wall_now, now_seconds, **options)
        except OSError as exc:
            log.warning("cannot read idle baseline state %s (%s): learning afresh",
                        os.fspath(path), exc.strerror or type(exc).__name__)
            raw = b""
        state: object = None
        if len(raw) > MAX_STATE_BYTES:
            log.warning("idle baseline state %s is too large: learning afresh", os.fspath(path))
        elif raw:
            try:
                state = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                log.warning("idle baseline state %s is corrupt (%s): learning afresh",
                            os.fspath(path), type(exc).__name__)
        return cls.from_state(state, wall_now, now_seconds, **options)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _parse_state(
    state: object, wall_now: float, window_seconds: float, skew_seconds: float
) -> list[_Bucket]:
    """Buckets from `to_state` output, times relative to now = 0; raises on anything else.

    A bucket up to `skew_seconds` in the future (the wall clock slewed back a little) counts
    as current; further ahead, the clock was set back and its age is unknown: dropped.
    """
    if state is None:
        return []
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("not an idle baseline state of version 1")
    wall_now = _number(wall_now)
    raw_buckets = state["buckets"]
    if not isinstance(raw_buckets, list):
        raise TypeError("buckets is not a list")
    buckets: list[_Bucket] = []
    for raw in raw_buckets:
        if not isinstance(raw, dict):
            raise TypeError("a bucket is not an object")
        values = {name: _number(raw[name]) for name in _FIELDS}
        start_age = wall_now - _number(raw["start_wall_seconds"])
        last_age = wall_now - _number(raw["last_wall_seconds"])
        n = values["n"]
        if n != int(n) or not 1 <= n <= 1e12:
            raise ValueError("bucket count out of range")
        u, w, idle, low = values["sum_u"], values["sum_w"], values["sum_idle"], values["min_w"]
        slack = 1e-9 * max(1.0, w)
        if not (0 <= u <= n * (1 + 1e-9) and 0 <= values["sum_uu"] <= u * (1 + 1e-9) + 1e-12
                and 0 <= low <= MAX_WATTS and low * n <= w + slack and w <= n * MAX_WATTS
                and values["sum_ww"] >= 0 and -slack <= idle <= w + slack
                and start_age >= last_age):
            raise ValueError("bucket sums are inconsistent")
        if last_age < -skew_seconds or last_age > window_seconds:
            continue  # stale, or from a wall clock that has since been set back
        shift = max(0.0, -last_age)
        bucket = _Bucket(-(start_age + shift), -(last_age + shift))
        for name in _FIELDS:
            setattr(bucket, name, values[name])
        bucket.n = int(n)
        buckets.append(bucket)
    buckets.sort(key=lambda b: b.start_seconds)
    return buckets

