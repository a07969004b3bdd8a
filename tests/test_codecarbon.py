"""carbond and the real CodeCarbon 3.3 (from PyPI, in its own venv: tests/codecarbon_venv.py)
share one emissions.csv: each appends to the file the other wrote, neither moves it aside, and
CodeCarbon's pandas reads every row with CodeCarbon's columns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from carbond.commands.exec.summary import CODECARBON_COLUMNS
from tests.cgroup_helpers import available
from tests.codecarbon_venv import codecarbon_python
from tests.helpers import free_port
from tests.powercap import ConstantPower
from tests.test_track import (  # the daemon on a fake powercap tree, with its exec socket
    SESSION,
    Place,
    daemon,
    finished,
    place,  # noqa: F401 (a fixture)
    report_projects,
    wait_for_socket,
)

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


# ---- the drop-in: carbond.codecarbon -----------------------------------------------------

# CodeCarbon's documented usage (docs/usage: "Explicit Object", "Context manager",
# "Decorator"), verbatim but for the import line, which the test rewrites.
CODECARBON_EXAMPLES = {
    "explicit.py": """
from codecarbon import EmissionsTracker

tracker = EmissionsTracker()
tracker.start()
try:
    # Compute intensive code goes here
    _ = 1 + 1
finally:
    tracker.stop()
""",
    "context.py": """
from codecarbon import EmissionsTracker

with EmissionsTracker() as tracker:
    # Compute intensive code goes here
    _ = 1 + 1
""",
    "decorator.py": """
from codecarbon import track_emissions


@track_emissions()
def training_loop():
    # Compute intensive code goes here
    _ = 1 + 1


if __name__ == "__main__":
    training_loop()
""",
}


def test_codecarbons_examples_run_with_only_the_import_changed(codecarbon: Path,
                                                                tmp_path: Path) -> None:
    for name, source in CODECARBON_EXAMPLES.items():
        changed = source.replace("from codecarbon import", "from carbond.codecarbon import")
        assert changed.count("carbond.codecarbon") == 1
        (tmp_path / name).write_text(changed)
        done = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    table = read_with_pandas(codecarbon, tmp_path / "emissions.csv")
    assert table["columns"] == json.loads(in_codecarbon(codecarbon, FIELDS))
    rows = table["rows"]
    assert [r["project_name"] for r in rows] == ["codecarbon"] * 3
    assert len({r["run_id"] for r in rows}) == 3
    for row in rows:
        assert row["duration"] > 0 and row["tracking_mode"] == "process"
        assert row["codecarbon_version"].startswith("carbond ")
        if not available("v2"):  # as root here: each run in a cgroup of its own, measured
            assert row["energy_consumed"] > 0 and row["cpu_energy"] > 0


MANY_TRACKERS = """
import json
from carbond.codecarbon import EmissionsTracker, OfflineEmissionsTracker

for _ in range(3):
    tracker = OfflineEmissionsTracker(
        "p", 5, country_iso_code="DEU", measure_power_secs=1, gpu_ids=[0],
        tracking_mode="machine", log_level="error", allow_multiple_runs=True,
        save_to_api=True, output_methods=["csv"], on_csv_write="append")
quiet = EmissionsTracker("p", log_level="error", tracking_mode="process", offline=False)
print(json.dumps({"project": tracker.project_name, "csv": tracker.save_to_file,
                  "empty_name": EmissionsTracker("").project_name,
                  "no_csv": EmissionsTracker(output_methods=[]).save_to_file,
                  "stopped": EmissionsTracker().stop()}))
"""


def test_unsupported_arguments_warn_once_and_never_fail(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", MANY_TRACKERS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "UserWarning" in line]
    assert len(warned) == 2, done.stderr  # the loop's line once; the empty project name
    text = warned[0]
    for name in ("country_iso_code", "measure_power_secs", "gpu_ids", "tracking_mode",
                 "save_to_api", "positional"):
        assert name in text, text
    for quiet in ("log_level", "allow_multiple_runs", "on_csv_write", "output_methods"):
        assert quiet not in text, text
    assert "project_name ''" in warned[1]
    assert json.loads(done.stdout) == {"project": "p", "csv": True, "empty_name": "codecarbon",
                                       "no_csv": False, "stopped": None}


DAEMON_MEASURED = """
import dataclasses, json, sys, time
from carbond.codecarbon import EmissionsTracker

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

