"""`carbond report`: every format and grouping from a ledger, bad input, and `--prometheus`
against a real Prometheus scraping a real `carbond run`."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from carbond.commands.report import parse_instant
from carbond.ledger.ledger import Ledger
from carbond.ledger.periods import get_zone
from carbond.types import ConfigError, Consumer
from tests.cgroup_helpers import TestTree
from tests.helpers import carbond_run, free_port, tick_record, total, wait_for
from tests.test_pipeline import ConstantPower

KWH = 3.6e6
H0 = 1_714_521_600  # 2024-05-01 00:00 UTC
DAY = 86400
A = Consumer("unit", "a.service")
B = Consumer("job", "slurm/42")
P = Consumer("project", "climate")
Q = Consumer("project", "ocean")
NO_PROXY = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def book(ledger: Ledger, wall_time: float, kwh: dict[Consumer, float], intensity: float,
         provider: str) -> None:
    """kWh per consumer: cpu 80 %, dram 20 % (projects on the GPU); grams at `intensity`."""
    energy = {c: ({"gpu": k * KWH} if c.kind == "project" else
                  {"cpu": 0.8 * k * KWH, "dram": 0.2 * k * KWH}) for c, k in kwh.items()}
    grams = {c: k * intensity for c, k in kwh.items()}
    embodied = {c: k * 10.0 for c, k in kwh.items()}
    ledger.record(tick_record(wall_time, 60.0, energy, grams, embodied, {}, intensity, provider))


@pytest.fixture
def ledger_dir(tmp_path: Path) -> str:
    """May 1: A 1 kWh at 400 (electricitymaps), B 2 kWh, project climate 0.5 kWh.
    May 2: A 1 kWh at 200 (static), project ocean 0.25 kWh. May 5: A 7 kWh (outside)."""
    state = str(tmp_path / "state")
    with Ledger.open(state, clock=Clock(H0 + 6 * DAY)) as ledger:
        book(ledger, H0 + 600, {A: 1.0, B: 2.0, P: 0.5}, 400.0, "electricitymaps")
        book(ledger, H0 + DAY + 600, {A: 1.0, Q: 0.25}, 200.0, "static")
        book(ledger, H0 + 4 * DAY + 600, {A: 7.0}, 200.0, "static")
    return state


def report(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", "report", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **NO_PROXY, **(env or {})})


MAY_1_TO_3 = ("--since", "2024-05-01", "--until", "2024-05-03")


def test_json_by_consumer_in_base_units(ledger_dir):
    result = report("--state-dir", ledger_dir, *MAY_1_TO_3, "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"] == "ledger" and doc["by"] == "consumer"
    assert doc["since"] == "2024-05-01T00:00:00+00:00"
    rows = {(r["consumer"], r["kind"]): r for r in doc["rows"]}
    assert set(rows) == {("a.service", "unit"), ("slurm/42", "job"), ("climate", "project"),
                         ("ocean", "project")}
    a = rows[("a.service", "unit")]
    assert a["joules"] == pytest.approx(2 * KWH)
    assert a["cpu_joules"] == pytest.approx(1.6 * KWH)
    assert a["dram_joules"] == pytest.approx(0.4 * KWH)
    assert a["grams"] == pytest.approx(600.0)
    assert a["embodied_grams"] == pytest.approx(20.0)
    assert a["grid_grams_per_kwh"] == pytest.approx(300.0)  # energy-weighted 400 and 200
    assert a["providers"] == ["electricitymaps", "static"]
    assert rows[("slurm/42", "job")]["providers"] == ["electricitymaps"]
    assert rows[("climate", "project")]["gpu_joules"] == pytest.approx(0.5 * KWH)
    assert doc["rows"][0]["consumer"] == "slurm/42"  # largest emitter first
    assert doc["total"]["joules"] == pytest.approx(4.75 * KWH)
    assert doc["total"]["grams"] == pytest.approx(600 + 800 + 200 + 50)
    assert doc["total"]["providers"] == ["electricitymaps", "static"]


def test_csv_by_kind_with_a_totals_row(ledger_dir):
    result = report("--state-dir", ledger_dir, *MAY_1_TO_3, "--format", "csv", "--by", "kind")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by_kind = {r["kind"]: r for r in rows}
    assert set(by_kind) == {"unit", "job", "project", "total"}
    assert float(by_kind["project"]["gpu_joules"]) == pytest.approx(0.75 * KWH)
    assert float(by_kind["project"]["grams"]) == pytest.approx(200 + 50)
    assert by_kind["unit"]["providers"] == "electricitymaps;static"
    assert float(by_kind["total"]["joules"]) == pytest.approx(4.75 * KWH)
    assert rows[-1]["kind"] == "total"


def test_table_in_scaled_units_with_a_total_row(ledger_dir):
    result = report("--state-dir", ledger_dir, *MAY_1_TO_3)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[1])
    assert header[:8] == ["CONSUMER", "KIND", "CPU", "DRAM", "GPU", "ENERGY", "CO2e",
                          "EMBODIED"] and header[-1] == "PROVIDERS"
    job = re.split(r"\s{2,}", next(line for line in lines if line.startswith("slurm/42")))
    assert job == ["slurm/42", "job", "1.60 kWh", "400 Wh", "0 J", "2.00 kWh", "800 g",
                   "20.0 g", "400", "electricitymaps"]
    totals = re.split(r"\s{2,}", lines[-1].strip())
    assert totals[0] == "TOTAL" and totals[4:6] == ["4.75 kWh", "1.65 kg"]


def test_by_day_follows_the_configured_time_zone(ledger_dir, tmp_path):
    result = report("--state-dir", ledger_dir, *MAY_1_TO_3, "--by", "day", "--format", "json")
    assert [(r["day"], r["joules"] / KWH) for r in json.loads(result.stdout)["rows"]] == [
        ("2024-05-01", pytest.approx(3.5)), ("2024-05-02", pytest.approx(1.25))]
    config = tmp_path / "carbond.yaml"
    config.write_text("budgets_timezone: America/New_York\n")  # UTC-4 in May
    result = report("--config", str(config), "--state-dir", ledger_dir, "--since", "2024-04-30",
                    "--until", "2024-05-03", "--by", "day", "--format", "csv")
    assert result.returncode == 0, result.stderr
    days = [row["day"] for row in csv.DictReader(io.StringIO(result.stdout))]
    assert days == ["2024-04-30", "2024-05-01", "total"]  # 00:10 UTC is the evening before


def test_by_project(ledger_dir):
    result = report("--state-dir", ledger_dir, "--since", "2024-05-01T00:00:00Z",
                    "--until", "2024-05-01T23:00:00+00:00", "--by", "project", "--format", "json")
    doc = json.loads(result.stdout)
    assert [(r["project"], r["grams"]) for r in doc["rows"]] == [("climate", 200.0)]
    assert doc["total"]["gpu_joules"] == pytest.approx(0.5 * KWH)


def test_an_empty_range_is_a_report_of_zeros(ledger_dir):
    result = report("--state-dir", ledger_dir, "--since", "2023-01-01", "--until", "2023-02-01",
                    "--format", "json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert doc["rows"] == [] and doc["total"]["joules"] == 0.0


@pytest.mark.parametrize(("args", "needle"), [
    (["--since", "last tuesday"], "--since: cannot parse 'last tuesday'"),
    (["--since", "2024-13-01"], "--since: cannot parse"),
    (["--until", "soon"], "--until: cannot parse"),
    (["--since", "2024-05-03", "--until", "2024-05-01"], "--since: must be before --until"),
    (["--by", "team"], "argument --by: invalid choice: 'team'"),
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["--prometheus", "ftp://example.org"], "--prometheus: expected an http(s) URL"),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(ledger_dir, args, needle):
    result = report("--state-dir", ledger_dir, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and needle in result.stderr


def test_no_ledger_names_the_state_dir(tmp_path):
    result = report("--state-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"carbond: error: --state-dir: no ledger at "
                                     f"{tmp_path / 'nothing' / 'ledger.db'}")


def test_an_unreachable_prometheus_exits_1():
    port = free_port()
    result = report("--prometheus", f"http://user:secret@127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"cannot reach http://127.0.0.1:{port}" in \
        result.stderr
    assert "secret" not in result.stderr


def test_parse_instant():
    now = datetime(2024, 5, 17, 15, 30, tzinfo=timezone.utc).timestamp()
    utc, berlin = get_zone("UTC"), get_zone("Europe/Berlin")
    assert parse_instant("now", "--until", now, utc) == now
    assert parse_instant("30d", "--since", now, utc) == now - 30 * DAY
    assert parse_instant("12h", "--since", now, utc) == now - 12 * 3600
    assert parse_instant("today", "--since", now, utc) == H0 + 16 * DAY
    assert parse_instant("yesterday", "--since", now, utc) == H0 + 15 * DAY
    assert parse_instant("today", "--since", now, berlin) == H0 + 16 * DAY - 2 * 3600
    assert parse_instant("2024-05-01", "--since", now, berlin) == H0 - 2 * 3600
    assert parse_instant("2024-05-01T12:00", "--since", now, utc) == H0 + 12 * 3600
    assert parse_instant("2024-05-01T12:00:00+02:00", "--since", now, utc) == H0 + 10 * 3600
    with pytest.raises(ConfigError) as caught:
        parse_instant("30 parsecs", "--since", now, utc)
    assert caught.value.key == "--since"


# ---- --prometheus against a real Prometheus -------------------------------------------------


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict]:
        query = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=10) as answer:
            return json.load(answer)["data"]["result"]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator:
    """Starts the real Prometheus binary scraping a target every second; killed after."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/test-deps.sh installs it)")
    started: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: carbond\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return Prometheus(url)
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(0.1)

    try:
        yield start
    finally:
        for process in started:
            process.send_signal(signal.SIGKILL)
            process.wait()


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, timezone.utc).isoformat()


