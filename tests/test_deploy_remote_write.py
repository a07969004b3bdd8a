"""The fleet path of deploy/prometheus/remote-write.md, with real components from Debian (issue
23): two real `carbond run` hosts, scraped by a real Prometheus in agent mode (it keeps and
evaluates nothing) that remote-writes into a real VictoriaMetrics, with vmalert evaluating
deploy/prometheus/recording.yml against it.

Checked against VictoriaMetrics alone: every dashboard variable and panel query and every
recording rule expression returns data, the recorded fleet power is the sum of the hosts', and
`carbond report --prometheus <VictoriaMetrics>` equals what the hosts' own ledgers say
(`carbond report --format json` on each state dir) within 1 %, in total and per consumer.

The fake hardware is off until VictoriaMetrics holds both hosts' counters at zero and off again
before the window ends, so that the ledgers (everything since start) and `increase()` over the
window count the same energy.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.burners import Burners
from tests.cgroup_helpers import TestTree
from tests.deploy_helpers import (
    PROMETHEUS,
    dashboards,
    panel_queries,
    rules,
    substitute,
    variables,
)
from tests.fakes.nvml import FakeGpu, FakeProcess, Scenario
from tests.helpers import Carbond, carbond_run, free_port, total
from tests.hwmon import FakeHwmon, FakePowerMeter
from tests.powercap import INTEL_DRAM_RANGE_UJ, FakePowercap, FakeZone
from tests.test_deploy_fleet import (
    INTERVAL,
    OWNER_BUDGETS,
    RANGE,
    RATE_INTERVAL,
    RULES,
    Prometheus,
    known_owners,
    resolve_variables,
    waited,
)

TOOLS = ("prometheus", "victoria-metrics", "vmalert", "gcc")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (scripts/test-deps.sh installs them)")

GIB = 1 << 30
A_PACKAGE_WATTS, A_DRAM_WATTS, A_PSYS_WATTS, A_GPU_WATTS = 400.0, 40.0, 600.0, 300.0
B_PACKAGE_WATTS, B_DRAM_WATTS = 200.0, 15.0
A_PACKAGE_RANGE_UJ = 4_000_000_000  # 4 kJ: wraps every 10 s at 400 W, never within a tick
FLEET_WATTS = A_PACKAGE_WATTS + A_DRAM_WATTS + A_GPU_WATTS + B_PACKAGE_WATTS + B_DRAM_WATTS
ENERGY = "carbond_host_energy_joules_total"
# Host A's whole node from an ACPI power meter (fake hwmon): the parts are 740 W of it.
A_PLATFORM_WATTS = 1000.0
# Host power as carbond and the recording rules count it (deploy/prometheus/recording.yml).
HOST_WATTS = ('sum by (instance) (carbond_host_power_watts{component="platform",'
              'source="acpi"}) or sum by (instance) (carbond_host_power_watts'
              '{component!="platform"})')


class Hardware:
    """Fake RAPL zones and a fake GPU at constant power while switched on, idle at 0 W when
    off (no counter moves), like a machine whose load comes and goes."""

    def __init__(self, zones: list[tuple[FakeZone, float]], scenario: Scenario,
                 scenario_path: Path, gpu_milliwatts: int, platform: FakePowerMeter,
                 platform_watts: float) -> None:
        self.zones, self.scenario, self.scenario_path = zones, scenario, scenario_path
        self.gpu_milliwatts = gpu_milliwatts
        self.platform, self.platform_watts = platform, platform_watts
        self._on = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-hardware", daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.02):
            now = time.monotonic()
            if self._on.is_set():
                for zone, watts in self.zones:
                    zone.advance_uj(round(watts * (now - last) * 1e6))
            last = now

    def switch(self, on: bool) -> None:
        self.scenario.gpu(0).power_milliwatts = self.gpu_milliwatts if on else 0
        self.scenario.write(self.scenario_path)
        # Off, the power meter reads 0 W: no reading (a node never draws nothing), so the
        # platform counter stands still as the others do.
        self.platform.set_watts(self.platform_watts if on else 0.0)
        if on:
            self._on.set()
        else:
            self._on.clear()

    def __enter__(self) -> Hardware:
        self.switch(False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def process(command: list[str], log: Path, what: str,
            health_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server of the test's own on 127.0.0.1, killed afterwards, failure or not."""
    with open(log, "wb") as out:
        started = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        waited(lambda: answers(health_url) or started.poll() is not None, f"{what} to start")
        assert started.poll() is None, f"{what} exited: {log.read_text()[-2000:]}"
        yield started
    finally:
        started.send_signal(signal.SIGKILL)
        started.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def pipeline(tmp_path: Path, targets: list[str]) -> Iterator[Prometheus]:
    """VictoriaMetrics, Prometheus in agent mode writing into it, vmalert recording into it;
    the Prometheus API the tests and `carbond report` read is VictoriaMetrics'."""
    vm_port, agent_port, alert_port = free_port(), free_port(), free_port()
    vm = f"http://127.0.0.1:{vm_port}"
    agent_config = tmp_path / "agent.yml"
    agent_config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "external_labels": {"cluster": "test"}},
        "scrape_configs": [{"job_name": "carbond", "static_configs": [{"targets": targets}]}],
        "remote_write": [{"url": f"{vm}/api/v1/write",
                          "queue_config": {"batch_send_deadline": "1s"}}],
    }))
    with contextlib.ExitStack() as stack:
        stack.enter_context(process(
            ["victoria-metrics", f"-httpListenAddr=127.0.0.1:{vm_port}",
             f"-storageDataPath={tmp_path / 'vm'}", "-retentionPeriod=1d",
             # Samples are queryable at once (not after the default 30 s), and no answer
             # comes from a cache of an earlier query.
             "-search.latencyOffset=0s", "-search.disableCache"],
            tmp_path / "vm.log", "VictoriaMetrics", f"{vm}/health"))
        stack.enter_context(process(
            ["prometheus", "--enable-feature=agent", f"--config.file={agent_config}",
             f"--storage.agent.path={tmp_path / 'agent'}",
             f"--web.listen-address=127.0.0.1:{agent_port}"],
            tmp_path / "agent.log", "Prometheus (agent mode)",
            f"http://127.0.0.1:{agent_port}/-/ready"))
        stack.enter_context(process(
            ["vmalert", f"-rule={PROMETHEUS / 'recording.yml'}", f"-datasource.url={vm}",
             f"-remoteWrite.url={vm}", "-evaluationInterval=1s",
             f"-httpListenAddr=127.0.0.1:{alert_port}"],
            tmp_path / "vmalert.log", "vmalert", f"http://127.0.0.1:{alert_port}/health"))
        yield Prometheus(vm)


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, timezone.utc).isoformat()


