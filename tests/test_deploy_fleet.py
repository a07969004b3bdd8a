"""Issue 13's integration test: a real Prometheus (the Debian `prometheus` binary) scraping two
real `carbond run` instances every second, with deploy/prometheus's rules loaded.

Host A: a fake two-zone powercap tree (package 1500 W with a small counter range, so it wraps;
DRAM 60 W; psys 1700 W, which must never be added), one GPU at 300 W through the stand-in NVML,
embodied emissions, a constant 1000 g/kWh grid and a 1 g daily budget. Host B: the standard
fake tree at 200 W + 15 W, the static table for FR and a budget it stays under. Both account the
same real cgroups (a unit and a project, each with a CPU burner).

Host B also knows whose joules they are (issue 20): a stand-in CRI runtime serves three
namespaces of pods (one of team-a's containers burns CPU in its real cgroup) and a stand-in
scontrol says Slurm job 4242 (a burner in its step cgroup) is account physics; its budgets by
`namespace: team-a` and `account: physics` are used and projected.

Checked: every query of every dashboard panel, and every dashboard variable, returns data with
the variables substituted as Grafana does; the fleet, zone and kind recording rules equal the
sums over the hosts; the tiny budget's alert fires (an ALERTS series) and no other does; the
owner budgets show used and projected grams.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.burners import Burners
from tests.cgroup_helpers import TestTree
from tests.deploy_helpers import (
    PROMETHEUS,
    dashboards,
    panel_queries,
    substitute,
    variable_query,
    variables,
)
from tests.fakes.nvml import FakeGpu, FakeProcess, Scenario
from tests.helpers import carbond_run, free_port, wait_for
from tests.hwmon import FakeHwmon
from tests.identity_servers import CriServer, three_namespaces
from tests.powercap import INTEL_DRAM_RANGE_UJ, ConstantPower, FakePowercap, FakeZone
from tests.test_identity_kubernetes import cgroup_paths
from tests.test_identity_slurm import LAYOUTS, stand_in

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed for fake NVML")

GIB = 1 << 30
A_PACKAGE_WATTS, A_DRAM_WATTS, A_PSYS_WATTS, A_GPU_WATTS = 1500.0, 60.0, 1700.0, 300.0
B_PACKAGE_WATTS, B_DRAM_WATTS = 200.0, 15.0
A_PACKAGE_RANGE_UJ = 8_000_000_000  # 8 kJ: wraps every ~5 s at 1500 W, never within a tick
FLEET_WATTS = A_PACKAGE_WATTS + A_DRAM_WATTS + A_GPU_WATTS + B_PACKAGE_WATTS + B_DRAM_WATTS
# Grafana's built-in intervals, as it would set them for a 1 s scrape interval.
RATE_INTERVAL, INTERVAL, RANGE = "10s", "10s", "1m"

# Host A's whole node, from an ACPI power meter (a fake hwmon tree): the parts (1,860 W) are
# 77.5 % of it, and the 540 W rest is attributed as component platform.
A_PLATFORM_WATTS = 2400.0
A_PARTS_WATTS = A_PACKAGE_WATTS + A_DRAM_WATTS + A_GPU_WATTS
# Host power as carbond and the recording rules count it: a platform meter's where one
# measures (only host A's), else cpu + dram + gpu (psys, component platform from RAPL, never).
HOST_WATTS = ('sum by (instance) (carbond_host_power_watts{component="platform",'
              'source="acpi"}) or sum by (instance) (carbond_host_power_watts'
              '{component!="platform"})')

RULES = ["attribution:",
         "  processes: off",
         "  rules:",
         "    - {match: '^projects/(?P<name>[^/]+)$', kind: project, name: '{name}'}"]


class Drive:
    """Advances fake RAPL zones like hardware at constant power (wrapping at their range)."""

    def __init__(self, zones: list[tuple[FakeZone, float]]) -> None:
        self.zones = zones
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.02):
            now = time.monotonic()
            for zone, watts in self.zones:
                zone.advance_uj(round(watts * (now - last) * 1e6))
            last = now

    def __enter__(self) -> Drive:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", **params)["result"]

    def value(self, promql: str, at: float | None = None) -> tuple[float, float]:
        """The single sample of a query: (timestamp, value)."""
        result = self.query(promql, at)
        assert len(result) == 1, (promql, result)
        timestamp, value = result[0]["value"]
        return float(timestamp), float(value)

    def recorded(self, series: str, at: float) -> tuple[float, float]:
        """A recorded series' latest sample before `at`: (when the rule ran, value), so the
        same expression can be evaluated at that very time."""
        _, when = self.value(f"timestamp({series})", at)
        return self.value(series, when)


@contextlib.contextmanager
def prometheus(tmp_path: Path, targets: list[str]) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/test-deps.sh installs it)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml"), str(PROMETHEUS / "recording.yml")],
        "scrape_configs": [{"job_name": "carbond", "static_configs": [{"targets": targets}]}],
    }))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        server = Prometheus(f"http://127.0.0.1:{port}")
        waited(lambda: ready(server) or process.poll() is not None, "Prometheus to start")
        assert process.poll() is None, "Prometheus exited"
        yield server
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def waited(check: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    assert wait_for(check, timeout, 0.2), f"timed out waiting for {what}"


@contextlib.contextmanager
def fleet(tmp_path: Path, fake_lib: Path) -> Iterator[tuple[Prometheus, str, str]]:
    """Both hosts, their cgroups and burners, and Prometheus; all removed afterwards."""
    tree = TestTree("v2")
    burn = Burners()
    owners = contextlib.ExitStack()
    try:
        burners = []
        for rel in ("system.slice/web.service", "projects/climate-model"):
            tree.make(rel)
            burners.append(burn.start(0.15, tree.procs(rel)))
        metadata = owners.enter_context(known_owners(tree, burn, tmp_path))

        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        FakeHwmon(str(a_dir / "hwmon")).add(0, "power_meter", watts=A_PLATFORM_WATTS)
        tree_a = FakePowercap(str(a_dir / "powercap"))
        package = tree_a.add("intel-rapl:0", "package-0", A_PACKAGE_RANGE_UJ)
        dram = tree_a.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ)
        psys = tree_a.add("intel-rapl:1", "psys")
        scenario = a_dir / "nvml.txt"
        Scenario(gpus=[FakeGpu(0, "GPU-aaaaaaaa-0000-4000-8000-000000000000",
                               "NVIDIA H100 80GB HBM3", power_milliwatts=int(A_GPU_WATTS * 1000),
                               faults={"energy_not_supported"})],
                 processes=[FakeProcess(0, burners[0].pid, 2 * GIB)]).write(scenario)
        (a_dir / "carbond.yaml").write_text("\n".join([
            *RULES,
            f"meters: {{acpi: {{enabled: on, root: '{a_dir / 'hwmon'}'}}}}",
            "intensity: {zone: DE, providers: [{constant: {grams_per_kwh: 1000}}]}",
            "embodied: {kgco2e: 1500, lifetime: 4y}",
            "budgets: [{name: tiny, match: {}, period: day, limit: 1g}]", ""]))
        (b_dir / "carbond.yaml").write_text("\n".join([
            *RULES,
            "intensity: {zone: FR, providers: [{static: {}}]}",
            metadata, "budgets:",
            "  - {name: generous, match: {kind: unit}, period: month, limit: 1t}",
            *OWNER_BUDGETS, ""]))
        common = ("--cgroup-root", tree.root, "--interval", "1s")
        with owners, contextlib.ExitStack() as stack:
            stack.enter_context(Drive([(package, A_PACKAGE_WATTS), (dram, A_DRAM_WATTS),
                                       (psys, A_PSYS_WATTS)]))
            stack.enter_context(ConstantPower(str(b_dir / "powercap"), B_PACKAGE_WATTS,
                                              B_DRAM_WATTS))
            host_a = stack.enter_context(carbond_run(
                "--config", str(a_dir / "carbond.yaml"), "--powercap-root",
                str(a_dir / "powercap"), *common,
                env={"LD_LIBRARY_PATH": str(fake_lib), "FAKE_NVML_SCENARIO": str(scenario)}))
            host_b = stack.enter_context(carbond_run(
                "--config", str(b_dir / "carbond.yaml"), "--powercap-root",
                str(b_dir / "powercap"), *common))
            a, b = f"127.0.0.1:{host_a.port}", f"127.0.0.1:{host_b.port}"
            server = stack.enter_context(prometheus(tmp_path, [a, b]))
            yield server, a, b
    finally:
        owners.close()
        burn.stop_all()
        tree.cleanup()


OWNER_BUDGETS = ("  - {name: team-a, match: {namespace: team-a}, period: month, limit: 1t}",
                 "  - {name: physics, match: {account: physics}, period: month, limit: 1t}")


@contextlib.contextmanager
def known_owners(tree: TestTree, burn: Burners, tmp_path: Path) -> Iterator[str]:
    """Host B's owners: a stand-in CRI runtime with three namespaces of pods (a burner in
    team-a/web-7d4b9c/nginx's real cgroup), a stand-in scontrol (job 4242 of account physics,
    a burner in its step cgroup). Yields the `metadata:` line of host B's configuration; the
    server stops on the way out (the burners and cgroups go with the caller's)."""
    (tmp_path / "s").mkdir()
    pods = three_namespaces()
    cri = CriServer(str(tmp_path / "s" / "cri.sock"), pods).start()
    try:
        scontrol, _ = stand_in(tmp_path / "bin")
        for rel in (cgroup_paths(pods[0], "systemd")[1][1], LAYOUTS["v2"]):
            tree.make(rel)
            burn.start(0.05, tree.procs(rel))
        yield (f"metadata: {{cri: {{socket: '{cri.socket_path}'}}, podresources: {{socket: off}}, "
               "docker: {socket: off}, podman: {socket: off}, "
               f"slurm: {{scontrol: '{scontrol}'}}}}")
    finally:
        cri.stop()


def test_fleet_dashboards_rules_and_budget_alert(tmp_path, fake_lib):
    with fleet(tmp_path, fake_lib) as (prom, a, b):
        waited(lambda: len(prom.query('up{job="carbond"} == 1')) == 2, "both targets up")
        # The alert on the tiny budget fires live: an ALERTS series, firing.
        waited(lambda: prom.query('ALERTS{alertname="CarbondBudgetExceeded", '
                                    'alertstate="firing"}'), "CarbondBudgetExceeded to fire")
        # Host A's package counter has wrapped, and there are 20 s of scrapes to average.
        waited(lambda: prom.query(f'carbond_counter_wraps_total{{instance="{a}"}} > 0'),
                 "host A's RAPL counter to wrap")
        waited(lambda: prom.query("count_over_time(job:carbond_host_power_watts:sum[20s]) "
                                    ">= 15"), "15 evaluations of the recording rules")
        # ... and 30 s in which all five devices had power: a mean over the daemons' first
        # ticks (a GPU's first reading is its baseline) would not be the hardware's. 30 s, not
        # less: the fake hardware is a thread of this busy test process, and a second's lag
        # at one end of the window would be 6 % of 15 s.
        waited(lambda: prom.query(
            'count_over_time((count(carbond_host_power_watts{component!="platform"} > 0) >= 5)'
            "[30s:1s]) >= 30"), "30 s with power on every device", timeout=90)
        now = time.time()

        # ---- alerts: the budget one, and no other ---------------------------------------
        firing = prom.query('ALERTS{alertstate="firing"}', now)
        assert [(f["metric"]["alertname"], f["metric"].get("budget"), f["metric"]["instance"])
                for f in firing] == [("CarbondBudgetExceeded", "tiny", a)]
        assert firing[0]["metric"]["severity"] == "warning"

        # ---- recording rules ------------------------------------------------------------
        ts, fleet_watts = prom.recorded("job:carbond_host_power_watts:sum", now)
        _, hosts_watts = prom.value(f"sum({HOST_WATTS})", ts)
        assert fleet_watts == pytest.approx(hosts_watts, rel=0.01)
        per_host = {r["metric"]["instance"]: float(r["value"][1])
                    for r in prom.query(HOST_WATTS, ts)}
        assert set(per_host) == {a, b}
        assert per_host[a] == pytest.approx(A_PLATFORM_WATTS, rel=0.01)
        _, coverage = prom.value(f'carbond_host_coverage_ratio{{instance="{a}"}}', ts)
        assert coverage == pytest.approx(A_PARTS_WATTS / A_PLATFORM_WATTS, rel=0.05)
        assert fleet_watts == pytest.approx(per_host[a] + per_host[b], rel=0.01)
        zones = {r["metric"]["zone"]: float(r["value"][1])
                 for r in prom.query("zone:carbond_host_power_watts:sum", ts)}
        assert zones == pytest.approx({"DE": per_host[a], "FR": per_host[b]}, rel=0.01)
        # Consumers (every kind, idle included) account for all of the hosts' power.
        _, kinds = prom.value("sum(kind:carbond_consumer_power_watts:sum)", ts)
        assert kinds == pytest.approx(fleet_watts, rel=1e-6)
        # And each device's power is the fake hardware's (a mean of per-tick figures, each as
        # exact as the fake's 20 ms steps allow), so the fleet's is: psys not added, the GPU
        # included.
        devices = {(r["metric"]["instance"], r["metric"]["device"]): float(r["value"][1])
                   for r in prom.query('avg_over_time(carbond_host_power_watts'
                                       '{component!="platform"}[30s])', ts)}
        nominal = {(a, "package-0"): A_PACKAGE_WATTS, (a, "dram-0"): A_DRAM_WATTS,
                   (a, "gpu-0"): A_GPU_WATTS, (b, "package-0"): B_PACKAGE_WATTS,
                   (b, "dram-0"): B_DRAM_WATTS}
        assert math.fsum(nominal.values()) == FLEET_WATTS
        assert devices == pytest.approx(nominal, rel=0.05)
        # The energy and emission rules are the sums of the hosts' rates (rate5m: with less
        # than 5 minutes of data, compare with the same window, not with the wattage) ...
        ts, energy_rule = prom.recorded("job:carbond_host_energy_joules:rate5m", now)
        _, energy_hosts = prom.value(
            'sum(sum by (instance) (rate(carbond_host_energy_joules_total{component="platform",'
            'source="acpi"}[5m])) or sum by (instance) (rate(carbond_host_energy_joules_total'
            '{component!="platform"}[5m])))', ts)
        assert energy_rule == pytest.approx(energy_hosts, rel=0.01)
        ts, grams_rule = prom.recorded('zone:carbond_host_emissions_grams:rate5m{zone="DE"}',
                                       now)
        _, grams_a = prom.value(
            f'rate(carbond_host_emissions_grams_total{{instance="{a}"}}[5m])', ts)
        assert grams_rule == pytest.approx(grams_a, rel=0.01)
        # ... and those counters grow at the fake hardware's rate.
        rates = {(r["metric"]["instance"], r["metric"]["device"]): float(r["value"][1])
                 for r in prom.query('rate(carbond_host_energy_joules_total'
                                     '{component!="platform"}[30s])', ts)}
        assert rates == pytest.approx(nominal, rel=0.05), prom.query("up", ts)
        _, grams_per_second = prom.value(
            f'rate(carbond_host_emissions_grams_total{{instance="{a}"}}[30s])', ts)
        host_a_kwh_per_second = A_PLATFORM_WATTS / 3.6e6  # the whole node's
        assert grams_per_second == pytest.approx(host_a_kwh_per_second * 1000, rel=0.05)

        # ---- budgets by owner (host B names its pods and jobs) --------------------------
        for budget in ("team-a", "physics"):
            for gauge in ("used", "projected"):
                _, grams = prom.value(
                    f'carbond_budget_{gauge}_grams{{instance="{b}", budget="{budget}"}}', now)
                assert grams > 0, (budget, gauge)
        owners = {(r["metric"]["consumer"], r["metric"].get("namespace"),
                   r["metric"].get("account"))
                  for r in prom.query(f'carbond_consumer_info{{instance="{b}"}}', now)}
        assert ("team-a/web-7d4b9c/nginx", "team-a", None) in owners
        assert ("slurm/4242", None, "physics") in owners

        # ---- every dashboard variable and panel query returns data ----------------------
        empty, checked = [], 0
        for name, board in dashboards().items():
            single_instance = variables(board)["instance"]["multi"] is False
            values = resolve_variables(prom, board, [a] if single_instance else [a, b], now)
            multi = {n: bool(v.get("multi")) for n, v in variables(board).items()}
            all_values = {n: v.get("allValue") for n, v in variables(board).items()}
            for query in panel_queries(name, board):
                expr = substitute(query.expr, values, multi, all_values,
                                  interval=INTERVAL, rate_interval=RATE_INTERVAL, range_=RANGE)
                checked += 1
                if not prom.query(expr, now):
                    empty.append(f"{name} / {query.panel} / {query.ref_id}: {expr}")
        assert empty == [] and checked == sum(
            len(panel_queries(name, board)) for name, board in dashboards().items())
        # Host B's counters never wrapped nor reset: the Host dashboard's panel still has
        # data there, every device at 0 (issue 21 item 10: the series exist from the start).
        board = dashboards()["carbond-host.json"]
        (query,) = [q for q in panel_queries("carbond-host.json", board)
                    if q.panel == "Counter wraps and resets"]
        expr = substitute(query.expr, resolve_variables(prom, board, [b], now),
                          {n: bool(v.get("multi")) for n, v in variables(board).items()},
                          {n: v.get("allValue") for n, v in variables(board).items()},
                          interval=INTERVAL, rate_interval=RATE_INTERVAL, range_=RANGE)
        healthy = prom.query(expr, now)
        assert {(r["metric"]["device"], r["metric"]["event"]) for r in healthy} == {
            (device, event) for device in ("package-0", "dram-0") for event in ("wrap", "reset")}
        assert {float(r["value"][1]) for r in healthy} == {0.0}


def resolve_variables(prom: Prometheus, board: dict[str, Any], instances: list[str],
                      now: float) -> dict[str, list[str]]:
    """Each query variable's options, from Prometheus, as Grafana would list them; the
    instance variable must list exactly the two hosts, and is then set to `instances`."""
    values: dict[str, list[str]] = {}
    for name, variable in variables(board).items():
        if variable["type"] != "query":
            continue
        selector, label = variable_query(variable)
        multi = {n: bool(v.get("multi")) for n, v in variables(board).items()}
        all_values = {n: v.get("allValue") for n, v in variables(board).items()}
        selector = substitute(selector, values, multi, all_values, interval=INTERVAL,
                              rate_interval=RATE_INTERVAL, range_=RANGE)
        series = prom.get("/api/v1/series", **{"match[]": selector, "start": f"{now - 60:.3f}",
                                               "end": f"{now:.3f}"})
        options = sorted({s[label] for s in series if label in s})
        assert options, f"variable {name}: {selector} lists nothing"
        values[name] = options
        if name == "instance":
            assert options == sorted(instances_all(prom, now)), options
            values[name] = instances
    return values


def instances_all(prom: Prometheus, now: float) -> list[str]:
    return [r["metric"]["instance"] for r in prom.query('up{job="carbond"}', now)]