tracker = EmissionsTracker(project_name=sys.argv[1], carbond_config=sys.argv[2],
                           output_dir=sys.argv[3], measure_power_secs=5)
tracker.start()
tracker.start_task("warmup")
burn(0.5)
task = tracker.stop_task()
burn(1.5)
kg = tracker.stop()
print(json.dumps({"kg": kg, "task_kg": task.emissions, "data": tracker.final_emissions_data.values,
                  "results": [dataclasses.asdict(r) for r in tracker.results]}))
"""


def test_a_daemon_measures_the_tracker_and_its_task(place: Place, tmp_path: Path) -> None:  # noqa: F811
    """The run and its task are blocks the daemon measured; the row, `stop()` and the
    daemon's ledger agree (within 2%: the ledger's flush)."""
    project = f"cc-{SESSION}"
    out = tmp_path / "out"
    out.mkdir()
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        (run,) = finished(place.script(DAEMON_MEASURED, project, place.config, str(out)))
        carbond.wait_ticks(2)
    # the run before the task, after it, and the task
    assert [r["measured_by"] for r in run["results"]] == ["daemon"] * 3, run["results"]
    grams = sum(r["grams"] for r in run["results"])
    joules = sum(r["cpu_joules"] + r["dram_joules"] + r["gpu_joules"] for r in run["results"])
    assert run["kg"] == pytest.approx(grams / 1e3) and run["kg"] > run["task_kg"] > 0
    assert sum(r["cpu_seconds"] for r in run["results"]) >= 1.9
    with open(out / "emissions.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["emissions"]) == pytest.approx(run["kg"])
    assert float(row["energy_consumed"]) == pytest.approx(joules / 3.6e6)  # PUE 1
    assert row["project_name"] == project == run["data"]["project_name"]
    recorded = report_projects(tmp_path / "state")[project]
    assert recorded["grams"] == pytest.approx(grams, rel=0.02)
    assert recorded["joules"] == pytest.approx(joules, rel=0.02)


def test_host_columns_from_a_proc_tree(tmp_path: Path) -> None:
    """The row's host columns from /proc as the kernel and the NVIDIA driver write it."""
    from carbond.commands.exec.hostfacts import driver_gpu_models, host_facts
    from carbond.commands.exec.summary import RunSummary, codecarbon_values

    (tmp_path / "meminfo").write_text("MemTotal:       25165824 kB\nMemFree:  1 kB\n"
                                      "MemAvailable:   18874368 kB\n")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654\n")
    for bus, model in (("0000:c1:00.0", "NVIDIA H100 80GB HBM3"),
                       ("0000:41:00.0", "NVIDIA H100 80GB HBM3")):
        (tmp_path / "driver" / "nvidia" / "gpus" / bus).mkdir(parents=True)
        (tmp_path / "driver" / "nvidia" / "gpus" / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 18\nBus Location: \t {bus}\n")
    models = driver_gpu_models(str(tmp_path))
    assert models == ["NVIDIA H100 80GB HBM3"] * 2
    assert driver_gpu_models(str(tmp_path / "none")) == []
    run = RunSummary(project="p", run_id="r", command=["x"], exit_status=0, started=0.0,
                     ended=10.0, duration_seconds=10.0, cpu_seconds=5.0,
                     joules={"cpu": 100.0, "dram": 0.0, "gpu": 3600.0}, grams=2.0,
                     grams_per_kwh=400.0, providers=["static"], zone="DE", pue=1.0,
                     measured_by="daemon")
    row = codecarbon_values(run, host_facts("DE", str(tmp_path), models))
    assert list(row) == list(CODECARBON_COLUMNS)
    assert row["gpu_count"] == 2 and row["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert row["gpu_utilization_percent"] == ""  # GPUs, but carbond does not sample it
    assert row["ram_total_size"] == 24.0 and row["ram_used_gb"] == 6.0  # GiB
    assert row["ram_utilization_percent"] == pytest.approx(25.0)
    assert row["cpu_model"] == "AMD EPYC 9654" and row["country_iso_code"] == "DEU"
    assert row["cpu_utilization_percent"] == pytest.approx(100 * 5.0 / 10.0 / os.cpu_count())
    assert row["gpu_energy"] == pytest.approx(0.001) and row["emissions"] == 0.002
