"""The IPython extension in a real IPython shell (InteractiveShell): `%load_ext carbond`,
then a `%%carbond` cell measured by a `carbond run` on a fake powercap tree, and the one line
it prints; bad magic arguments print a usage line and run nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.powercap import ConstantPower
from tests.test_track import SESSION, Place, daemon, place, wait_for_socket

pytest.importorskip("IPython")
__all__ = ["place"]  # the fixture, shared with test_track

CELL = """
import sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "carbond")
shell.run_cell(sys.argv[1])
print("x =", shell.user_ns.get("x"))
"""


def run_cell(place: Place, cell: str) -> str:
    out, err = place.script(CELL, cell).communicate(timeout=120)
    assert "Traceback" not in out + err, out + err
    return out


def test_a_cell_prints_its_footprint_in_one_line(place: Place, tmp_path: Path) -> None:
    project = f"nb-{SESSION}"
    cell = (f"%%carbond {project} --config {place.config}\n"
            "import time\nend = time.process_time() + 1.0\n"
            "while time.process_time() < end: pass\nx = 42\n")
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path):
        wait_for_socket(place.socket)
        out = run_cell(place, cell)
    lines = [line for line in out.splitlines() if line.startswith("carbond:")]
    assert len(lines) == 1, out
    assert re.fullmatch(
        rf"carbond: {project} [0-9.]+ s, [0-9.]+ (J|kJ|Wh), [0-9.]+ (g|kg) CO2e "
        r"\(static, [A-Z]{2}\S*; measured by the daemon\)", lines[0]), lines[0]
    assert "e-" not in lines[0] and "x = 42" in out


def test_bad_magic_arguments_print_usage_and_run_nothing(place: Place) -> None:
    out = run_cell(place, "%%carbond --nope\nx = 1\n")
    assert "usage: %%carbond" in out and "x = None" in out
    assert os.path.isdir(place.tree.root)
