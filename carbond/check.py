"""`carbond check`: what this host offers, in plain lines an operator can act on."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from carbond import __version__
from carbond.config import Config
from carbond.meters.base import Meter

Section = Callable[[Config], Iterable[str]]


def meter_lines(meters: list[Meter]) -> tuple[list[str], bool]:
    lines, any_up = [], False
    for meter in meters:
        meter.read()
        up = meter.up()
        any_up = any_up or up
        lines.append(f"meter {meter.name}: {'up' if up else 'down'}")
        for device in meter.report():
            mark = "ok " if device.ok else "!! "
            lines.append(f"  {mark}{device.device}: {device.detail}")
    return lines, any_up


def state_dir_line(config: Config) -> str:
    path = config.state_dir
    if not os.path.isdir(path):
        return f"state dir: {path} does not exist yet (created at start)"
    writable = os.access(path, os.W_OK | os.X_OK)
    return f"state dir: {path} ({'writable' if writable else 'NOT writable'})"


def run_check(config: Config, meters: list[Meter], sections: Iterable[Section] = ()) -> tuple[
    list[str], int
]:
    """Lines to print and the exit status: 0 when at least one meter works, else 1."""
    lines = [f"carbond {__version__}", f"config: {config.source or 'built-in defaults'}"]
    meter_report, any_up = meter_lines(meters)
    lines += meter_report
    for section in sections:
        lines += section(config)
    lines.append(state_dir_line(config))
    lines.append("result: " + ("at least one meter works" if any_up else "no meter works"))
    return lines, 0 if any_up else 1
