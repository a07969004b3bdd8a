"""Command line: parse, load config, hand over. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from carbond import __version__, config
from carbond.commands import check, intensity, reload, report, run, top
from carbond.commands import exec as execute
from carbond.types import ConfigError
from carbond.web.client import FLAG as CLIENT_FLAG
from carbond.web.client import ClientConfig, for_local_daemon, load_client_config
from carbond.web.config import server_cert_file


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"carbond: error: {message}\n")


def _add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML config file "
                        f"(default {config.DEFAULT_CONFIG_PATH} when present)")
    for flag in config.FLAG_KEYS:
        parser.add_argument(flag, metavar="VALUE", default=None, dest=_dest(flag))


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
    live.add_argument("--web.config.file", metavar="PATH", default=None,
                      dest="web_config_file", help="the daemon's web config: HTTPS, trusting "
                      "its certificate, when it serves TLS")
    live.set_defaults(**{_dest(flag): None for flag in config.FLAG_KEYS
                         if flag not in ("--listen", "--interval", "--web.config.file")})
    _add_exec_parser(commands)
    for client in (reporting, live, commands.choices["exec"]):
        client.add_argument(CLIENT_FLAG, metavar="PATH", default=None, dest="http_config_file",
                            help="TLS and basic auth towards the daemon or Prometheus "
                            "(Prometheus http_config format: tls_config, basic_auth)")
    reload.add_parser(commands, _add_shared_flags)
    return parser


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").replace(".", "_")


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


def _flags(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        flag: getattr(args, _dest(flag)) for flag in config.FLAG_KEYS
    }


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _client_config(args: argparse.Namespace, cfg: config.Config) -> ClientConfig | None:
    """`--http.config.file`; towards the daemon on this host also its own web config's TLS."""
    client = load_client_config(args.http_config_file) if args.http_config_file else None
    if args.command == "report" or not cfg.web_config_file:
        return client
    return for_local_daemon(client, server_cert_file(cfg.web_config_file))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.load(args.config, _flags(args))
        setup_logging(cfg.log_level)
        if args.command == "run":
            return run.main(cfg, args, lambda: _flags(args))
        if args.command == "check":
            return check.main(cfg)
        if args.command == "intensity":
            return intensity.main(cfg, args)
        if args.command == "reload":
            return reload.run_reload(cfg, args.pid)
        client = _client_config(args, cfg)
        if args.command == "report":
            return report.main(cfg, args, client)
        if args.command == "exec":
            return execute.main(cfg, args, client)
        return top.main(cfg, args, client)
    except ConfigError as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
