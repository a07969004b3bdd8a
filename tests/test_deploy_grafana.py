"""deploy/grafana: the committed dashboards are what the generator makes, and each is built
for a shared Grafana (issue 13, item 2). That every query returns data from a real Prometheus
is tests/test_deploy_fleet.py."""

from __future__ import annotations

import re

import pytest

from tests.deploy_helpers import (
    DESIGN_METRICS,
    GRAFANA,
    PROMETHEUS,
    dashboards,
    generator,
    panel_queries,
    panels,
    rules,
    variable_query,
    variables,
)

EXPECTED = {"carbond-fleet.json", "carbond-host.json", "carbond-budgets.json",
            "carbond-projects.json"}


def test_committed_json_is_what_the_generator_produces():
    module = generator()
    assert set(module.DASHBOARDS) == EXPECTED == set(dashboards())
    for name, build in module.DASHBOARDS.items():
        assert (GRAFANA / name).read_text() == module.render(build), (
            f"{name} is stale: run `make dashboards`")


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    module = generator()
    assert module.main(["--out", str(tmp_path)]) == 0
    assert module.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "carbond-host.json").write_text("{}\n")
    assert module.main(["--check", "--out", str(tmp_path)]) == 1
    assert "carbond-host.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dashboard_is_portable_and_filterable(name):
    board = dashboards()[name]
    assert board["uid"] == name.removesuffix(".json")
    variables_ = variables(board)
    assert variables_["datasource"]["type"] == "datasource"
    assert variables_["datasource"]["query"] == "prometheus"
    for required in ("zone", "instance"):
        assert variables_[required]["type"] == "query"
    if name != "carbond-budgets.json":
        assert "kind" in variables_
    for variable in variables_.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"
            variable_query(variable)  # a label_values() Grafana can run
    # The zone narrows the instances.
    assert '{zone=~"$zone"}' in variable_query(variables_["instance"])[0]

    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    queries = panel_queries(name, board)
    assert queries
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)) and all(ref_ids)
    for query in queries:
        assert "$instance" in query.expr or query.expr.startswith(("zone:", "kind:")), query
    assert "annotations" in board and board["annotations"]["list"] == []


def test_every_design_metric_is_on_a_dashboard_or_in_a_rule():
    text = " ".join(q.expr for name, board in dashboards().items()
                    for q in panel_queries(name, board))
    text += " ".join(rule["expr"] for path in PROMETHEUS.glob("*.yml")
                     if path.name != "prometheus.yml" for rule in rules(path))
    missing = [m for m in DESIGN_METRICS if not re.search(rf"\b{m}", text)]
    assert missing == []


def test_host_dashboard_shows_carbonds_own_cost():
    exprs = [q.expr for q in panel_queries("host", dashboards()["carbond-host.json"])]
    assert any("process_cpu_seconds_total" in e for e in exprs)
    assert any("process_resident_memory_bytes" in e for e in exprs)
