"""`carbond.track(project)`: the footprint of a block of Python code (docs/exec.md).

    with carbond.track("train") as run:
        fit(model)
    print(run.result.grams)

    @carbond.track("train")
    def fit(model): ...

With a daemon on this host the block is measured by it: over its exec socket the daemon moves
this process into a run cgroup for the block and back out at the end, so the process and
every child it starts inside the block (a DataLoader's workers) are the project's, GPU energy
included by those processes' SM share, and the run is in the daemon's ledger under the project
(``USER/PROJECT`` for a user other than root). A cgroup holds whole processes: while the block
runs, every thread of this process is in it, also threads doing other work. Children that
outlive the block stay the project's until they exit; the result covers the block only.
Without a daemon the block is measured alone, as `carbond exec` does (where this process may
make a cgroup), or only its duration and CPU seconds; `result.measured_by` and `result.notes`
say which.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
TICK_SECONDS = 1.0
WAIT_TICKS = 3  # after the block: how many daemon intervals to wait for its next tick


@dataclass
class TrackResult:
    """One block's footprint; `grams` None when no intensity could price it."""

    project: str
    duration_seconds: float
    cpu_seconds: float | None
    cpu_joules: float
    dram_joules: float
    gpu_joules: float
    grams: float | None
    grams_per_kwh: float | None
    provider: str | None
    measured_by: str  # "daemon" or "alone"
    zone: str = ""
    started: float = 0.0  # wall clock, epoch seconds
    ended: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def joules(self) -> float:
        return math.fsum((self.cpu_joules, self.dram_joules, self.gpu_joules))


def _own_cpu_seconds() -> float:
    """This process and its reaped children, user and system."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def default_project() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("-c", "-") else "python"


class track(contextlib.ContextDecorator):
    """Context manager and decorator; `result` (a TrackResult) once the block has ended.

    `listen`: the daemon's HTTP address to read counters from (default: over the exec socket);
    `socket`: the exec socket (default: the config's `exec_socket`); `config`: a carbond.yaml
    (default: /etc/carbond/carbond.yaml when present)."""

    def __init__(self, project: str | None = None, *, listen: str | None = None,
                 socket: str | None = None, config: str | None = None) -> None:
        from carbond.workloads.naming import encode_project

        self.project = project if project is not None else default_project()
        encode_project(self.project)  # ValueError: empty or too long
        self.listen = listen
        self.socket = socket
        self.config_path = config
        self.result: TrackResult | None = None
        self._block: Any = None
        self._parent: track | None = None

    def _recreate_cm(self) -> track:
        """Each call of a decorated function (recursive, in threads) is a block of its own."""
        fresh = copy.copy(self)
        fresh._parent = self
        fresh._block = None
        return fresh

    def __enter__(self) -> track:
        from carbond.runs.measure import start_block

        self.result = None
        self._block = start_block(self.project, self.listen, self.socket, self.config_path)
        return self

    def __exit__(self, *exc: object) -> None:
        block, self._block = self._block, None
        if block is None or block.pid != os.getpid():
            return  # a process forked inside the block: its parent's block counts it
        self.result = block.finish()
        if self._parent is not None:
            self._parent.result = self.result


__all__ = ["TrackResult", "track"]
