"""The ledger wired into the real `carbond run`: counters continue across restarts, a crash
loses at most one flush interval, reports equal the counters, budgets warn, one daemon per
state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cgroup_helpers import TestTree
from tests.helpers import Samples, carbond_run, free_port, select, total
from tests.powercap import ConstantPower

CONSUMER = "carbond_consumer_energy_joules_total"


def totals(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {key: value for key, value in samples.items()
            if key[0].startswith("carbond_") and key[0].endswith("_total")}


def run_args(tmp_path, *extra: str) -> list[str]:
    return ["--powercap-root", str(tmp_path / "powercap"), "--state-dir",
            str(tmp_path / "state"), "--zone", "DE", *extra]


def report(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carbond", "report", "--state-dir", str(tmp_path / "state"),
         *args], capture_output=True, text=True, timeout=60)


def busy_config(tmp_path, extra: str = "") -> str:
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {idle_watts: {cpu: 0}}\nledger: {flush: 1s}\n"
                      "intensity: {providers: [{constant: {grams_per_kwh: 1000}}]}\n" + extra)
    return str(config)


def test_counters_continue_after_sigterm_and_report_equals_them(tree: TestTree,
                                                                 tmp_path) -> None:
    tree.make("job")
    tree.burners.start(0.5, tree.procs("job"))
    args = run_args(tmp_path, "--config", busy_config(tmp_path), "--interval", "3s",
                    "--cgroup-root", tree.root)
    with ConstantPower(str(tmp_path / "powercap")):
        with carbond_run(*args) as daemon:
            last = daemon.wait_ticks(3)
            daemon.process.send_signal(signal.SIGTERM)  # right after a tick: no other one
            assert daemon.process.wait(timeout=10) == 0
        with carbond_run(*args) as daemon:
            first = daemon.scrape()

    before = totals(last)
    after = totals(first)
    assert before
    for key, value in before.items():
        if key in after:  # a series present in both continues at or above its last value
            assert after[key] >= value - 1e-9 * max(1.0, value), key
    assert total(first, CONSUMER, consumer="job") >= total(last, CONSUMER, consumer="job") > 0

    result = report(tmp_path, "--since", "1d", "--by", "consumer", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["consumer"]: row for row in json.loads(result.stdout)["rows"]}
    # The report covers both runs: up to the second run's first tick, which `first` shows.
    # (idle is 0 J here, idle_watts being 0: a consumer with nothing booked has no row)
    for consumer in ("job", "idle"):
        row = rows.get(consumer, {"joules": 0.0, "grams": 0.0})
        exported = total(first, CONSUMER, consumer=consumer)
        assert row["joules"] == pytest.approx(exported, rel=0.005, abs=1e-9), consumer
        grams = total(first, "carbond_consumer_emissions_grams_total", consumer=consumer)
        assert row["grams"] == pytest.approx(grams, rel=0.005, abs=1e-9), consumer


def test_kill_9_loses_at_most_one_flush_interval(tmp_path) -> None:
    args = run_args(tmp_path, "--config", busy_config(tmp_path), "--interval", "1s")
    with ConstantPower(str(tmp_path / "powercap"), package_watts=100.0):
        with carbond_run(*args) as daemon:
            last = daemon.wait_ticks(4)
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(timeout=10)
        with carbond_run(*args) as daemon:
            first = daemon.scrape()
    exported = total(last, CONSUMER)
    restored = total(first, CONSUMER)
    # at most one flush (1 s) plus the tick in flight is missing: 2 s of 105 W
    assert restored >= exported - 2 * 105.0 - 1.0
    assert restored > 0


def test_a_tiny_budget_on_a_busy_consumer_is_over_and_projected_over(tree: TestTree,
                                                                    tmp_path) -> None:
    tree.make("job")
    tree.burners.start(1.0, tree.procs("job"))
    budget = "budgets: [{name: tiny, match: {consumer: 'jo*'}, period: day, limit: 1g}]\n"
    args = run_args(tmp_path, "--config", busy_config(tmp_path, budget), "--interval", "1s",
                    "--cgroup-root", tree.root)
    with ConstantPower(str(tmp_path / "powercap"), package_watts=2000.0), carbond_run(
            *args) as daemon:
        samples = daemon.wait_ticks(4)
    limit = total(samples, "carbond_budget_limit_grams", budget="tiny")
    used = total(samples, "carbond_budget_used_grams", budget="tiny")
    projected = total(samples, "carbond_budget_projected_grams", budget="tiny")
    assert limit == 1.0
    assert used > limit
    assert projected > limit and projected >= used
    assert used == pytest.approx(total(samples, "carbond_consumer_emissions_grams_total",
                                       consumer="job"), rel=0.05)


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path) -> None:
    args = run_args(tmp_path, "--interval", "1s")
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(*args):
        second = subprocess.run([sys.executable, "-m", "carbond", "run", "--listen",
                                 f"127.0.0.1:{free_port()}", *args], capture_output=True,
                                text=True, timeout=30)
    assert second.returncode == 2
    assert "--state-dir" in second.stderr and str(tmp_path / "state") in second.stderr
    assert "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1


def test_embodied_emissions_are_shared_and_kept_apart(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("embodied: {kgco2e: 1000, lifetime: 1y}\n")
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
            *run_args(tmp_path, "--config", str(config), "--interval", "1s")) as daemon:
        first = daemon.wait_ticks(1)
        last = daemon.wait_ticks(3)
    grew = (total(last, "carbond_consumer_embodied_grams_total")
            - total(first, "carbond_consumer_embodied_grams_total"))
    per_second = 1000 * 1000 / (365.25 * 86400)
    assert grew == pytest.approx(3 * per_second, rel=0.5)  # three ticks of about a second
    assert select(last, "carbond_consumer_embodied_grams_total", consumer="idle")
    assert os.path.exists(tmp_path / "state" / "ledger.db")
