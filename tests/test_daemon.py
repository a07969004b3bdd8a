"""End to end: the real `carbond run` on fake powercap trees, scraped over HTTP."""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from tests import powercap
from tests.helpers import carbond_run, select, total

HOST_ENERGY = "carbond_host_energy_joules_total"


def test_two_socket_tree_exports_cpu_dram_platform_separately(tmp_path):
    tree = powercap.intel_two_socket(str(tmp_path))
    small_range = 10_000_000
    # package-0 lives in intel-rapl:1; give it a small range close to wrapping
    wrapping = tree.zones["intel-rapl:1"]
    with open(os.path.join(wrapping.path, "max_energy_range_uj"), "w") as handle:
        handle.write(f"{small_range}\n")
    wrapping.range_uj = small_range
    wrapping.set_uj(9_000_000)
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "1s") as daemon:
        before = daemon.wait_ticks(1)
        increments_uj = {
            "intel-rapl:0": 7_250_000,  # package-1
            "intel-rapl:1": 3_500_001,  # package-0, wraps
            "intel-rapl:0:2": 1_000_000,  # dram-1
            "intel-rapl:1:2": 2_000_000,  # dram-0
            "intel-rapl:2": 20_000_000,  # psys
            "intel-rapl:0:0": 99_000_000,  # core: never counted
            "intel-rapl:1:1": 99_000_000,  # uncore: never counted
            "intel-rapl-mmio:0": 99_000_000,  # mmio duplicate: never counted
        }
        for zone_id, increment in increments_uj.items():
            tree.zones[zone_id].advance_uj(increment)
        after = daemon.wait_ticks(2)

    def grew(**labels: str) -> float:
        return total(after, HOST_ENERGY, **labels) - total(before, HOST_ENERGY, **labels)

    assert abs(grew(component="cpu") - (7.25 + 3.500001)) <= 1e-6
    assert abs(grew(component="dram") - 3.0) <= 1e-6
    assert abs(grew(component="platform", device="psys") - 20.0) <= 1e-6
    assert set(dict(k)["device"] for k in select(after, HOST_ENERGY, component="cpu")) == {
        "package-0", "package-1"}
    assert select(after, HOST_ENERGY, source="model") == {}
    assert total(after, "carbond_counter_wraps_total", device="package-0") == 1
    assert total(after, "carbond_meter_up", meter="rapl") == 1
    assert total(after, "carbond_build_info") == 1


def test_without_rapl_the_model_exports_power_within_one_interval(tmp_path):
    powercap.empty(str(tmp_path))
    started = time.monotonic()
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "1s") as daemon:
        samples = daemon.scrape()
        power = select(samples, "carbond_host_power_watts", source="model", component="cpu")
        elapsed = time.monotonic() - started
    assert power, "no model power series"
    assert elapsed < 10
    assert total(samples, "carbond_meter_up", meter="rapl") == 0


def test_unreadable_zone_counts_errors_and_keeps_serving(tmp_path):
    tree = powercap.intel_two_socket(str(tmp_path))
    tree.zones["intel-rapl:0"].make_unreadable()
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "1s") as daemon:
        daemon.wait_ticks(1)
        tree.zones["intel-rapl:1"].advance_uj(1_000_000)
        samples = daemon.wait_ticks(1)
    assert total(samples, "carbond_meter_errors_total", meter="rapl") >= 2
    assert select(samples, HOST_ENERGY, device="package-1") == {}
    assert total(samples, HOST_ENERGY, device="package-0") == pytest.approx(1.0)


def test_landing_page_links_metrics(tmp_path):
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "1s") as daemon:
        url = f"http://127.0.0.1:{daemon.port}/"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'href="/metrics"' in body


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_within_two_seconds(tmp_path, signum):
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "5s") as daemon:
        daemon.scrape()
        started = time.monotonic()
        daemon.process.send_signal(signum)
        code = daemon.process.wait(timeout=5)
        elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 2.0
    assert "Traceback" not in daemon.process.stderr.read()


