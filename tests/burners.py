"""Real CPU burners with a known duty cycle, started directly inside a cgroup.

Each burner busy-loops `duty` of every `period_ms` and sleeps the rest. It is started through
`sh -c 'echo $$ > cgroup.procs; exec python3 ...'`, so all of its CPU time lands in the target
cgroup (no preexec_fn: the tests run threads). Tests compare against the kernel's own counters,
never against wall-clock expectations, so a loaded machine doesn't make them flaky.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

_SCRIPT = """
import time
duty, period = {duty!r}, {period!r}
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    rest = period - (time.perf_counter() - start)
    if rest > 0:
        time.sleep(rest)
"""


class Burners:
    """Starts burners and guarantees they are all killed (and reaped) at `stop_all()`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, duty: float, procs_file: str | None = None, period_ms: float = 10.0):
        code = _SCRIPT.format(duty=duty, period=period_ms / 1000.0)
        python = shlex.quote(sys.executable)
        move = f"echo $$ > {shlex.quote(procs_file)} && " if procs_file else ""
        cmd = f"{move}exec {python} -S -c {shlex.quote(code)}"
        proc = subprocess.Popen(["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], reap_after: float = 0.0) -> None:
        """SIGKILL; `reap_after` leaves it a zombie a while (its cgroup stays readable)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if reap_after:
            time.sleep(reap_after)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                self.kill(proc)
        self.procs.clear()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
