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
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Missed(Exception):
    """The call did not return within its deadline (or an earlier one still has not)."""


class DeadlineWorker(Generic[T]):
    """One source's calls, on one daemon thread started on first use.

    Calls and answers travel on two queues, tagged with a number, so a call costs two queue
    operations and no new lock (a tick makes one call per source); an answer that arrives
    after its caller gave up is dropped by the next call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.missed_total = 0
        self._calls: queue.SimpleQueue[tuple[int, Callable[[], T]]] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[int, T | None, BaseException | None]] = (
            queue.SimpleQueue())
        self._sent = 0  # number of the last call handed to the thread
        self._finished = 0  # number of the last call the thread finished (set by it)
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T], timeout_seconds: float) -> T:
        """fn()'s result, its exception, or Missed after `timeout_seconds`."""
        if self._finished != self._sent:
            self.missed_total += 1
            raise Missed(f"{self.name}: an earlier read has not returned")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"carbond-{self.name}",
                                            daemon=True)
            self._thread.start()
        self._sent += 1
        self._calls.put((self._sent, fn))
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                number, result, error = self._answers.get(
                    timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.missed_total += 1
                log.warning("%s did not answer within %gs: down until it does", self.name,
                            timeout_seconds)
                raise Missed(f"{self.name}: no answer within {timeout_seconds:g}s") from None
            if number != self._sent:
                continue  # the late answer of a call that missed its deadline
            if error is not None:
                raise error
            return result  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            number, fn = self._calls.get()
            result: T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, never lost with the thread
                error = exc
            self._finished = number  # first: the caller may call again as soon as it has
            self._answers.put((number, result, error))  # the answer
