"""carbond and the real CodeCarbon 3.3 (from PyPI, in its own venv: tests/codecarbon_venv.py)
share one emissions.csv: each appends to the file the other wrote, neither moves it aside, and
CodeCarbon's pandas reads every row with CodeCarbon's columns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carbond.commands.exec.summary import CODECARBON_COLUMNS
from tests.cgroup_helpers import available
from tests.codecarbon_venv import codecarbon_python
from tests.helpers import free_port

# CodeCarbon measures a short sleep with its own offline tracker (no network: the country is
# given), writing to the directory in argv[1] under project "codecarbon-run".
CODECARBON_RUN = """
import sys, time
from codecarbon import OfflineEmissionsTracker
tracker = OfflineEmissionsTracker(country_iso_code="DEU", output_dir=sys.argv[1],
                                  project_name="codecarbon-run", log_level="error",
                                  measure_power_secs=1, save_to_file=True)
tracker.start()
time.sleep(0.3)
tracker.stop()
"""
# What CodeCarbon's own pandas makes of the file.
PANDAS_READ = """
import json, sys
import pandas
frame = pandas.read_csv(sys.argv[1])
print(json.dumps({"columns": list(frame.columns),
                  "rows": json.loads(frame.to_json(orient="records", double_precision=15))}))
"""
FIELDS = """
import dataclasses, json
from codecarbon.output_methods.emissions_data import EmissionsData
print(json.dumps([f.name for f in dataclasses.fields(EmissionsData)]))
"""


@pytest.fixture(scope="module")
def codecarbon() -> Path:
    try:
        return codecarbon_python()
    except RuntimeError as exc:  # no package registry reachable: nothing to test against
        pytest.skip(f"cannot install CodeCarbon 3.3: {exc}")


def in_codecarbon(python: Path, script: str, *args: str) -> str:
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def carbond_exec_output(tmp_path: Path, out: Path, project: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "carbond", "exec", "--json", "--project", project, "--zone",
         "DE", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
         "--output", str(out), "--", "sh", "-c", "i=0; while [ $i -lt 50000 ]; do i=$((i+1));"
         " done"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1])


def read_with_pandas(python: Path, path: Path) -> dict[str, Any]:
    return json.loads(in_codecarbon(python, PANDAS_READ, str(path)))


def test_carbond_writes_codecarbons_own_columns_in_its_order(codecarbon: Path) -> None:
    assert list(CODECARBON_COLUMNS) == json.loads(in_codecarbon(codecarbon, FIELDS))


def test_codecarbon_appends_to_a_file_carbond_wrote(codecarbon: Path, tmp_path: Path) -> None:
    if available("v2"):
        pytest.skip(available("v2"))
    out = tmp_path / "emissions.csv"
    first = carbond_exec_output(tmp_path, out, "carbond-run")
    in_codecarbon(codecarbon, CODECARBON_RUN, str(tmp_path))
    second = carbond_exec_output(tmp_path, out, "carbond-run")
    in_codecarbon(codecarbon, CODECARBON_RUN, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("emissions")) == [
        "emissions.csv"]  # no emissions.csv.bak: CodeCarbon took carbond's header as its own
    table = read_with_pandas(codecarbon, out)
    assert table["columns"] == list(CODECARBON_COLUMNS)
    rows = table["rows"]
    assert [r["project_name"] for r in rows] == ["carbond-run", "codecarbon-run",
                                                "carbond-run", "codecarbon-run"]
    assert [rows[0]["run_id"], rows[2]["run_id"]] == [first["run_id"], second["run_id"]]
    assert rows[0]["emissions"] == pytest.approx(first["emissions_grams"] / 1e3)
    assert rows[1]["codecarbon_version"].startswith("3.3")
    assert all(r["energy_consumed"] > 0 and r["country_iso_code"] == "DEU" for r in rows)


def test_carbond_appends_to_a_file_codecarbon_wrote(codecarbon: Path, tmp_path: Path) -> None:
    if available("v2"):
        pytest.skip(available("v2"))
    out = tmp_path / "emissions.csv"
    in_codecarbon(codecarbon, CODECARBON_RUN, str(tmp_path))
    header = out.read_text().splitlines()[0]
    run = carbond_exec_output(tmp_path, out, "carbond-run")
    in_codecarbon(codecarbon, CODECARBON_RUN, str(tmp_path))
    assert out.read_text().splitlines()[0] == header
    assert not (tmp_path / "emissions.csv.bak").exists()
    rows = read_with_pandas(codecarbon, out)["rows"]
    assert [r["project_name"] for r in rows] == ["codecarbon-run", "carbond-run",
                                                "codecarbon-run"]
    mine = rows[1]
    assert mine["run_id"] == run["run_id"]
    assert mine["emissions"] == pytest.approx(run["emissions_grams"] / 1e3)
    assert mine["energy_consumed"] == pytest.approx(run["energy_joules"]["total"] / 3.6e6)
    assert mine["duration"] == pytest.approx(run["duration_seconds"])
    assert mine["codecarbon_version"].startswith("carbond ")
