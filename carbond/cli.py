"""Command line: parse, load config, hand over. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from carbond import __version__, config, report
from carbond.builders import build_daemon, build_feed, build_meters
from carbond.carbon import ForecastUnsupported, fetch_forecast, format_current, format_forecast
from carbond.carbon.model import FetchError
from carbond.check import run_check
from carbond.daemon import Daemon, install_signal_handlers, prepare_state_dir, tune_malloc
from carbond.errors import ConfigError
from carbond.exporter import MetricsServer
from carbond.ledger import LEDGER_FILE, LedgerError, connect_readonly
from carbond.periods import get_zone
from carbond.snapshot import Snapshot

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
    intensity = commands.add_parser("intensity", help="current grid carbon intensity")
    _add_shared_flags(intensity)
    intensity.add_argument("--forecast", action="store_true",
                           help="the provider's forecast, lowest-carbon window marked")
    reporting = commands.add_parser(
        "report", help="energy and CO2e over a period, from the ledger or from Prometheus")
    _add_shared_flags(reporting)
    reporting.add_argument("--since", default="30d", metavar="WHEN",
                           help="ISO date or time, today, yesterday, now, or an age such as "
                           "30d or 12h (default 30d); dates in budgets_timezone")
    reporting.add_argument("--until", default="now", metavar="WHEN", help="default now")
    reporting.add_argument("--by", choices=report.GROUPS, default="consumer")
    reporting.add_argument("--format", choices=report.FORMATS, default="table")
    reporting.add_argument("--prometheus", metavar="URL", default=None,
                           help="fleet-wide, from this Prometheus (or Thanos, Mimir) "
                           "instead of this host's ledger")
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
    stop = threading.Event()
    install_signal_handlers(stop)
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
            daemon.run(stop)
        finally:
            daemon.close()
    finally:
        server.stop()  # also when never started: closes the socket
    log.info("stopped")
    return 0


def cmd_check(cfg: config.Config) -> int:
    meters = build_meters(cfg, sampler=False)
    try:
        lines, status = run_check(cfg, meters)
    finally:
        for meter in meters:
            meter.close()
    print("\n".join(lines))
    return status


def cmd_intensity(cfg: config.Config, forecast: bool) -> int:
    """Exit 0 with a figure (static at worst); 1 when a forecast cannot be had."""
    feed, choice = build_feed(cfg)
    now = time.time()
    if forecast:
        try:
            print(format_forecast(fetch_forecast(feed.providers, now), choice.zone), end="")
        except ForecastUnsupported as exc:
            print(f"carbond: no forecast: {exc}", file=sys.stderr)
            return 1
        except FetchError as exc:
            print(f"carbond: forecast failed: {exc}", file=sys.stderr)
            return 1
        return 0
    feed.refresh_now(force=False)
    print(format_current(feed.current(), now, feed.zone), end="")
    return 0


def cmd_report(cfg: config.Config, args: argparse.Namespace) -> int:
    """Exit 0 with a report, 2 for bad input (flags, no ledger), 1 when Prometheus fails."""
    zone = get_zone(cfg.budgets_timezone)
    since, until = report.parse_range(args.since, args.until, time.time(), zone)
    if args.prometheus:
        query = report.prometheus_query(args.prometheus)
        try:
            result = report.from_prometheus(query, report.redact(args.prometheus), since, until,
                                            args.by, zone, cfg.budgets_timezone)
        except report.FetchFailed as exc:
            print(f"carbond: error: --prometheus: {exc}", file=sys.stderr)
            return 1
    else:
        try:
            conn = connect_readonly(cfg.state_dir)
        except LedgerError as exc:
            raise ConfigError("--state-dir", str(exc)) from None
        origin = os.path.join(cfg.state_dir, LEDGER_FILE)
        try:
            result = report.from_ledger(conn, origin, since, until, args.by, zone,
                                        cfg.budgets_timezone)
        except sqlite3.Error as exc:
            print(f"carbond: error: cannot read {origin}: {exc}", file=sys.stderr)
            return 1
        finally:
            conn.close()
    sys.stdout.write(report.render(result, args.format, zone))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config, _flags(args))
        setup_logging(cfg.log_level)
        if args.command == "run":
            return cmd_run(cfg)
        if args.command == "intensity":
            return cmd_intensity(cfg, args.forecast)
        if args.command == "report":
            return cmd_report(cfg, args)
        return cmd_check(cfg)
    except ConfigError as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
