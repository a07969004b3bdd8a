"""How `carbond exec` starts and waits for CMD: the child enters the run's cgroup between fork
and exec, signals are taken synchronously and forwarded, the measurement ticks every second."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from carbond.commands.exec.cgroup import CgroupUnavailable, DaemonRunCgroup, RunCgroup
from carbond.types import name_text

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WATCHED = (*FORWARDED, signal.SIGCHLD)
SI_KERNEL = 0x80  # si_code of a signal the kernel sent itself (the terminal's ^C, hangup)
TICK_SECONDS = 1.0
EXIT_EXEC_FAILED = 125  # exec itself could not run the command (as env, timeout, nice)
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def exit_status(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Signals:
    """SIGINT, SIGTERM, SIGHUP and SIGCHLD blocked in every thread and taken synchronously
    (sigtimedwait), so they are handled between ticks and carry who sent them."""

    def __init__(self) -> None:
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)

    def wait(self, seconds: float, which: Sequence[int] = WATCHED) -> Any:
        return signal.sigtimedwait(which, max(0.0, seconds))

    def pending_stop(self) -> int | None:
        """A pending SIGINT/SIGTERM/SIGHUP, taken now; None when there is none."""
        info = signal.sigtimedwait(FORWARDED, 0)
        return info.si_signo if info is not None else None

    def restore(self) -> None:
        while signal.sigtimedwait(WATCHED, 0) is not None:  # nothing left to act on
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)


def say(err: IO[str], text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        err.write(text if text.endswith("\n") else text + "\n")
        err.flush()


def spawn(command: Sequence[str], cgroup: RunCgroup | DaemonRunCgroup, old_mask: set[int],
          err: IO[str]) -> subprocess.Popen[bytes] | int:
    """Start CMD inside the run's cgroup: the child writes itself into cgroup.procs and
    restores the signal mask between fork and exec. An exit status when it cannot start."""
    try:
        procs_fd = cgroup.open_procs()
    except (CgroupUnavailable, OSError) as exc:
        say(err, f"carbond exec: cannot move the command into its cgroup {cgroup.path}: {exc}")
        return EXIT_EXEC_FAILED
    mask = set(old_mask)

    def enter_cgroup() -> None:  # in the child: two system calls, no locks
        os.write(procs_fd, b"0")
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    shown = name_text(command[0])
    try:
        return subprocess.Popen(list(command), preexec_fn=enter_cgroup, close_fds=True)
    except FileNotFoundError:
        say(err, f"carbond exec: {shown}: command not found")
        return EXIT_NOT_FOUND
    except PermissionError:
        say(err, f"carbond exec: {shown}: permission denied (not executable)")
        return EXIT_NOT_EXECUTABLE
    except subprocess.SubprocessError:
        say(err, f"carbond exec: cannot move the command into its cgroup {cgroup.path}")
        return EXIT_EXEC_FAILED
    except OSError as exc:
        say(err, f"carbond exec: {shown}: cannot execute: {exc.strerror or exc}")
        return EXIT_NOT_EXECUTABLE
    finally:
        os.close(procs_fd)
        cgroup.spawned()


def _reap(pid: int) -> int | None:
    try:
        done, status, _usage = os.wait4(pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere: cannot know its status
        return EXIT_EXEC_FAILED
    return exit_status(status) if done == pid else None


def _forward(pid: int, info: Any) -> None:
    """A signal from the terminal (si_code SI_KERNEL) already reached CMD in the foreground
    process group; one sent to `exec` by a process (kill) is passed on."""
    if info.si_code == SI_KERNEL:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, info.si_signo)


class Supervisor:
    """Waits for CMD, forwarding signals, ticking the measurement every second."""

    def __init__(self, child: subprocess.Popen[bytes], signals: Signals,
                 tick: Callable[[], None]) -> None:
        self.child = child
        self.signals = signals
        self.tick = tick

    def wait(self) -> int:
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            info = self.signals.wait(next_tick - time.monotonic())
            if info is not None and info.si_signo in FORWARDED:
                _forward(self.child.pid, info)
            status = _reap(self.child.pid)
            if status is not None:
                self.child.returncode = status
                return status
            now = time.monotonic()
            if now >= next_tick:
                self.tick()
                next_tick += TICK_SECONDS
                if next_tick <= now:  # overran: skip, never pile up
                    next_tick = now + TICK_SECONDS
