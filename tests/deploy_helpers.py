"""The committed Grafana dashboards and Prometheus rules, read the way Grafana and Prometheus
read them, for tests/test_deploy_*.py."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"

# Every metric of DESIGN.md's table (the contract); process_* are prometheus-client's.
DESIGN_METRICS = (
    "carbond_host_energy_joules_total", "carbond_host_power_watts",
    "carbond_host_emissions_grams_total", "carbond_consumer_energy_joules_total",
    "carbond_consumer_power_watts", "carbond_consumer_emissions_grams_total",
    "carbond_grid_intensity_grams_per_kwh", "carbond_grid_intensity_age_seconds",
    "carbond_intensity_fetch_errors_total", "carbond_pue_ratio", "carbond_budget_limit_grams",
    "carbond_budget_used_grams", "carbond_budget_projected_grams", "carbond_gpu_info",
    "carbond_meter_up", "carbond_meter_errors_total", "carbond_counter_wraps_total",
    "carbond_counter_resets_total", "carbond_exited_tasks_total",
    "carbond_exit_records_lost_total", "carbond_tick_duration_seconds",
    "carbond_tick_failures_total", "carbond_last_tick_timestamp_seconds",
    "carbond_consumer_embodied_grams_total", "carbond_ledger_errors_total",
    "carbond_build_info", "carbond_host_coverage_ratio", "carbond_consumer_info",
    "carbond_metadata_errors_total",
)


def generator() -> ModuleType:
    """deploy/grafana/dashboards.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("carbond_dashboards", GRAFANA / "dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))}


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool


def panel_queries(name: str, dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    return [PanelQuery(name, panel["title"], target["refId"], target["expr"],
                       bool(target.get("instant")))
            for panel in panels(dashboard) for target in panel.get("targets", [])]


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def variable_query(variable: Mapping[str, Any]) -> tuple[str, str]:
    """A query variable's `label_values(selector, label)` as (selector, label)."""
    definition = variable["query"]
    text = definition["query"] if isinstance(definition, dict) else definition
    match = LABEL_VALUES.match(text.strip())
    assert match, text
    return match.group("selector") or "", match.group("label")


def prometheus_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to each value of a multi-value variable
    before joining them into (a|b): regex-escape, then escape backslashes for the string."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr: str, values: Mapping[str, list[str]], multi: Mapping[str, bool],
               all_values: Mapping[str, str | None], *, interval: str, rate_interval: str,
               range_: str) -> str:
    """Grafana's interpolation of one query: variables with every option selected ("All"),
    and the built-in intervals."""
    def value_of(name: str) -> str:
        options = values[name]
        if multi[name]:
            custom = all_values.get(name)
            if custom is not None:
                return custom
            escaped = [prometheus_regex_escape(v) for v in options]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        assert len(options) == 1, (name, options)
        return options[0]

    expr = (expr.replace("$__rate_interval", rate_interval)
            .replace("$__interval", interval).replace("$__range", range_))
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", value_of(name)).replace("$" + name, value_of(name))
    assert "$" not in expr, expr
    return expr


def rule_groups(path: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(path.read_text())["groups"]


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(path) for rule in group["rules"]]
