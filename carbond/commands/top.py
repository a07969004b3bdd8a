"""`carbond top`: a live terminal view of the running daemon's consumers, ranked by power.

It reads `/api/v1/consumers` (docs/http.md) from the daemon at the `--listen` address that
`carbond run` uses, so it measures nothing itself and adds no load to the tick. The frame is
built by pure functions (`frame_lines`), shared by the curses view and `--once`.

CO2e per hour: between two ticks, the difference of each consumer's emissions counter over the
time between them (`measured`), which carries the intensity and PUE the daemon applied; on the
first frame (and with `--once`) an estimate, power (kW) times grid g/kWh times PUE, marked `~`.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import locale
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from carbond.config import Config
from carbond.web.client import Client, ClientConfig, Unreachable, connect_host, daemon_url

__all__ = ["api_url", "connect_host", "frame_lines", "main", "rows", "table_lines"]

API_PATH = "/api/v1/consumers"
TIMEOUT_SECONDS = 3.0
MIN_NAME_WIDTH = 16


def api_url(listen_host: str, port: int, client: ClientConfig | None = None) -> str:
    return daemon_url(listen_host, port, client) + API_PATH


def fetch(client: Client) -> dict[str, Any]:
    try:
        document = client.get_json(API_PATH)
    except Unreachable as exc:
        if exc.reason is None:
            raise
        raise Unreachable(f"no carbond answers at {client.base}{API_PATH}: "
                          f"{exc.reason.lower()}") from None
    if not isinstance(document, dict) or not isinstance(document.get("consumers"), list):
        raise Unreachable(f"{client.base}{API_PATH} did not answer with a carbond consumers "
                          "document")
    return document


def main(cfg: Config, args: argparse.Namespace, client: ClientConfig | None) -> int:
    """The daemon at the `listen` address `run` uses (flag or config file); 1 when none
    answers. Refreshes every `interval` (the daemon's tick: nothing changes in between)."""
    api = Client(daemon_url(cfg.listen_host, cfg.listen_port, client), client, TIMEOUT_SECONDS)
    return run_once(api) if args.once else run_live(api, cfg.interval_seconds)


# ---- the frame (pure) ---------------------------------------------------------------------------


def printable(text: object) -> str:
    """Consumer names are untrusted: control characters (an escape sequence would drive the
    terminal) and anything else not printable become visible escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _watts(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def _sig(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or magnitude == 0:
        return f"{value:.2f}"
    return "<0.01" if value > 0 else ">-0.01"


def human_energy(joules: float | None) -> str:
    if joules is None:
        return "-"
    wh = joules / 3600.0
    for unit, size in (("MWh", 1e6), ("kWh", 1e3)):
        if abs(wh) >= size:
            return f"{_sig(wh / size)} {unit}"
    return f"{_sig(wh)} Wh"


def human_mass(grams: float | None) -> str:
    if grams is None:
        return "-"
    for unit, size in (("t", 1e6), ("kg", 1e3)):
        if abs(grams) >= size:
            return f"{_sig(grams / size)} {unit}"
    return f"{_sig(grams)} g"


@dataclass(frozen=True)
class Row:
    kind: str
    name: str
    watts: Mapping[str, float | None]
    joules: float | None
    grams: float | None
    grams_per_hour: float | None
    measured: bool  # True: from the emissions counter between two ticks


def _component(values: Any, name: str) -> float | None:
    return _number(values.get(name)) if isinstance(values, dict) else None


def rows(document: Mapping[str, Any], previous: Mapping[str, Any] | None) -> list[Row]:
    """Consumers, highest total power first; CO2e/h measured against `previous` (an earlier
    tick's document) where it has the consumer, else estimated."""
    intensity = document.get("intensity") if isinstance(document.get("intensity"), dict) \
        else {}
    grams_per_kwh = _number(intensity.get("grams_per_kwh"))
    pue = _number(document.get("pue")) or 1.0
    seconds = None
    earlier: dict[tuple[str, str], float | None] = {}
    if previous is not None:
        now_stamp = _number(document.get("timestamp"))
        then_stamp = _number(previous.get("timestamp"))
        if now_stamp is not None and then_stamp is not None and now_stamp > then_stamp:
            seconds = now_stamp - then_stamp
            for entry in previous.get("consumers") or []:
                if isinstance(entry, dict):
                    earlier[(str(entry.get("kind")), str(entry.get("name")))] = _number(
                        entry.get("emissions_grams"))
    found = []
    for entry in document.get("consumers") or []:
        if not isinstance(entry, dict):
            continue
        kind, name = str(entry.get("kind", "")), str(entry.get("name", ""))
        watts = entry.get("watts")
        total_watts = _component(watts, "total")
        grams = _number(entry.get("emissions_grams"))
        before = earlier.get((kind, name))
        rate: float | None = None
        measured = False
        if seconds and grams is not None and before is not None and grams >= before:
            rate, measured = (grams - before) / seconds * 3600.0, True
        elif total_watts is not None and grams_per_kwh is not None:
            rate = total_watts / 1000.0 * grams_per_kwh * pue
        found.append(Row(
            kind, name,
            {c: _component(watts, c) for c in ("total", "cpu", "gpu", "dram")},
            _component(entry.get("joules"), "total"), grams, rate, measured))
    found.sort(key=lambda r: (-(r.watts["total"] or 0.0), r.kind, r.name))
    return found


# (title, width, cell) in the order shown; dropped from the end of DROP_ORDER when narrow
Column = tuple[str, int, Callable[[Row], str]]
COLUMNS: tuple[Column, ...] = (
    ("KIND", 10, lambda r: printable(r.kind)),
    ("TOTAL W", 9, lambda r: _watts(r.watts["total"])),
    ("CPU W", 8, lambda r: _watts(r.watts["cpu"])),
    ("GPU W", 8, lambda r: _watts(r.watts["gpu"])),
    ("DRAM W", 8, lambda r: _watts(r.watts["dram"])),
    ("gCO2e/h", 10, lambda r: "-" if r.grams_per_hour is None else
     ("" if r.measured else "~") + _sig(r.grams_per_hour)),
    ("ENERGY", 11, lambda r: human_energy(r.joules)),
    ("CO2e", 10, lambda r: human_mass(r.grams)),
)
DROP_ORDER = ("CO2e", "KIND", "ENERGY", "DRAM W", "GPU W")


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0.0, seconds):.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def header_lines(document: Mapping[str, Any], address: str, now: float,
                 measured_over: float | None) -> list[str]:
    stamp = _number(document.get("timestamp"))
    when = "no tick yet"
    if stamp is not None:
        tick = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        when = f"tick {tick} ({_ago(now - stamp)} ago)"
    intensity = document.get("intensity")
    if isinstance(intensity, dict) and _number(intensity.get("grams_per_kwh")) is not None:
        age = _number(intensity.get("age_seconds"))
        grid = (f"grid {_sig(_number(intensity.get('grams_per_kwh')) or 0.0)} g/kWh "
                f"{printable(intensity.get('zone', '?'))} "
                f"({printable(intensity.get('provider', '?'))}"
                f"{'' if age is None else f', {_ago(age)} old'}"
                f"{', marginal' if intensity.get('marginal') else ''})")
    else:
        grid = "grid intensity not known yet"
    pue = _number(document.get("pue"))
    host = document.get("host") if isinstance(document.get("host"), dict) else {}
    watts = host.get("watts") if isinstance(host.get("watts"), dict) else {}
    parts = ", ".join(f"{printable(k)} {_watts(_number(v))}" for k, v in sorted(watts.items())
                      if k != "total")
    power = f"host {_watts(_component(watts, 'total'))} W" + (f" ({parts})" if parts else "")
    energy = human_energy(_component(host.get("joules"), "total"))
    emitted = human_mass(_number(host.get("emissions_grams")))
    rate = (f"gCO2e/h from emissions counters over {measured_over:.1f}s" if measured_over
            else "gCO2e/h ~estimated: power x g/kWh x PUE")
    return [
        f"carbond top  {address}  {when}",
        f"{grid}  PUE {'-' if pue is None else f'{pue:.2f}'}  {power}",
        f"{rate}  since start: {energy}, {emitted} CO2e  "
        f"consumers {len(document.get('consumers') or [])}",
    ]


def table_lines(found: list[Row], width: int | None) -> list[str]:
    """The column header and one line per consumer. `width` None: as wide as the names need
    (plain output to a file or pipe); else narrow columns are dropped to keep names readable."""
    columns = list(COLUMNS)
    names = [printable(r.name) for r in found]
    if width is None:
        name_width = max([len("CONSUMER"), *map(len, names)])
    else:
        def room() -> int:
            return width - sum(w + 1 for _, w, _ in columns)

        for title in DROP_ORDER:
            if room() >= MIN_NAME_WIDTH:
                break
            columns = [c for c in columns if c[0] != title]
        name_width = max(8, min(room(), max([len("CONSUMER"), *map(len, names)])))

    def fit(text: str) -> str:
        return text if len(text) <= name_width else text[: name_width - 1] + "\u2026"

    def line(name: str, cells: list[str]) -> str:
        text = fit(name).ljust(name_width) + "".join(
            " " + (cell.ljust(w) if title == "KIND" else cell.rjust(w))
            for (title, w, _), cell in zip(columns, cells, strict=True))
        return text.rstrip()

    out = [line("CONSUMER", [title for title, _, _ in columns])]
    for row, name in zip(found, names, strict=True):
        out.append(line(name, [cell(row) for _, _, cell in columns]))
    if not found:
        out.append("(no consumers yet)")
    return out


def frame_lines(document: Mapping[str, Any], previous: Mapping[str, Any] | None, address: str,
                now: float, width: int | None) -> list[str]:
    found = rows(document, previous)
    over = None
    if previous is not None and any(r.measured for r in found):
        over = (_number(document.get("timestamp")) or 0.0) - (
            _number(previous.get("timestamp")) or 0.0)
    lines = header_lines(document, address, now, over)
    if width is not None:
        lines = [line[:width] for line in lines]
    return [*lines, "", *table_lines(found, width)]


# ---- running ------------------------------------------------------------------------------------


def run_once(client: Client, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        document = fetch(client)
    except Unreachable as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 1
    width = None
    if out.isatty():
        width = os.get_terminal_size(out.fileno()).columns
    out.write("\n".join(frame_lines(document, None, _address(client), time.time(), width)) + "\n")
    return 0


def _address(client: Client) -> str:
    return client.base.split("://", 1)[-1]


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack (so curses restores the terminal) instead of
    killing the process mid-frame."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signum)

    saved = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def run_live(client: Client, interval_seconds: float) -> int:
    """The curses view until `q`, Ctrl-C (exit 0) or SIGTERM/SIGHUP (128 + signal)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("carbond: error: top: stdin and stdout must be a terminal; use --once for one "
              "frame as text", file=sys.stderr)
        return 2
    try:
        document = fetch(client)
    except Unreachable as exc:
        print(f"carbond: error: {exc}", file=sys.stderr)
        return 1
    locale.setlocale(locale.LC_ALL, "")
    try:
        with _signals_stop():
            curses.wrapper(_View(client, interval_seconds, document).loop)
    except _Stop as stop:
        return 128 + stop.signum
    except KeyboardInterrupt:
        return 0
    except curses.error as exc:
        print(f"carbond: error: top: cannot drive this terminal: {exc}", file=sys.stderr)
        return 2
    return 0


class _View:
    def __init__(self, client: Client, interval_seconds: float, document: dict[str, Any]) -> None:
        self.client = client
        self.interval = max(0.2, interval_seconds)
        self.document = document
        self.previous: dict[str, Any] | None = None
        self.error: str | None = None

    def poll(self) -> None:
        try:
            fresh = fetch(self.client)
        except Unreachable as exc:
            self.error = str(exc)
            return
        self.error = None
        if fresh.get("timestamp") != self.document.get("timestamp"):
            self.previous, self.document = self.document, fresh  # two distinct ticks

    def draw(self, screen: Any) -> None:
        height, width = screen.getmaxyx()
        lines = frame_lines(self.document, self.previous, _address(self.client), time.time(),
                            max(20, width - 1))
        screen.erase()
        status = f"q quit  refresh {self.interval:g}s"
        if self.error:
            status = f"{self.error} (retrying)  {status}"
        for y, text in enumerate(lines[: max(0, height - 1)]):
            attr = curses.A_BOLD if y < 3 else curses.A_REVERSE if y == 4 else curses.A_NORMAL
            self._put(screen, y, text, width, attr)
        self._put(screen, height - 1, status, width,
                  curses.A_REVERSE if self.error else curses.A_DIM)
        screen.refresh()

    @staticmethod
    def _put(screen: Any, y: int, text: str, width: int, attr: int) -> None:
        with contextlib.suppress(curses.error):  # the bottom-right cell cannot be written
            screen.addnstr(y, 0, text, max(0, width - 1), attr)

    def loop(self, screen: Any) -> None:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        deadline = time.monotonic() + self.interval
        self.draw(screen)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.poll()
                deadline = time.monotonic() + self.interval
                self.draw(screen)
                continue
            screen.timeout(max(1, int(remaining * 1000)))
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                self.draw(screen)
