"""One start/stop lifecycle for every long-running part, owned by one `Runner`.

Parts start in the order given and stop in reverse, each once, whatever raised: a part whose
start failed is not stopped, every part started before it is. A stop that raises is logged and
the rest still stop, so the ledger is flushed even when the feed's thread misbehaves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    """A part with a thread, a socket or a file behind it."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Part:
    """A service made of two callables (for parts whose own methods have other names)."""

    name: str
    on_start: Callable[[], None] = lambda: None
    on_stop: Callable[[], None] = lambda: None

    def start(self) -> None:
        self.on_start()

    def stop(self) -> None:
        self.on_stop()


class Runner:
    def __init__(self, services: Sequence[Service] = ()) -> None:
        self.services = list(services)
        self._started: list[Service] = []

    def add(self, service: Service) -> None:
        self.services.append(service)

    def start(self) -> None:
        for service in self.services:
            log.debug("starting %s", service.name)
            service.start()
            self._started.append(service)

    def stop(self) -> None:
        while self._started:
            service = self._started.pop()
            log.debug("stopping %s", service.name)
            try:
                service.stop()
            except Exception:
                log.exception("stopping %s failed", service.name)

    def __enter__(self) -> Runner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Periodic:
    """`task()` every `seconds` on a thread of its own, and once more at stop (state that must
    survive a restart: the idle baseline); a task that raises is logged and runs again."""

    def __init__(self, name: str, task: Callable[[], None], seconds: float) -> None:
        self.name = name
        self.task = task
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"carbond-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self._once()

    def _once(self) -> None:
        try:
            self.task()
        except Exception:  # a bug here must not end this thread
            log.exception("%s failed", self.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._once()
