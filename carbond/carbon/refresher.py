"""Keeps a current intensity figure fresh off the tick thread.

A daemon thread polls each network provider on its own schedule (refresh period, exponential
backoff with jitter after failures, Retry-After on 429). Ticks only call `current()`, which
reads a few fields under a lock and never waits on the network. The last good value of each
provider is cached in the state directory so a restart does not fall back to the annual table
while the API is slow or down. A figure dated in the future (it would never go stale) or older
than max_age (it would never be used) is a failed fetch, from the API and from the cache alike.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from carbond.carbon.intensity import (
    FUTURE_TOLERANCE_SECONDS,
    FetchError,
    Intensity,
    check_observed_at,
    date_problem,
    describe_time,
)
from carbond.carbon.providers import Provider
from carbond.runtime.files import write_atomically

log = logging.getLogger(__name__)

DEFAULT_REFRESH_SECONDS = 15 * 60.0
DEFAULT_MAX_AGE_SECONDS = 2 * 3600.0
BACKOFF_BASE_SECONDS = 30.0
CACHE_FILE = "intensity-cache.json"
CACHE_VERSION = 1


def backoff_seconds(failures: int, base_seconds: float, cap_seconds: float, jitter: float) -> float:
    """Delay before the next try after `failures` consecutive failures (>= 1).

    Exponential, capped, with "equal jitter": half fixed, half random (`jitter` in [0, 1)), so
    a fleet that failed together does not retry together.
    """
    exponent = min(max(failures, 1) - 1, 30)
    delay = min(cap_seconds, base_seconds * (2.0**exponent))
    return delay / 2.0 + delay / 2.0 * jitter


@dataclass
class _ProviderState:
    provider: Provider
    value: Intensity | None = None
    next_attempt_at: float = 0.0
    scheduled_at: float = 0.0  # when next_attempt_at was set; a clock stepped back re-arms it
    failures: int = 0  # consecutive, for backoff
    errors: int = 0  # total, for carbond_intensity_fetch_errors_total


class IntensityFeed:
    """The intensity in use: the first provider, in configured order, with a fresh value.

    Network values are fresh while `age_seconds <= max_age_seconds`; local providers (constant,
    static) always are. `start()` launches the refresh thread; `refresh_now()` runs one
    synchronous round (tests, `carbond intensity`, `carbond check`).
    """

    def __init__(
        self,
        providers: Sequence[Provider],
        zone: str,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        state_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        backoff_base_seconds: float = BACKOFF_BASE_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        if not providers:
            raise ValueError("at least one provider is needed")
        self.zone = zone
        self._in_use: tuple[str, str] | None = None  # (provider, zone) of the figure in use
        self.refresh_seconds = float(refresh_seconds)
        self.max_age_seconds = float(max_age_seconds)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.clock = clock
        self.backoff_base_seconds = float(backoff_base_seconds)
        self._rng = rng or random.Random()
        self._states = [_ProviderState(p) for p in providers]
        self._lock = threading.Lock()  # guards the small state above; never held over I/O
        self._refresh_lock = threading.Lock()  # one refresh round at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache_warned = False
        self._load_cache()

    # ------------------------------------------------------------ reading (tick thread)

    def current(self) -> Intensity | None:
        """The figure to use now, or None only if every provider lacks a fresh value (static
        is always configured by build_providers, so in practice never None)."""
        now = self.clock()
        value = None
        with self._lock:
            for state in self._states:
                if not state.provider.network:  # a local figure: pure, instant
                    value = state.provider.fetch(now)
                    break
                if state.value is not None and self._fresh(state.value, now):
                    value = state.value
                    break
            self._note_in_use(value)
        return value

    def _note_in_use(self, value: Intensity | None) -> None:
        """One log line when the figure in use changes provider or looked-up zone."""
        in_use = None if value is None else (value.provider, value.zone)
        if in_use == self._in_use:
            return
        self._in_use = in_use
        if value is not None and value.zone != self.zone:
            log.info("intensity provider %s answers for zone %s with the figure of %s",
                     value.provider, self.zone, value.zone)

    def fetch_errors(self) -> dict[str, int]:
        """Rejected or failed fetches per provider name, cumulative since start."""
        with self._lock:
            return {s.provider.name: s.errors for s in self._states}

    @property
    def providers(self) -> list[Provider]:
        return [s.provider for s in self._states]

    # ------------------------------------------------------------ refreshing

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="carbond-intensity", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 2.0) -> None:
        """Ask the thread to end and wait up to `timeout_seconds`; a fetch in flight is bounded
        by the request timeout, and the thread is a daemon, so exit never hangs on it."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_seconds)

    def refresh_now(self, force: bool = True) -> dict[str, str]:
        """One synchronous round; `force` ignores the schedule and backoff.

        Returns provider -> "ok" or the failure reason, for the CLI and tests.
        """
        outcome: dict[str, str] = {}
        with self._refresh_lock:
            for state in self._states:
                provider = state.provider
                if not provider.network:
                    continue
                if self._stop.is_set() and not force:
                    break
                if not force and not self._due(state, self.clock()):
                    continue
                outcome[provider.name] = self._refresh_one(state)
        return outcome

    @staticmethod
    def _due(state: _ProviderState, now: float) -> bool:
        return now >= state.next_attempt_at or now < state.scheduled_at

    def _refresh_one(self, state: _ProviderState) -> str:
        provider = state.provider
        started = self.clock()
        try:
            value = provider.fetch(started)
            check_observed_at(value.observed_at, started, self.max_age_seconds)
        except FetchError as exc:
            return self._failed(state, exc, started)
        except Exception as exc:  # a provider bug must not end the thread
            log.exception("intensity provider %s failed unexpectedly", provider.name)
            return self._failed(state, FetchError("internal", type(exc).__name__), started)
        with self._lock:
            state.value = value
            state.failures = 0
            state.next_attempt_at = started + self.refresh_seconds
            state.scheduled_at = started
        log.debug("intensity %s %s: %.1f g/kWh", provider.name, value.zone, value.grams_per_kwh)
        self._save_cache()
        return "ok"

    def _failed(self, state: _ProviderState, exc: FetchError, now: float) -> str:
        with self._lock:
            state.failures += 1
            state.errors += 1
            # Never wait longer after a failure than a healthy refresh would.
            delay = backoff_seconds(
                state.failures,
                min(self.backoff_base_seconds, self.refresh_seconds),
                self.refresh_seconds,
                self._rng.random(),
            )
            if exc.retry_after_seconds is not None:
                delay = max(delay, exc.retry_after_seconds)
            state.next_attempt_at = now + delay
            state.scheduled_at = now
        # str(exc) is built by carbond from the reason and public facts only: no secrets.
        log.warning("intensity provider %s: %s; next try in %.0fs", state.provider.name, exc, delay)
        return exc.reason

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_now(force=False)
            except Exception:  # keep the thread alive whatever happens
                log.exception("intensity refresh round failed")
            with self._lock:
                pending = [s.next_attempt_at for s in self._states if s.provider.network]
            if not pending:
                return
            wait = max(0.05, min(pending) - self.clock())
            self._wake.wait(min(wait, 60.0))
            self._wake.clear()

    # ------------------------------------------------------------ freshness and cache

    def _fresh(self, value: Intensity, now: float) -> bool:
        """Not older than max_age, and not ahead of now by more than the tolerance (a clock
        stepped back a day must not make a figure fresh for a day)."""
        return date_problem(value.observed_at, now, self.max_age_seconds) is None

    def _cache_path(self) -> Path | None:
        return self.state_dir / CACHE_FILE if self.state_dir is not None else None

    def _load_cache(self) -> None:
        """Reuse cached values that are for this zone and still fresh; schedule the next fetch
        one refresh period after the cached fetch, so restart loops do not hammer the APIs.

        Cached values get the checks fetched ones do: one dated (or fetched) in the future is
        dropped with a warning, one older than max_age with an info line."""
        path = self._cache_path()
        if path is None:
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring intensity cache %s: %s", path, type(exc).__name__)
            return
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return
        if data.get("zone") != self.zone or not isinstance(data.get("providers"), dict):
            return
        now = self.clock()
        for state in self._states:
            entry = data["providers"].get(state.provider.name)
            if entry is None or not state.provider.network:
                continue
            try:
                value = Intensity.from_json(entry)
            except (ValueError, FetchError):
                continue
            if value.provider != state.provider.name or not self._cached_usable(value, now):
                continue
            state.value = value
            fetched_at = min(now, value.fetched_at)
            state.next_attempt_at = max(now, fetched_at + self.refresh_seconds)
            state.scheduled_at = fetched_at

    def _cached_usable(self, value: Intensity, now: float) -> bool:
        problem = date_problem(value.observed_at, now, self.max_age_seconds)
        if problem is None and value.fetched_at - now > FUTURE_TOLERANCE_SECONDS:
            problem = "future_date"  # it would put the next fetch off until then
        if problem == "future_date":
            log.warning(
                "ignoring cached %s intensity: dated %s, fetched %s, ahead of now (%s)",
                value.provider,
                describe_time(value.observed_at),
                describe_time(value.fetched_at),
                describe_time(now),
            )
        elif problem == "stale_date":
            log.info(
                "ignoring cached %s intensity: dated %s, older than max_age %gs",
                value.provider,
                describe_time(value.observed_at),
                self.max_age_seconds,
            )
        return problem is None

    def _save_cache(self) -> None:
        """Atomic write (temp file + rename); a full or read-only disk only logs, once."""
        path = self._cache_path()
        if path is None:
            return
        with self._lock:
            payload = {
                "version": CACHE_VERSION,
                "zone": self.zone,
                "providers": {
                    s.provider.name: s.value.to_json()
                    for s in self._states
                    if s.value is not None and s.provider.network
                },
            }
        try:
            write_atomically(path, json.dumps(payload, indent=1, sort_keys=True))
        except OSError as exc:
            if not self._cache_warned:
                log.warning(
                    "cannot write intensity cache %s: %s", path, exc.strerror or type(exc).__name__
                )
                self._cache_warned = True
            return
        self._cache_warned = False