@pytest.mark.parametrize("tree", ["v2"], indirect=True)
def test_prometheus_report_matches_the_counters(tree: TestTree, tmp_path, prometheus_for):
    """`report --prometheus` totals equal the growth of the counters scraped directly from
    carbond over the same window, within 1 %."""
    tree.make("system.slice/busy.service")
    tree.burners.start(0.3, tree.procs("system.slice/busy.service"))
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {processes: off}\nintensity: {zone: DE}\n")
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
        "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
        "--cgroup-root", tree.root, "--state-dir", str(tmp_path / "state"),
        "--interval", "100ms",
    ) as daemon:
        prometheus = prometheus_for(daemon.port)
        assert wait_for(lambda: prometheus.query('up{job="carbond"} == 1'), 60, 0.2), \
            "timed out waiting for the first scrape"
        daemon.wait_ticks(10)

        def scrape() -> tuple[float, dict]:
            before = time.time()
            samples = daemon.scrape()
            return (before + time.time()) / 2, samples

        since, first = scrape()
        daemon.wait_ticks(300, timeout=120)  # about 30 s of counters
        until, last = scrape()
        assert wait_for(lambda: prometheus.query(
            f'timestamp(up{{job="carbond"}}) > {until + 1.5}'), 60, 0.2), \
            "timed out waiting for a scrape after the window"
        results = {by: report("--prometheus", prometheus.url, "--since", iso(since),
                              "--until", iso(until), "--by", by, "--format", "json")
                   for by in ("consumer", "kind", "day")}
    for result in results.values():
        assert result.returncode == 0, result.stderr
    joules = (total(last, "carbond_consumer_energy_joules_total")
              - total(first, "carbond_consumer_energy_joules_total"))
    grams = (total(last, "carbond_consumer_emissions_grams_total")
             - total(first, "carbond_consumer_emissions_grams_total"))
    assert joules > 0 and grams > 0
    for by, result in results.items():
        doc = json.loads(result.stdout)
        assert doc["source"] == "prometheus", by
        assert doc["total"]["joules"] == pytest.approx(joules, rel=0.01), by
        assert doc["total"]["grams"] == pytest.approx(grams, rel=0.01), by
        assert doc["total"]["providers"] == ["static"], by
    rows = {(r["consumer"], r["kind"]) for r in json.loads(results["consumer"].stdout)["rows"]}
    assert ("busy.service", "unit") in rows