def report(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "carbond", "report", "--format", "json",
                           "--by", "consumer", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_agent_remote_write_into_victoriametrics(tmp_path, fake_lib):
    tree, burn = TestTree("v2"), Burners()
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
        platform = FakeHwmon(str(a_dir / "hwmon")).add(0, "power_meter", watts=0.0)
        tree_a, tree_b = FakePowercap(str(a_dir / "powercap")), FakePowercap(
            str(b_dir / "powercap"))
        zones = [(tree_a.add("intel-rapl:0", "package-0", A_PACKAGE_RANGE_UJ), A_PACKAGE_WATTS),
                 (tree_a.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ), A_DRAM_WATTS),
                 (tree_a.add("intel-rapl:1", "psys"), A_PSYS_WATTS),
                 (tree_b.add("intel-rapl:0", "package-0"), B_PACKAGE_WATTS),
                 (tree_b.add("intel-rapl:0:0", "dram", INTEL_DRAM_RANGE_UJ), B_DRAM_WATTS)]
        scenario_path = a_dir / "nvml.txt"
        scenario = Scenario(
            gpus=[FakeGpu(0, "GPU-bbbbbbbb-0000-4000-8000-000000000000", "NVIDIA H100 80GB HBM3",
                          faults={"energy_not_supported"})],
            processes=[FakeProcess(0, burners[0].pid, 2 * GIB)])
        (a_dir / "carbond.yaml").write_text("\n".join([
            *RULES, f"meters: {{acpi: {{enabled: on, root: '{a_dir / 'hwmon'}'}}}}",
            "intensity: {zone: DE, providers: [{constant: {grams_per_kwh: 1000}}]}",
            "embodied: {kgco2e: 1500, lifetime: 4y}",
            "budgets: [{name: tiny, match: {}, period: day, limit: 1g}]", ""]))
        (b_dir / "carbond.yaml").write_text("\n".join([
            *RULES, "intensity: {zone: FR, providers: [{static: {}}]}", metadata,
            "budgets:", "  - {name: generous, match: {kind: unit}, period: month, limit: 1t}",
            *OWNER_BUDGETS, ""]))
        common = ("--cgroup-root", tree.root, "--interval", "1s")
        started = time.time()
        with owners, Hardware(zones, scenario, scenario_path, int(A_GPU_WATTS * 1000),
                              platform, A_PLATFORM_WATTS) as hardware, \
                contextlib.ExitStack() as hosts:
            host_a = hosts.enter_context(carbond_run(
                "--config", str(a_dir / "carbond.yaml"), "--powercap-root",
                str(a_dir / "powercap"), "--state-dir", str(a_dir / "state"), *common,
                env={"LD_LIBRARY_PATH": str(fake_lib), "FAKE_NVML_SCENARIO": str(scenario_path)}))
            host_b = hosts.enter_context(carbond_run(
                "--config", str(b_dir / "carbond.yaml"), "--powercap-root",
                str(b_dir / "powercap"), "--state-dir", str(b_dir / "state"), *common))
            a, b = f"127.0.0.1:{host_a.port}", f"127.0.0.1:{host_b.port}"
            with pipeline(tmp_path, [a, b]) as vm:
                since = fleet_checks(vm, hardware, a, b)
                until = window(vm, hardware, host_a, host_b)
                fleet = report("--prometheus", vm.url, "--since", iso(since), "--until",
                               iso(until))
                hosts.close()  # SIGTERM: each ledger flushed
        ledgers = [report("--state-dir", str(d / "state"), "--since", iso(started - 60),
                          "--until", iso(time.time())) for d in (a_dir, b_dir)]
    finally:
        owners.close()
        burn.stop_all()
        tree.cleanup()
    compare(fleet, ledgers)


