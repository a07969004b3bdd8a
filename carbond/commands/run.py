"""`carbond run`: the daemon in the foreground, as systemd runs it.

This command owns the process: malloc tuning before any thread starts, the state directory,
the listening socket (bound first, so a taken port is reported before anything else starts),
signals, and the order in which the parts start and stop. Ticks run on a thread of their own
and the main thread only waits for a signal, so SIGTERM is acted on at once whatever a tick is
doing: the parts are stopped (the ledger flushed) within `STOP_WAIT_SECONDS` of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from carbond import __version__
from carbond.commands.build import build_daemon, reconfigure
from carbond.config import Config
from carbond.daemon import Daemon
from carbond.exporter.app import MetricsServer
from carbond.exporter.snapshot import Snapshot
from carbond.types import ConfigError

log = logging.getLogger("carbond")

STOP_WAIT_SECONDS = 1.0  # for the tick in progress to finish, before the parts stop anyway


def main(cfg: Config, args: argparse.Namespace, flags: Callable[[], dict[str, str | None]]
         ) -> int:
    tune_malloc()  # before any thread starts
    prepare_state_dir(cfg.state_dir)
    daemons: list[Daemon] = []

    def latest() -> Snapshot:
        return daemons[0].latest() if daemons else Snapshot()

    try:
        server = MetricsServer(cfg.listen_host, cfg.listen_port, latest,
                               web_config=cfg.web_config_file)
    except OSError as exc:
        raise ConfigError(
            "--listen", f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}"
        ) from None
    stop, reload = threading.Event(), threading.Event()
    install_signal_handlers(stop, reload)
    try:
        daemon, runner = build_daemon(cfg)
        daemons.append(daemon)
        with runner:  # startup and shutdown share one cleanup path
            daemon.tick()
            server.start()
            log.info(
                "carbond %s serving http://%s:%d/metrics every %gs; meters: %s",
                __version__, cfg.listen_host, server.port, cfg.interval_seconds,
                ", ".join(f"{m.name} ({'up' if m.up() else 'down'})" for m in daemon.meters),
            )
            loop = threading.Thread(
                target=daemon.run, name="carbond-tick",
                args=(stop, reload,
                      lambda: reconfigure(args.config, flags(), daemon.config, daemon.ledger,
                                          daemon.pipeline.names.labels)))
            loop.start()
            while not stop.wait(1.0) and loop.is_alive():
                pass
            died = not stop.is_set()  # the loop ended by itself: its exception is logged
            stop.set()
            loop.join(STOP_WAIT_SECONDS)
            if loop.is_alive():
                log.warning("the tick in progress did not end within %gs of the stop; "
                            "stopping without it", STOP_WAIT_SECONDS)
    finally:
        server.stop()  # also when never started: closes the socket
    if died:
        log.error("the tick loop ended unexpectedly: stopped")
        return 1
    log.info("stopped")
    return 0


# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value for both thresholds


def tune_malloc() -> None:
    """Keep a long-running daemon's RSS flat under churn.

    One arena: the GIL already serialises allocation, and per-thread arenas (HTTP, intensity,
    taskstats threads) only hold on to freed memory. Fixed thresholds: glibc otherwise raises
    its mmap threshold each time a large block is freed, so later large buffers land in the
    heap, fragment it and keep it swinging by megabytes (30-minute soak at 100 exits/s: +6.1%
    with the dynamic threshold, +2.2% with fixed ones; benchmarks/README.md).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD_BYTES)


def prepare_state_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as exc:
        log.warning("state dir %s unusable (%s): nothing is cached across restarts", path,
                    exc.strerror)


def install_signal_handlers(stop: threading.Event, reload: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    def handle_reload(signum: int, frame: FrameType | None) -> None:
        log.info("received SIGHUP, reloading the configuration before the next tick")
        reload.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, handle_reload)
