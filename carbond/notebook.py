"""The IPython extension: `%load_ext carbond`, then `%%carbond [project] [--config PATH]
[--socket PATH]` on a cell prints the cell's footprint in one line, measured by
`carbond.track` (docs/exec.md)."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from carbond.tracking import TrackResult, track

DEFAULT_PROJECT = "notebook"


def one_line(result: TrackResult) -> str:
    """`carbond: PROJECT 12.3 s, 456 J, 0.0123 g CO2e (static, DE; measured by the daemon)`."""
    from carbond.commands.exec.summary import human_grams, human_joules, human_seconds, printable

    where = ", ".join(x for x in (result.provider or "", result.zone) if x)
    by = "measured by the daemon" if result.measured_by == "daemon" else "measured alone"
    return (f"carbond: {printable(result.project)} {human_seconds(result.duration_seconds)}, "
            f"{human_joules(result.joules)}, {human_grams(result.grams)} CO2e "
            f"({where + '; ' if where else ''}{by})")


def carbond_magic(line: str, cell: str, shell: Any) -> None:
    """Run the cell inside a track block; print its footprint, also when the cell raised."""
    parser = argparse.ArgumentParser(prog="%%carbond", add_help=False, exit_on_error=False)
    parser.add_argument("project", nargs="?", default=DEFAULT_PROJECT)
    parser.add_argument("--config")
    parser.add_argument("--socket")
    try:
        args, extra = parser.parse_known_args(shlex.split(line))
        if extra:
            raise ValueError(f"unknown arguments {' '.join(extra)}")
        block = track(args.project, config=args.config, socket=args.socket)
    except (argparse.ArgumentError, ValueError) as exc:
        print(f"%%carbond: {exc} (usage: %%carbond [PROJECT] [--config PATH] [--socket PATH])")
        return
    try:
        with block:
            shell.run_cell(cell)
    finally:
        if block.result is not None:
            print(one_line(block.result))


def load(ipython: Any) -> None:
    ipython.register_magic_function(
        lambda line, cell: carbond_magic(line, cell, ipython), "cell", "carbond")
