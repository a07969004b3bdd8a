"""A meter's own sampling thread, so the tick only reads what the last sample left.

The platform meters ask slow things (an ACPI method behind a sysfs file, the BMC over the
network or the IPMI driver) on their own cadence; a tick never waits on them. A sample that
raises is handed to the meter's error callback and logged; the thread goes on, so it never
dies silently, and `alive` tells `carbond check` if it somehow did.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Poller:
    """Calls `sample()` at once and then every `interval_seconds` (fixed rate: a slow sample
    delays the next one, it never makes two run back to back) until `stop()`."""

    def __init__(self, name: str, interval_seconds: float, sample: Callable[[], None],
                 on_error: Callable[[BaseException], None]) -> None:
        if not interval_seconds > 0:
            raise ValueError("interval_seconds must be positive")
        self.name = name
        self.interval_seconds = interval_seconds
        self._sample = sample
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_total = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"carbond-{self.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_seconds: float = 10.0) -> bool:
        """Stop and wait up to `timeout_seconds` for a sample in progress; True when the
        thread ended (a daemon thread stuck in a call never holds up shutdown)."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout_seconds)
        return not thread.is_alive()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # counted by the meter, the thread goes on
                log.debug("%s sample failed", self.name, exc_info=True)
                try:
                    self._on_error(exc)
                except Exception:  # pragma: no cover - a broken callback must not end us
                    log.exception("%s: error handler failed", self.name)
            self.samples_total += 1
            next_at += self.interval_seconds
            now = time.monotonic()
            if next_at < now:  # the sample took longer than the interval: skip, not burst
                next_at = now + self.interval_seconds
            self._stop.wait(next_at - now)