def fleet_checks(vm: Prometheus, hardware: Hardware, a: str, b: str) -> float:
    """With power on: every dashboard query and rule expression answered by VictoriaMetrics.
    Returns a moment before the first joule, when VictoriaMetrics held every counter at 0."""
    waited(lambda: len(vm.query('up{job="carbond"} == 1')) == 2, "both hosts in VictoriaMetrics")
    waited(lambda: vm.query(f"count({ENERGY} == 0) >= 6 and count({ENERGY}) == "
                            f"count({ENERGY} == 0)"), "both hosts' six counters at zero")
    since = time.time()
    hardware.switch(True)
    waited(lambda: vm.query(f'carbond_counter_wraps_total{{instance="{a}"}} > 0'),
           "host A's RAPL counter to wrap", timeout=90)
    waited(lambda: vm.query("count_over_time(job:carbond_host_power_watts:sum[20s]) >= 15"),
           "15 evaluations of the recording rules by vmalert", timeout=90)
    waited(lambda: vm.query(
        'count_over_time((count(carbond_host_power_watts{component!="platform"} > 0) >= 5)'
        "[30s:1s]) >= 30"), "30 s with power on every device", timeout=90)
    now = time.time()
    # The recorded fleet power is the sum of the hosts', and the hardware's.
    ts, fleet_watts = vm.recorded("job:carbond_host_power_watts:sum", now)
    _, hosts_watts = vm.value(f"sum({HOST_WATTS})", ts)
    assert fleet_watts == pytest.approx(hosts_watts, rel=0.01)
    per_host = {r["metric"]["instance"]: float(r["value"][1]) for r in vm.query(HOST_WATTS, ts)}
    assert per_host[a] == pytest.approx(A_PLATFORM_WATTS, rel=0.02)
    _, mean_watts = vm.value('sum(avg_over_time(carbond_host_power_watts'
                             '{component!="platform"}[20s]))', ts)
    assert mean_watts == pytest.approx(FLEET_WATTS, rel=0.05)
    assert {r["metric"].get("cluster") for r in vm.query("up", now)} == {"test"}

    empty, checked = [], 0
    for rule in rules(PROMETHEUS / "recording.yml"):
        checked += 1
        if not vm.query(rule["expr"], now):
            empty.append(f"rule {rule['record']}: {rule['expr']}")
        if not vm.query(rule["record"], now):
            empty.append(f"recorded series {rule['record']}")
    for name, board in dashboards().items():
        single_instance = variables(board)["instance"]["multi"] is False
        values = resolve_variables(vm, board, [a] if single_instance else [a, b], now)
        multi = {n: bool(v.get("multi")) for n, v in variables(board).items()}
        all_values = {n: v.get("allValue") for n, v in variables(board).items()}
        for query in panel_queries(name, board):
            expr = substitute(query.expr, values, multi, all_values, interval=INTERVAL,
                              rate_interval=RATE_INTERVAL, range_=RANGE)
            checked += 1
            if not vm.query(expr, now):
                empty.append(f"{name} / {query.panel} / {query.ref_id}: {expr}")
    assert empty == [], "\n".join(empty)
    assert checked == len(rules(PROMETHEUS / "recording.yml")) + sum(
        len(panel_queries(name, board)) for name, board in dashboards().items())
    return since