def test_port_in_use_is_one_line_exit_2(tmp_path):
    with carbond_run("--powercap-root", str(tmp_path)) as daemon:
        result = subprocess.run(
            [sys.executable, "-m", "carbond", "run", "--listen", f"127.0.0.1:{daemon.port}"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 2
    assert "--listen: cannot listen" in result.stderr and "Traceback" not in result.stderr


def run_check(*args: str, drop_dac: bool = False) -> subprocess.CompletedProcess[str]:
    """With drop_dac, root loses CAP_DAC_OVERRIDE/READ_SEARCH, as an unprivileged agent would."""
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search"] if drop_dac else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "carbond", "check", *args], capture_output=True,
        text=True, timeout=30,
    )


def test_check_lists_zones_and_exits_0(tmp_path):
    powercap.intel_two_socket(str(tmp_path))
    result = run_check("--powercap-root", str(tmp_path), "--state-dir", str(tmp_path))
    assert result.returncode == 0
    assert "meter rapl: up" in result.stdout
    assert "package-1" in result.stdout and "max range 262143328850 uJ" in result.stdout
    assert "mmio duplicate" in result.stdout
    assert f"cgroups: {this_hosts_cgroups()}" in result.stdout
    assert re.search(r"^taskstats: .+", result.stdout, re.M)
    if not os.path.exists("/proc/driver/nvidia/version"):
        assert "nvidia driver: not loaded" in result.stdout
    if not nvml_library_present():
        assert "meter nvml: down" in result.stdout
        assert "libnvidia-ml.so.1 not found" in result.stdout
    assert "intensity zone: " in result.stdout


def this_hosts_cgroups() -> str:
    """What `check` must report here, from the mounts themselves (any host: v2, hybrid, v1)."""
    if os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
        return "v2 (/sys/fs/cgroup)"
    if os.path.isfile("/sys/fs/cgroup/unified/cpu.stat"):
        return "hybrid (/sys/fs/cgroup/unified)"
    return "v1 (/sys/fs/cgroup/"


def nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_check_and_intensity_never_show_the_token(tmp_path):
    token = "secret-token-7d1c0e9b"
    (tmp_path / "em.token").write_text(token)
    (tmp_path / "em.token").chmod(0o600)
    config = tmp_path / "carbond.yaml"
    config.write_text(
        "intensity:\n  zone: DE\n  providers:\n"
        f"    - electricitymaps: {{token_file: {tmp_path / 'em.token'}, url: 'http://127.0.0.1:9'}}\n"
    )
    check = run_check("--config", str(config), "--state-dir", str(tmp_path))
    intensity = subprocess.run(
        [sys.executable, "-m", "carbond", "intensity", "--config", str(config),
         "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
    )
    assert "provider electricitymaps http://127.0.0.1:9 zone DE" in check.stdout
    assert intensity.returncode == 0 and "provider static" in intensity.stdout  # fell back
    for output in (check.stdout, check.stderr, intensity.stdout, intensity.stderr):
        assert token not in output


def test_check_explains_permission_denied_as_non_root():
    nobody = pwd.getpwnam("nobody")
    root = tempfile.mkdtemp(prefix="carbond-powercap-")
    try:
        os.chmod(root, 0o755)
        tree = powercap.intel_two_socket(root)
        for zone in tree.zones.values():  # as the kernel does since 5.10: root-only counters
            energy = os.path.join(zone.path, "energy_uj")
            os.chown(energy, nobody.pw_uid, nobody.pw_gid)
            os.chmod(energy, stat.S_IRUSR)
        result = run_check("--powercap-root", root, "--state-dir", root,
                           "--proc-root", "/nonexistent", drop_dac=True)
    finally:
        subprocess.run(["rm", "-rf", root], check=True)
    assert result.returncode == 1  # no meter works: RAPL denied, model has no /proc
    assert "permission denied" in result.stdout
    assert "CAP_DAC_READ_SEARCH" in result.stdout


def consumer_energy(samples, component: str) -> float:
    return total(samples, "carbond_consumer_energy_joules_total", component=component)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_model_never_adds_to_a_measured_device(tmp_path, mode):
    """Issue 10: with `meters.model.enabled: on` 100 J of RAPL came out as 103 J of consumer
    CPU energy. RAPL measures the package here (no DRAM zone, as on many AMD hosts): CPU energy
    is RAPL's alone; `on` lets the model stand in for the DRAM that nothing measures."""
    tree = powercap.FakePowercap(str(tmp_path / "powercap"))
    package = tree.add("intel-rapl:0", "package-0")
    config = tmp_path / "carbond.yaml"
    config.write_text(f"meters: {{model: {{enabled: {mode}}}}}\n")
    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--state-dir", str(tmp_path / "state"), "--interval", "1s") as daemon:
        before = daemon.wait_ticks(1)
        package.advance_uj(100_000_000)
        after = daemon.wait_ticks(2)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew(HOST_ENERGY, component="cpu") == pytest.approx(100.0, abs=1e-6)
    assert grew(HOST_ENERGY, component="cpu", source="model") == 0.0
    assert consumer_energy(after, "cpu") == pytest.approx(
        total(after, HOST_ENERGY, component="cpu"), rel=1e-9)
    model_dram = select(after, HOST_ENERGY, component="dram", source="model")
    assert consumer_energy(after, "dram") == pytest.approx(sum(model_dram.values()), rel=1e-9)
    in_use = total(after, "carbond_meter_up", meter="model")
    if mode == "on":
        assert model_dram and in_use == 1
    else:
        assert not model_dram and in_use == 0
    assert total(after, "carbond_meter_up", meter="rapl") == 1


def test_model_is_up_when_it_stands_in_for_missing_rapl(tmp_path):
    powercap.empty(str(tmp_path / "powercap"))
    with carbond_run("--powercap-root", str(tmp_path / "powercap"), "--state-dir",
                     str(tmp_path / "state"), "--interval", "1s") as daemon:
        samples = daemon.wait_ticks(2)
    assert total(samples, "carbond_meter_up", meter="model") == 1
    assert total(samples, "carbond_meter_up", meter="rapl") == 0
    model = total(samples, HOST_ENERGY, source="model")
    assert model > 0
    assert total(samples, "carbond_consumer_energy_joules_total") == pytest.approx(model,
                                                                                   rel=1e-9)


def test_counter_reset_is_counted_and_adds_no_spike(tmp_path):
    tree = powercap.FakePowercap(str(tmp_path / "powercap"))
    package = tree.add("intel-rapl:0", "package-0", energy_uj=200_000_000)
    with carbond_run("--powercap-root", str(tmp_path / "powercap"), "--interval", "1s") as daemon:
        before = daemon.wait_ticks(1)
        package.set_uj(40_000_000)  # the zone was re-created: 40 J since
        after = daemon.wait_ticks(2)
    assert total(after, "carbond_counter_resets_total", device="package-0") == 1
    assert total(after, "carbond_counter_wraps_total", device="package-0") == 0
    grew = total(after, HOST_ENERGY, device="package-0") - total(before, HOST_ENERGY,
                                                                  device="package-0")
    assert grew == pytest.approx(40.0, abs=1e-6)


def test_a_counter_that_blocks_never_stalls_ticks_or_shutdown(tmp_path):
    """Issue 14: an `energy_uj` that blocks (a FIFO standing in for a hung driver) stopped
    ticks for good and SIGTERM no longer stopped the daemon."""
    tree = powercap.FakePowercap(str(tmp_path / "powercap"))
    stuck = tree.add("intel-rapl:0", "package-0")
    fine = tree.add("intel-rapl:1", "package-1")
    energy = os.path.join(stuck.path, "energy_uj")
    os.remove(energy)
    os.mkfifo(energy)
    with carbond_run("--powercap-root", str(tmp_path / "powercap"), "--interval", "1s") as daemon:
        before = daemon.wait_ticks(1)
        fine.advance_uj(5_000_000)
        after = daemon.wait_ticks(3)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
    assert total(after, HOST_ENERGY, device="package-1") - total(
        before, HOST_ENERGY, device="package-1") == pytest.approx(5.0)
    assert total(after, "carbond_meter_errors_total", meter="rapl") >= 3


def test_a_cgroup_read_that_blocks_misses_its_deadline_alone(tmp_path):
    """A collector read that blocks (a FIFO where a cgroup's cpu.stat should be): the tick
    goes on without CPU shares (their energy goes to `other`), and shutdown is prompt."""
    root = tmp_path / "cgroups"
    (root / "stuck.service").mkdir(parents=True)
    (root / "cpu.stat").write_text("usage_usec 1000\n")
    os.mkfifo(root / "stuck.service" / "cpu.stat")
    tree = powercap.FakePowercap(str(tmp_path / "powercap"))
    package = tree.add("intel-rapl:0", "package-0")
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {idle_watts: {cpu: 0}, processes: off}\n")
    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--cgroup-root", str(root), "--interval", "2s") as daemon:
        before = daemon.wait_ticks(1, timeout=30)
        package.advance_uj(10_000_000)
        after = daemon.wait_ticks(2, timeout=30)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=5) == 0
        assert time.monotonic() - started < 2.0
    other = total(after, "carbond_consumer_energy_joules_total", consumer="other") - total(
        before, "carbond_consumer_energy_joules_total", consumer="other")
    assert other == pytest.approx(10.0)
    assert "cgroups did not answer" in daemon.process.stderr.read()


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(tmp_path):
    """Issue 14: SIGHUP killed the daemon (status 129)."""
    powercap.FakePowercap(str(tmp_path / "powercap")).add("intel-rapl:0", "package-0")
    config = tmp_path / "carbond.yaml"
    config.write_text("intensity: {providers: [{constant: {grams_per_kwh: 100}}]}\n")

    def intensity(samples) -> float:
        return total(samples, "carbond_grid_intensity_grams_per_kwh")

    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--interval", "1s") as daemon:
        assert intensity(daemon.wait_ticks(1)) == 100.0
        config.write_text("attribution: {processes: on}\n"
                          "intensity: {providers: [{constant: {grams_per_kwh: 200}}]}\n"
                          "budgets: [{name: b, limit: 1kg}]\n")
        daemon.process.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_ticks(2)
        config.write_text("intervall: 5s\n")
        daemon.process.send_signal(signal.SIGHUP)
        kept = daemon.wait_ticks(2)
        assert daemon.process.poll() is None
    log = daemon.process.stderr.read()
    assert intensity(reloaded) == 200.0
    assert total(reloaded, "carbond_budget_limit_grams", budget="b") == 1000.0
    assert "processes changed: takes effect after a restart" in log
    assert intensity(kept) == 200.0
    assert "not reloaded, the old one stays in force" in log and "intervall" in log
    assert "Traceback" not in log
