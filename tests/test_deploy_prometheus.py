"""deploy/prometheus: the rules pass `promtool check rules` and their unit tests, every alert
is unit-tested firing and not firing, and the recording rules follow level:metric:operations
(issue 13, item 3). The rules against live carbond instances: tests/test_deploy_fleet.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy_helpers import PROMETHEUS, rules

TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool missing (scripts/test-deps.sh installs the prometheus package)")
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True)


def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml", "recording.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 15 rules found" in result.stdout
    assert "SUCCESS: 12 rules found" in result.stdout


def test_promtool_unit_tests_pass():
    assert [path.name for path in TESTS] == ["alerts_test.yml", "recording_test.yml"]
    result = promtool("test", "rules", *(str(path) for path in TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The unit tests bite: with one alert's threshold moved they fail."""
    broken = (PROMETHEUS / "alerts.yml").read_text().replace(
        "time() - carbond_last_tick_timestamp_seconds > 300",
        "time() - carbond_last_tick_timestamp_seconds > 600")
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "tests").mkdir()
    shutil.copy(PROMETHEUS / "tests" / "alerts_test.yml", tmp_path / "tests")
    result = promtool("test", "rules", str(tmp_path / "tests" / "alerts_test.yml"))
    assert result.returncode != 0 and "CarbondTicksStale" in result.stdout + result.stderr


def test_example_scrape_config_is_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    alerts = {rule["alert"] for rule in rules(PROMETHEUS / "alerts.yml")}
    assert alerts >= {"CarbondBudgetExceeded", "CarbondBudgetProjectedToExceed",
                      "CarbondIntensityStale", "CarbondIntensityFallback", "CarbondMeterDown",
                      "CarbondTicksFailing", "CarbondTicksStale", "CarbondAbsent"}
    cases = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == alerts and quiet == alerts
    for rule in rules(PROMETHEUS / "alerts.yml"):
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])


LEVEL_METRIC_OPERATIONS = re.compile(r"^[a-z_]+:carbond_[a-z_]+:[a-z0-9_]+$")
OUTER_BY = re.compile(r"^\s*\w+ by \(([^)]*)\)")


def test_recording_rules_are_named_level_metric_operations_and_all_tested():
    recording = rules(PROMETHEUS / "recording.yml")
    for rule in recording:
        name, expr = rule["record"], rule["expr"]
        assert LEVEL_METRIC_OPERATIONS.match(name), name
        level, metric, operations = name.split(":")
        assert not metric.endswith("_total"), name  # a rated counter loses _total
        kept = {label.strip() for label in OUTER_BY.match(expr).group(1).split(",")}
        assert set(level.split("_")) <= kept <= set(level.split("_")) | {"job"}, name
        if operations.startswith("rate"):
            window = operations.removeprefix("rate")
            assert f"[{window}]" in expr or f":rate{window}" in expr, name
    tested = {test["expr"] for case in yaml.safe_load(
        (PROMETHEUS / "tests" / "recording_test.yml").read_text())["tests"]
        for test in case["promql_expr_test"]}
    assert tested == {rule["record"] for rule in recording}
