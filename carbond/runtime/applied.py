"""Which configuration the running daemon has in force, written where `carbond reload` reads it.

SIGHUP alone cannot answer: the signal is delivered whether or not the new file is taken, so a
reload that only signalled would report success for a configuration the daemon refused. The
daemon therefore records, after every (re)load it finishes, the sha256 of the configuration
file bytes it parsed and a serial that grows with each reload attempt; `carbond reload` sends
SIGHUP and waits for a newer serial with the digest of the bytes it validated itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from carbond.runtime.files import write_atomically

log = logging.getLogger(__name__)

APPLIED_FILE = "config-applied"
REASON_MAX_CHARS = 500  # a refusal reason is one line for `systemctl status`, not a dump


@dataclass(frozen=True)
class Applied:
    """One record: the daemon `pid`, its `serial`-th (re)load, the digest in force (None: run
    without a configuration file) and, when that attempt was refused, why."""

    pid: int
    serial: int
    sha256: str | None
    refused: str | None = None


def applied_path(state_dir: str) -> str:
    return os.path.join(state_dir, APPLIED_FILE)


def read_applied(state_dir: str) -> Applied | None:
    """The record, or None when there is none or it is not one (a reader never raises)."""
    try:
        with open(applied_path(state_dir), "rb") as handle:
            data = json.loads(handle.read(64 * 1024))
        pid, serial = data["pid"], data["serial"]
        sha256, refused = data.get("sha256"), data.get("refused")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if (type(pid) is not int or type(serial) is not int
            or not (sha256 is None or isinstance(sha256, str))
            or not (refused is None or isinstance(refused, str))):
        return None
    return Applied(pid, serial, sha256, refused)


def _write(state_dir: str, record: Applied) -> bool:
    text = json.dumps({"pid": record.pid, "serial": record.serial, "sha256": record.sha256,
                       "refused": record.refused}) + "\n"
    try:
        write_atomically(applied_path(state_dir), text)
    except OSError as exc:  # the daemon runs on; only `carbond reload` cannot confirm
        log.warning("cannot record the configuration in force in %s: %s",
                    applied_path(state_dir), exc.strerror or exc)
        return False
    return True


def _next_serial(state_dir: str, pid: int) -> tuple[int, str | None]:
    """This process's next serial and the digest it has in force (a new process starts at 0)."""
    last = read_applied(state_dir)
    if last is None or last.pid != pid:
        return 0, None
    return last.serial + 1, last.sha256


def record_applied(state_dir: str, sha256: str | None, pid: int | None = None) -> bool:
    """After a successful start or reload: `sha256` of the configuration bytes now in force."""
    pid = os.getpid() if pid is None else pid
    serial, _ = _next_serial(state_dir, pid)
    return _write(state_dir, Applied(pid, serial, sha256))


def record_refused(state_dir: str, reason: str, pid: int | None = None) -> bool:
    """After a reload that kept the old configuration: the digest in force stays, with why."""
    pid = os.getpid() if pid is None else pid
    serial, in_force = _next_serial(state_dir, pid)
    line = " ".join(reason.split())[:REASON_MAX_CHARS] or "refused"
    return _write(state_dir, Applied(pid, serial, in_force, line))
