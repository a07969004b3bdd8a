"""`carbond reload --pid PID`: the unit's ExecReload, a reload that tells the truth.

`kill -HUP` succeeds whether or not the daemon then takes the file, so `systemctl reload` said
"Reloaded" for a configuration the daemon refused. This command validates the file as `run`
would (exit 2 with the one-line reason, which `systemctl status` shows, and no signal sent),
then signals the daemon and returns 0 only once the daemon has recorded the digest of these very
bytes as in force (`carbond.runtime.applied`); a refusal, a timeout or a daemon gone is exit 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TextIO

from carbond.carbon import build_providers, resolve_zone
from carbond.config import Config
from carbond.runtime.applied import Applied, applied_path, read_applied
from carbond.web.config import load_web_config

POLL_SECONDS = 0.1
SLACK_SECONDS = 10.0  # beyond two intervals: rebuilding meters and providers, a slow tick


def add_parser(commands: argparse._SubParsersAction,
               add_shared_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = commands.add_parser(
        "reload", help="validate the configuration, have the daemon at --pid take it, and "
        "wait until it is in force (systemd's ExecReload)")
    add_shared_flags(parser)
    parser.add_argument("--pid", metavar="PID", required=True, type=_pid,
                        help="the running daemon ($MAINPID in the unit)")


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a process id, got {text!r}") from None
    if pid <= 1:
        raise argparse.ArgumentTypeError(f"expected a process id above 1, got {pid}")
    return pid


def validate(config: Config) -> None:
    """What `run` checks beyond the file itself: providers (credential files are read here)
    and the web configuration. Raises ConfigError naming the key or flag."""
    build_providers(list(config.providers), resolve_zone(config.zone).zone)
    if config.web_config_file:
        load_web_config(config.web_config_file)


def timeout_for(config: Config) -> float:
    """The daemon takes a reload between two ticks: within one interval, plus the tick."""
    return 2 * config.interval_seconds + SLACK_SECONDS


def _alive(pid: int, proc_root: str = "/proc") -> bool:
    """Running: a process that died but is not yet reaped (a zombie) answers no more."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself hold ')'.
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] not in (b"Z", b"X")


def run_reload(
    config: Config,
    pid: int,
    *,
    send: Callable[[int, int], None] = os.kill,
    alive: Callable[[int], bool] = _alive,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """0: the configuration validated here is in force; 2: it is invalid (nothing signalled);
    1: the daemon could not be asked, refused it, took other bytes, or did not answer."""
    out, err = out or sys.stdout, err or sys.stderr
    validate(config)
    where = applied_path(config.state_dir)
    before = read_applied(config.state_dir)
    if before is None or before.pid != pid:
        # Written at every start, so absent means another state_dir (a restart key) or one
        # the daemon cannot write: its answer could never be read.
        print(f"carbond: error: {where} holds no record of carbond pid {pid}: it runs with "
              "another state_dir (changing state_dir needs a restart) or cannot write there; "
              "not signalled", file=err)
        return 1
    try:
        send(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"carbond: error: no process {pid}", file=err)
        return 1
    except PermissionError:
        print(f"carbond: error: not permitted to signal process {pid}", file=err)
        return 1
    answer = _wait(config, pid, before, timeout_for(config), alive, clock, sleep)
    if isinstance(answer, str):
        print(f"carbond: error: {answer}", file=err)
        return 1
    if answer.refused is not None:
        print(f"carbond: error: carbond kept its running configuration: {answer.refused}",
              file=err)
        return 1
    if answer.sha256 != config.source_sha256:
        print(f"carbond: error: {config.source} changed during the reload: carbond took "
              f"other bytes (sha256 {answer.sha256}) than those validated here; reload again",
              file=err)
        return 1
    shown = f"{config.source} (sha256 {answer.sha256[:12]})" if answer.sha256 else "defaults"
    print(f"carbond: configuration {shown} in force in pid {pid}", file=out)
    return 0


def _wait(config: Config, pid: int, before: Applied, timeout_seconds: float,
          alive: Callable[[int], bool], clock: Callable[[], float],
          sleep: Callable[[float], None]) -> Applied | str:
    """The daemon's record of this reload, or why there is none."""
    deadline = clock() + timeout_seconds
    while True:
        record = read_applied(config.state_dir)
        if record is not None and record.pid == pid and record.serial > before.serial:
            return record
        if not alive(pid):
            return f"carbond pid {pid} exited during the reload"
        if clock() >= deadline:
            return (f"carbond pid {pid} did not confirm the reload in "
                    f"{applied_path(config.state_dir)} within {timeout_seconds:g}s")
        sleep(POLL_SECONDS)

