"""Calls a tick can stop waiting for.

A read of a kernel file can block (a hung driver, a FIFO where a counter should be), and a
blocked read cannot be interrupted. Each source therefore reads on its own daemon thread; the
tick waits up to a deadline, and a source that misses it is down for that tick while the rest
of the host is still accounted. Its next call is not queued behind the stuck one: the source
stays down until the stuck call returns. Counters are cumulative, so the energy of the ticks it
missed arrives with its next good reading. Daemon threads never hold up shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class Missed(Exception):
    """The call did not return within its deadline (or an earlier one still has not)."""


class DeadlineWorker(Generic[T]):
    """One source's calls, on one daemon thread started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.missed_total = 0
        self._calls: queue.SimpleQueue[_Call[T]] = queue.SimpleQueue()
        self._outstanding: _Call[T] | None = None
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T], timeout_seconds: float) -> T:
        """fn()'s result, its exception, or Missed after `timeout_seconds`."""
        outstanding = self._outstanding
        if outstanding is not None and not outstanding.done.is_set():
            self.missed_total += 1
            raise Missed(f"{self.name}: an earlier read has not returned")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"carbond-{self.name}",
                                            daemon=True)
            self._thread.start()
        call: _Call[T] = _Call(fn)
        self._outstanding = call
        self._calls.put(call)
        if not call.done.wait(timeout_seconds):
            self.missed_total += 1
            log.warning("%s did not answer within %gs: down until it does", self.name,
                        timeout_seconds)
            raise Missed(f"{self.name}: no answer within {timeout_seconds:g}s")
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call.result = call.fn()
            except BaseException as exc:  # handed to the caller, never lost with the thread
                call.error = exc
            finally:
                call.done.set()
