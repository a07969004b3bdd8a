"""The whole pipeline through the real `carbond run`: real cgroups and burners, a fake RAPL
tree at constant power, a fake Electricity Maps server; everything read back over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.resources import files
from typing import Any

import pytest

from tests.cgroup_helpers import TestTree
from tests.fakes.intensity_server import EM_TOKEN, FakeIntensityServer, iso
from tests.helpers import Carbond, Samples, carbond_run, select, total
from tests.powercap import ConstantPower


def consumer_joules(samples: Samples, name: str, component: str = "cpu") -> float:
    return total(samples, "carbond_consumer_energy_joules_total", consumer=name,
                 component=component)


def test_two_units_at_three_to_one_through_the_daemon(tree: TestTree, tmp_path) -> None:
    """Issue 3, done when: a.service and b.service get dynamic CPU energy in the kernel's
    ratio within 3 %, consumers sum to host energy within 0.1 %, both are kind="unit"."""
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {idle_watts: {cpu: 10}, processes: off}\n")
    for rel, duty in (("system.slice/a.service", 0.3), ("system.slice/b.service", 0.1)):
        tree.make(rel)
        tree.burners.start(duty, tree.procs(rel))
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
        "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
        "--cgroup-root", tree.root, "--state-dir", str(tmp_path / "state"),
        "--interval", "1s",
    ) as daemon:
        first = daemon.wait_ticks(1)
        kernel_first = {n: tree.usage_seconds(f"system.slice/{n}.service") for n in "ab"}
        last = daemon.wait_ticks(5)
        kernel_last = {n: tree.usage_seconds(f"system.slice/{n}.service") for n in "ab"}

    kernel = {n: kernel_last[n] - kernel_first[n] for n in "ab"}
    carbond = {n: consumer_joules(last, f"{n}.service") - consumer_joules(first, f"{n}.service")
               for n in "ab"}
    assert 2.0 < kernel["a"] / kernel["b"] < 4.5  # the burners ran at about 3:1
    assert carbond["a"] / carbond["b"] == pytest.approx(kernel["a"] / kernel["b"], rel=0.03)
    for name in ("a.service", "b.service"):
        assert select(last, "carbond_consumer_energy_joules_total", consumer=name, kind="unit")
    host = total(last, "carbond_host_energy_joules_total")
    consumers = total(last, "carbond_consumer_energy_joules_total")
    assert host > 0
    assert consumers == pytest.approx(host, rel=1e-3)


class LiveEmServer(FakeIntensityServer):
    """Electricity Maps' shape, with `datetime` at the moment of the request, as on the
    5-minute plans, so freshness can be tested in seconds instead of hours."""

    def _answer(self, route: str, mode: str, query: dict[str, str], path: str) -> Any:
        body = super()._answer(route, mode, query, path)
        if route == "em_latest" and isinstance(body, dict) and "datetime" in body:
            body["datetime"] = iso(time.time())
        return body


def intensity(samples: Samples) -> dict[str, Any]:
    rows = select(samples, "carbond_grid_intensity_grams_per_kwh")
    assert len(rows) == 1, rows
    (labels, value), = rows.items()
    return {**dict(labels), "value": value}


def wait_for_provider(daemon: Carbond, provider: str, timeout: float = 20.0) -> Samples:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = daemon.wait_ticks(1)
        if intensity(samples)["provider"] == provider:
            return samples
    raise AssertionError(
        f"provider {provider} never came into use: {intensity(samples)}, fetch errors "
        f"{select(samples, 'carbond_intensity_fetch_errors_total')}"
    )


def static_figure(iso2: str) -> float:
    table = files("carbond.carbon").joinpath("data/grid-intensity-by-country.csv")
    for line in table.read_text().splitlines():
        if line.startswith(f"{iso2},"):
            return float(line.split(",")[3])
    raise LookupError(iso2)


def test_electricitymaps_outage_fallback_and_recovery(tmp_path) -> None:
    """Issue 5, done when: 123 g/kWh for DE is exported and used for emissions (x PUE);
    a 500 outage longer than max_age falls back to static DE, and recovery returns."""
    server = LiveEmServer().start()
    token = tmp_path / "em.token"
    token.write_text(EM_TOKEN + "\n")
    token.chmod(0o600)
    config = tmp_path / "carbond.yaml"
    config.write_text(
        "intensity:\n"
        "  zone: DE\n  refresh: 1s\n  max_age: 4s\n"
        f"  providers:\n    - electricitymaps: {{token_file: {token}, url: '{server.url}'}}\n"
        "pue: 1.25\n"
    )
    env = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    try:
        with ConstantPower(str(tmp_path / "powercap")), carbond_run(
        "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
            "--state-dir", str(tmp_path / "state"), "--interval", "1s", env=env,
        ) as daemon:
            first = wait_for_provider(daemon, "electricitymaps")
            last = daemon.wait_ticks(3)
            assert intensity(last) == {"zone": "DE", "provider": "electricitymaps",
                                       "value": 123.0}
            server.modes["em_latest"] = "500"
            fallback = wait_for_provider(daemon, "static")
            later = daemon.wait_ticks(2)  # metrics keep flowing on the fallback
            server.modes["em_latest"] = "ok"
            recovered = wait_for_provider(daemon, "electricitymaps")
        log = daemon.process.stderr.read()
    finally:
        server.stop()

    def grew(a: Samples, b: Samples, name: str, **labels: str) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    joules = grew(first, last, "carbond_host_energy_joules_total", component="cpu") + grew(
        first, last, "carbond_host_energy_joules_total", component="dram")
    assert joules > 0
    expected_grams = joules / 3.6e6 * 1.25 * 123.0
    assert grew(first, last, "carbond_host_emissions_grams_total") == pytest.approx(
        expected_grams, rel=1e-3)
    assert total(last, "carbond_pue_ratio") == 1.25

    assert intensity(fallback) == {"zone": "DE", "provider": "static",
                                   "value": static_figure("DE")}
    assert grew(last, fallback, "carbond_intensity_fetch_errors_total",
                provider="electricitymaps") > 0
    assert grew(fallback, later, "carbond_host_emissions_grams_total") > 0
    assert intensity(recovered)["value"] == 123.0
    assert EM_TOKEN not in log


def run_intensity(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carbond", "intensity", *args], capture_output=True, text=True,
        timeout=60, env={**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"},
    )


def test_intensity_command_current_and_forecast(tmp_path) -> None:
    server = FakeIntensityServer().start()
    config = tmp_path / "carbond.yaml"
    config.write_text(
        f"intensity:\n  zone: GB\n  providers:\n    - ukgrid: {{url: '{server.url}'}}\n"
    )
    try:
        current = run_intensity("--config", str(config), "--state-dir", str(tmp_path))
        forecast = run_intensity("--config", str(config), "--state-dir", str(tmp_path),
                                 "--forecast")
    finally:
        server.stop()
    assert current.returncode == 0, current.stderr
    assert current.stdout.startswith("180.0 gCO2e/kWh") and "provider ukgrid" in current.stdout
    assert forecast.returncode == 0, forecast.stderr
    assert "lowest-carbon window" in forecast.stdout
    marked = [line for line in forecast.stdout.splitlines() if line.startswith("*")]
    assert marked and all("120" in line for line in marked)


def test_intensity_forecast_unsupported_by_static(tmp_path) -> None:
    result = run_intensity("--zone", "DE", "--state-dir", str(tmp_path), "--forecast")
    assert result.returncode == 1
    assert "no forecast" in result.stderr


def test_zone_label_stays_the_configured_zone_on_fallback(tmp_path) -> None:
    """Issue 11: a fallback from US-CAL-CISO to the static table must not rename the series
    to zone="US"; the zone looked up shows in `carbond intensity` and the log."""
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
        "--powercap-root", str(tmp_path / "powercap"), "--zone", "US-CAL-CISO",
        "--interval", "1s",
    ) as daemon:
        samples = daemon.wait_ticks(1)
    found = intensity(samples)
    assert found["zone"] == "US-CAL-CISO" and found["provider"] == "static"
    assert found["value"] == static_figure("US")
    assert "answers for zone US-CAL-CISO with the figure of US" in daemon.process.stderr.read()
    current = run_intensity("--zone", "US-CAL-CISO", "--state-dir", str(tmp_path / "cli"))
    assert current.returncode == 0, current.stderr
    assert "zone US-CAL-CISO (as US)" in current.stdout
