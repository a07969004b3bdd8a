"""`carbond report`: energy and CO2e over a period, from this host's ledger or from Prometheus.

Tables show scaled units (J…kWh, g…t) to three significant digits, never exponent form;
CSV and JSON keep base units (joules, grams). The pieces:
`sources` (the ledger, PromQL), `model` (what a report is), `render` and `html` (its formats).
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import sys
import time

from carbond.carbon import resolve_zone
from carbond.commands.report.model import FORMATS, GROUPS, PageInfo, Report
from carbond.commands.report.render import render
from carbond.commands.report.sources import (
    FetchFailed,
    from_ledger,
    from_prometheus,
    parse_instant,
    parse_range,
    prometheus_query,
)
from carbond.config import Config
from carbond.ledger.ledger import LEDGER_FILE, LedgerError, connect_readonly
from carbond.ledger.periods import get_zone
from carbond.types import ConfigError
from carbond.web.client import ClientConfig, redact

__all__ = ["FORMATS", "GROUPS", "main", "parse_instant"]


def main(cfg: Config, args: argparse.Namespace, client: ClientConfig | None = None) -> int:
    """Exit 0 with a report, 2 for bad input (flags, no ledger), 1 when Prometheus fails."""
    zone = get_zone(cfg.budgets_timezone)
    since, until = parse_range(args.since, args.until, time.time(), zone)
    # html also charts the period by day: the same query as --by day
    groupings = [args.by] + (["day"] if args.format == "html" and args.by != "day" else [])
    results: list[Report] = []
    if args.prometheus:
        query = prometheus_query(args.prometheus, client)
        try:
            for by in groupings:
                results.append(from_prometheus(query, redact(args.prometheus), since, until, by,
                                               zone, cfg.budgets_timezone))
        except FetchFailed as exc:
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
                results.append(from_ledger(conn, origin, since, until, by, zone,
                                           cfg.budgets_timezone))
        except sqlite3.Error as exc:
            print(f"carbond: error: cannot read {origin}: {exc}", file=sys.stderr)
            return 1
        finally:
            conn.close()
    info = page_info(cfg, bool(args.prometheus)) if args.format == "html" else None
    sys.stdout.write(render(results[0], args.format, zone, daily=results[-1], info=info))
    return 0


def page_info(cfg: Config, fleet: bool) -> PageInfo:
    """What the html page says about the figures' origin: this host and its grid zone, or
    a fleet (zones per host live in Prometheus)."""
    if fleet:
        return PageInfo(host="fleet (Prometheus)", generated=time.time())
    choice = resolve_zone(cfg.zone)
    return PageInfo(
        host=socket.gethostname(), zone=choice.zone,
        zone_reason=None if cfg.zone else choice.how,
        generated=time.time(), embodied_kgco2e=cfg.embodied_kgco2e,
        embodied_lifetime_seconds=cfg.embodied_lifetime_seconds)
