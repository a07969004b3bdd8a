"""Command line: parse, load config, hand over. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from carbond import __version__, config, reload, report, top
from carbond.builders import build_daemon, build_feed, build_meters, reconfigure
from carbond.carbon import (
    ForecastUnsupported,
    fetch_forecast,
    format_current,
    format_forecast,
    resolve_zone,
)
from carbond.carbon.intensity import FetchError
from carbond.check import run_check
from carbond.daemon import Daemon, install_signal_handlers, prepare_state_dir, tune_malloc
from carbond.errors import ConfigError
from carbond.execute import ExecOptions, default_project, run_exec
from carbond.exporter import MetricsServer
from carbond.ledger import LEDGER_FILE, LedgerError, connect_readonly
from carbond.periods import get_zone
from carbond.snapshot import Snapshot
from carbond.units import parse_seconds
from carbond.workloads.naming import encode_project

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
    live = commands.add_parser(
        "top", help="live view of consumers by power and CO2e rate, from the running daemon")
    live.add_argument("--config", metavar="PATH", help="YAML config file whose listen and "
                      f"interval apply (default {config.DEFAULT_CONFIG_PATH} when present)")
    live.add_argument("--listen", metavar="HOST:PORT", default=None,
                      help="the daemon's --listen address (0.0.0.0 means 127.0.0.1)")
    live.add_argument("--interval", metavar="SECONDS", default=None,
                      help="refresh period (default: the daemon's tick interval)")
    live.add_argument("--once", action="store_true",
                      help="print one frame as plain text and exit")
    live.set_defaults(**{flag.lstrip("-").replace("-", "_").replace(".", "_"): None
                         for flag in config.FLAG_KEYS if flag not in ("--listen", "--interval")})
    _add_exec_parser(commands)
    reload.add_parser(commands, _add_shared_flags)
    return parser


def _add_exec_parser(commands: argparse._SubParsersAction) -> None:
    running = commands.add_parser(
        "exec", help="run a command in its own cgroup and print its energy and CO2e",
        usage="carbond exec [options] -- CMD [ARGS...]")
    _add_shared_flags(running)
    running.add_argument("--project", metavar="NAME", default=None,
                         help="the project the run is recorded under (default: the "
                         "command's basename)")
    running.add_argument("--json", action="store_true",
                         help="the summary as one JSON object (on stderr, as the text one)")
    running.add_argument("--output", metavar="FILE.csv", default=None,
                         help="append a row in CodeCarbon's emissions.csv layout")
    running.add_argument("--greenest", action="store_true",
                         help="start in the lowest-carbon window of the intensity forecast "
                         "that ends by --deadline; needs --deadline and --duration")
    running.add_argument("--deadline", metavar="DURATION", default=None,
                         help="with --greenest: the run must end within this (8h)")
    running.add_argument("--duration", metavar="DURATION", default=None,
                         help="with --greenest: how long the run takes (2h)")
    running.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                         help="the command and its arguments, after --")


def exec_options(args: argparse.Namespace) -> ExecOptions:
    """`carbond exec`'s own flags, checked; bad input is a ConfigError naming the flag."""
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("CMD", "no command given: carbond exec [options] -- CMD [ARGS...]")
    project = args.project if args.project is not None else default_project(command)
    try:
        encode_project(project)
    except ValueError as exc:
        raise ConfigError("--project", str(exc)) from None
    seconds: dict[str, float | None] = {}
    for flag in ("--deadline", "--duration"):
        value = getattr(args, flag[2:])
        if value is not None and not args.greenest:
            raise ConfigError(flag, "only with --greenest")
        try:
            seconds[flag] = None if value is None else parse_seconds(value)
        except ValueError as exc:
            raise ConfigError(flag, str(exc)) from None
    if args.greenest:
        missing = [flag for flag, value in seconds.items() if value is None]
        if missing:
            raise ConfigError("--greenest", f"needs {' and '.join(missing)}")
        if (seconds["--duration"] or 0.0) > (seconds["--deadline"] or 0.0):
            raise ConfigError("--duration", "is longer than --deadline: the run could not "
                              "end by the deadline")
    return ExecOptions(tuple(command), project, args.json, args.output, args.greenest,
                       seconds["--deadline"], seconds["--duration"])


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


def cmd_run(cfg: config.Config, args: argparse.Namespace) -> int:
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
            daemon.run(stop, reload,
                       lambda: reconfigure(args.config, _flags(args), daemon.config))
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
    # html also charts the period by day: the same query as --by day
    groupings = [args.by] + (["day"] if args.format == "html" and args.by != "day" else [])
    results: list[report.Report] = []
    if args.prometheus:
        query = report.prometheus_query(args.prometheus)
        try:
            for by in groupings:
                results.append(report.from_prometheus(query, report.redact(args.prometheus),
                                                      since, until, by, zone,
                                                      cfg.budgets_timezone))
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
            for by in groupings:
                results.append(report.from_ledger(conn, origin, since, until, by, zone,
                                                  cfg.budgets_timezone))
        except sqlite3.Error as exc:
            print(f"carbond: error: cannot read {origin}: {exc}", file=sys.stderr)
            return 1
        finally:
            conn.close()
    info = report_page_info(cfg, bool(args.prometheus)) if args.format == "html" else None
    sys.stdout.write(report.render(results[0], args.format, zone, daily=results[-1], info=info))
    return 0


def report_page_info(cfg: config.Config, fleet: bool) -> report.PageInfo:
    """What the html page says about the figures' origin: this host and its grid zone, or
    a fleet (zones per host live in Prometheus)."""
    if fleet:
        return report.PageInfo(host="fleet (Prometheus)", generated=time.time())
    choice = resolve_zone(cfg.zone)
    return report.PageInfo(
        host=socket.gethostname(), zone=choice.zone,
        zone_reason=None if cfg.zone else choice.how,
        generated=time.time(), embodied_kgco2e=cfg.embodied_kgco2e,
        embodied_lifetime_seconds=cfg.embodied_lifetime_seconds)


def cmd_top(cfg: config.Config, once: bool) -> int:
    """The daemon at the `listen` address `run` uses (flag or config file); 1 when none
    answers. Refreshes every `interval` (the daemon's tick: nothing changes in between)."""
    url = top.api_url(cfg.listen_host, cfg.listen_port)
    return top.run_once(url) if once else top.run_live(url, cfg.interval_seconds)


def cmd_exec(cfg: config.Config, args: argparse.Namespace) -> int:
    """The command's own status (128+N when killed by signal N); 125 when exec cannot run
    it, 126/127 when it is not executable / not found; 2 for bad input."""
    options = exec_options(args)
    if args.log_level is None:  # a wrapper around a user's command: quiet unless asked
        logging.getLogger().setLevel(logging.WARNING)
    return run_exec(cfg, options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config, _flags(args))
        setup_logging(cfg.log_level)
        if args.command == "run":
            return cmd_run(cfg, args)
        if args.command == "intensity":
            return cmd_intensity(cfg, args.forecast)
        if args.command == "report":
            return cmd_report(cfg, args)
        if args.command == "exec":
            return cmd_exec(cfg, args)
        if args.command == "top":
            return cmd_top(cfg, args.once)
        if args.command == "reload":
            return reload.run_reload(cfg, args.pid)
        return cmd_check(cfg)
    except ConfigError as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