def window(vm: Prometheus, hardware: Hardware, host_a: Carbond, host_b: Carbond) -> float:
    """Power off; the end of the report's window: once VictoriaMetrics holds each idle host's
    last joule."""
    hardware.switch(False)

    def settled() -> bool:
        direct = {host: total(host.scrape(), ENERGY) for host in (host_a, host_b)}
        time.sleep(2.5)  # two more ticks: unchanged means the hardware is idle
        again = {host: total(host.scrape(), ENERGY) for host in (host_a, host_b)}
        if direct != again:
            return False
        stored = {r["metric"]["instance"]: float(r["value"][1]) for r in
                  vm.query(f"sum by (instance) ({ENERGY})")}
        return all(math.isclose(stored.get(f"127.0.0.1:{h.port}", -1), j, rel_tol=1e-9)
                   for h, j in again.items())

    waited(settled, "idle hosts whose last joules are in VictoriaMetrics", timeout=60)
    return time.time()


def compare(fleet: dict[str, Any], ledgers: list[dict[str, Any]]) -> None:
    assert fleet["source"] == "prometheus" and all(h["source"] == "ledger" for h in ledgers)
    for key in ("joules", "grams", "cpu_joules", "dram_joules", "gpu_joules"):
        hosts = math.fsum(h["total"][key] for h in ledgers)
        assert hosts > 0, key
        print(f"  {key}: VictoriaMetrics {fleet['total'][key]:.6g}, ledgers {hosts:.6g} "
              f"({fleet['total'][key] / hosts - 1:+.2e})")  # shown by pytest -s
        assert fleet["total"][key] == pytest.approx(hosts, rel=0.01), key
    by_consumer: dict[tuple[str, str], float] = {}
    for ledger in ledgers:
        for row in ledger["rows"]:
            key = (row["consumer"], row["kind"])
            by_consumer[key] = by_consumer.get(key, 0.0) + row["joules"]
    fleet_rows = {(r["consumer"], r["kind"]): r["joules"] for r in fleet["rows"]}
    assert set(fleet_rows) == set(by_consumer)
    assert fleet_rows == pytest.approx(by_consumer, rel=0.01, abs=1e-6)
    assert {("web.service", "unit"), ("climate-model", "project")} <= set(fleet_rows)
