"""`carbond run`: the daemon in the foreground, as systemd runs it.

This command owns the process: malloc tuning before any thread starts, the state directory,
the listening socket (bound first, so a taken port is reported before anything else starts),
signals, and the order in which parts start and stop.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable

from carbond import __version__
from carbond.commands.build import build_daemon, reconfigure
from carbond.config import Config
from carbond.daemon import Daemon, install_signal_handlers, prepare_state_dir, tune_malloc
from carbond.exporter.app import MetricsServer
from carbond.exporter.snapshot import Snapshot
from carbond.types import ConfigError

log = logging.getLogger("carbond")


def main(cfg: Config, args: argparse.Namespace, flags: Callable[[], dict[str, str | None]]
         ) -> int:
    tune_malloc()  # before any thread starts
    prepare_state_dir(cfg.state_dir)
    daemons: list[Daemon] = []  # bound first, so a taken port is reported before the ledger

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
        daemon = build_daemon(cfg)
        daemons.append(daemon)
        try:  # startup and shutdown share one cleanup path
            if daemon.feed:
                daemon.feed.start()
            daemon.tick()
            server.start()
            log.info(
                "carbond %s serving http://%s:%d/metrics every %gs; meters: %s",
                __version__, cfg.listen_host, server.port, cfg.interval_seconds,
                ", ".join(f"{m.name} ({'up' if m.up() else 'down'})" for m in daemon.meters),
            )
            daemon.run(stop, reload, lambda: reconfigure(args.config, flags(), daemon.config))
        finally:
            daemon.close()
    finally:
        server.stop()  # also when never started: closes the socket
    log.info("stopped")
    return 0
