"""Command line: parse, load config, hand over. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from carbond import __version__, config
from carbond.check import run_check
from carbond.daemon import Daemon, build_meters, install_signal_handlers
from carbond.errors import ConfigError
from carbond.exporter import MetricsServer

log = logging.getLogger("carbond")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"carbond: error: {message}\n")


def _add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML config file "
                        f"(default {config.DEFAULT_CONFIG_PATH} when present)")
    for flag in config.FLAG_KEYS:
        parser.add_argument(flag, metavar="VALUE", default=None,
                            dest=flag.lstrip("-").replace("-", "_").replace(".", "_"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carbond", description="Energy and carbon accounting for this host.")
    parser.add_argument("--version", action="version", version=f"carbond {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_shared_flags(commands.add_parser("run", help="run the daemon in the foreground"))
    _add_shared_flags(commands.add_parser("check", help="show what this host offers"))
    return parser


def _flags(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        flag: getattr(args, flag.lstrip("-").replace("-", "_").replace(".", "_"))
        for flag in config.FLAG_KEYS
    }


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(cfg: config.Config) -> int:
    meters = build_meters(cfg)
    daemon = Daemon(cfg, meters)
    try:
        server = MetricsServer(cfg.listen_host, cfg.listen_port, daemon.latest)
    except OSError as exc:
        raise ConfigError(
            "--listen", f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}"
        ) from None
    stop = threading.Event()
    install_signal_handlers(stop)
    daemon.tick()
    server.start()
    log.info(
        "carbond %s serving http://%s:%d/metrics every %gs; meters: %s",
        __version__, cfg.listen_host, server.port, cfg.interval_seconds,
        ", ".join(f"{m.name} ({'up' if m.up() else 'down'})" for m in meters),
    )
    try:
        daemon.run(stop)
    finally:
        server.stop()
        daemon.close()
        log.info("stopped")
    return 0


def cmd_check(cfg: config.Config) -> int:
    lines, status = run_check(cfg, build_meters(cfg))
    print("\n".join(lines))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config, _flags(args))
        setup_logging(cfg.log_level)
        if args.command == "run":
            return cmd_run(cfg)
        return cmd_check(cfg)
    except ConfigError as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
