"""What /metrics and the JSON API say about a snapshot, scraped over a real socket."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from carbond.exporter.documents import budgets_document, consumers_document
from carbond.exporter.series import SeriesSample
from carbond.exporter.snapshot import BudgetSample
from carbond.types import Consumer, name_text
from tests.snapshots import HOSTILE, make_snapshot
from tests.web_helpers import get, serving

DEVICE = {"component", "device", "source"}
CONSUMER = {"consumer", "kind", "component"}
# DESIGN.md's metric table: family name (without _total) -> (type, label names).
TABLE = {
    "carbond_host_energy_joules": ("counter", DEVICE),
    "carbond_host_power_watts": ("gauge", DEVICE),
    "carbond_host_emissions_grams": ("counter", set()),
    "carbond_consumer_energy_joules": ("counter", CONSUMER),
    "carbond_consumer_power_watts": ("gauge", CONSUMER),
    "carbond_consumer_emissions_grams": ("counter", {"consumer", "kind"}),
    "carbond_grid_intensity_grams_per_kwh": ("gauge", {"zone", "provider"}),
    "carbond_grid_intensity_age_seconds": ("gauge", {"zone", "provider"}),
    "carbond_intensity_fetch_errors": ("counter", {"provider"}),
    "carbond_pue_ratio": ("gauge", set()),
    "carbond_budget_limit_grams": ("gauge", {"budget"}),
    "carbond_budget_used_grams": ("gauge", {"budget"}),
    "carbond_budget_projected_grams": ("gauge", {"budget"}),
    "carbond_gpu_info": ("gauge", {"device", "uuid", "name"}),
    "carbond_meter_up": ("gauge", {"meter"}),
    "carbond_meter_errors": ("counter", {"meter"}),
    "carbond_counter_wraps": ("counter", {"device"}),
    "carbond_counter_resets": ("counter", {"device"}),
    "carbond_exited_tasks": ("counter", set()),
    "carbond_exit_records_lost": ("counter", set()),
    "carbond_tick_duration_seconds": ("histogram", set()),
    "carbond_tick_failures": ("counter", set()),
    "carbond_last_tick_timestamp_seconds": ("gauge", set()),
    "carbond_consumer_embodied_grams": ("counter", {"consumer", "kind"}),
    "carbond_ledger_errors": ("counter", set()),
    "carbond_build_info": ("gauge", {"version"}),
}
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    found = [
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == name and s.labels == labels
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture(scope="module")
def server():
    with serving() as (running, published):
        yield running, published


def scrape_text(server, **headers: str) -> str:
    running, _ = server
    reply = get(running.port, headers=headers)
    assert reply.status == 200
    return reply.body.decode("utf-8")


def test_every_metric_of_the_table_with_its_type_and_labels(server):
    found = families(scrape_text(server))
    for name, (kind, labels) in TABLE.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)


def test_new_snapshot_fields_are_rendered_with_their_values(server):
    _, published = server
    published.snapshot = make_snapshot(3, tick=4)
    text = scrape_text(server)
    worker = {"consumer": "worker-0001.service", "kind": "unit"}
    assert value(text, "carbond_consumer_embodied_grams_total", **worker) == pytest.approx(0.08)
    assert value(text, "carbond_budget_limit_grams", budget="research") == 250_000.0
    assert value(text, "carbond_budget_used_grams", budget="research") == 4_000.0
    assert value(text, "carbond_budget_projected_grams", budget="team-a") == 70.0
    assert value(text, "carbond_counter_resets_total", device="gpu-0") == 2
    assert value(text, "carbond_exit_records_lost_total") == 5
    assert value(text, "carbond_tick_failures_total") == 1
    assert value(text, "carbond_last_tick_timestamp_seconds") == 1_700_000_104.0
    assert value(text, "carbond_ledger_errors_total") == 6


def test_process_and_platform_collectors_are_registered(server):
    found = families(scrape_text(server))
    assert found["process_cpu_seconds"].type == "counter"
    assert found["process_resident_memory_bytes"].samples[0].value > 0
    assert found["python_info"].samples[0].labels["implementation"]


def test_a_name_that_is_not_utf8_is_escaped_visibly_and_the_scrape_parses(server):
    _, published = server
    published.snapshot = make_snapshot(3, tick=2)
    first = scrape_text(server)
    text = scrape_text(server, **{"Accept": OPENMETRICS})
    labels = {"consumer": "bad\\xff.service", "kind": "unit"}
    assert value(first, "carbond_consumer_emissions_grams_total", **labels) > 0
    assert "\ufffd" not in first
    names = {s.labels.get("consumer") for f in openmetrics_families(text) for s in f.samples}
    assert "bad\\xff.service" in names
    published.snapshot = make_snapshot(3, tick=3)  # stable across ticks
    assert value(scrape_text(server), "carbond_consumer_emissions_grams_total", **labels) > 0


def promtool_check_metrics(body: str) -> tuple[int, list[str]]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing (scripts/test-deps.sh installs the prometheus package)")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).splitlines()


# DESIGN.md names these two (the hardware's energy counter wrapped or was reset); promtool's
# lint reads "counter" as the Prometheus type in the name. The names are the contract.
CONTRACT_ADVICE = {f"{name} metric name should not include type 'counter'"
                   for name in ("carbond_counter_wraps_total", "carbond_counter_resets_total")}


def test_promtool_check_metrics_is_clean_on_the_text_exposition(server):
    """Every family, hostile label values and the process collector included: no parse error
    (exit 1), and no lint advice (exit 3) beyond the two contract names."""
    _, published = server
    published.snapshot = make_snapshot(3, tick=2)
    body = scrape_text(server)
    assert "process_cpu_seconds_total" in body and 'consumer="bad\\\\xff.service"' in body
    returncode, lines = promtool_check_metrics(body)
    assert set(lines) == CONTRACT_ADVICE and returncode == 3, lines
    # No device with a counter (so no wraps or resets series, not even at 0): no advice.
    quiet = make_snapshot(3, tick=2)
    published.snapshot = dataclasses.replace(quiet, counter_wraps_total={},
                                             counter_resets_total={}, devices=())
    assert promtool_check_metrics(scrape_text(server)) == (0, [])


def test_promtool_check_metrics_on_openmetrics_finds_only_its_own_text_format_reading(server):
    """promtool reads the 0.0.4 text format only. OpenMetrics puts a counter's HELP on the
    family name (`x`) and its sample on `x_total`, which promtool then reports as "no help
    text"; that is the one complaint allowed, and only for counters whose HELP is there.
    prometheus_client's strict OpenMetrics parser must accept the whole body."""
    _, published = server
    published.snapshot = make_snapshot(3, tick=2)
    body = scrape_text(server, Accept=OPENMETRICS)
    assert body.endswith("# EOF\n") and "process_cpu_seconds_total" in body
    families_found = {f.name: f for f in openmetrics_families(body)}
    assert "carbond_consumer_energy_joules" in families_found
    returncode, lines = promtool_check_metrics(body)
    assert returncode in (0, 3), lines
    for line in lines:
        if line in CONTRACT_ADVICE:
            continue
        name, _, complaint = line.partition(" ")
        family = name.removesuffix("_total")
        assert complaint == "no help text" and name.endswith("_total"), line
        assert families_found[family].type == "counter", line
        assert f"# HELP {family} " in body, line


names = st.one_of(
    st.binary(max_size=40).map(os.fsdecode),
    st.text(st.characters(exclude_categories=()), max_size=40),
)


@given(name=names)
def test_label_text_always_encodes_and_matches_backslashreplace(name):
    escaped = name_text(name)
    escaped.encode("utf-8")
    assert name_text(name) == escaped
    assert name_text(escaped) == escaped
    raw = os.fsencode(name) if _is_fs_name(name) else None
    if raw is not None:
        assert escaped == raw.decode("utf-8", "backslashreplace")


def _is_fs_name(name: str) -> bool:
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=40, deadline=None)
@given(name=names, kind=names)
def test_any_consumer_name_gives_a_parseable_scrape(server, name, kind):
    _, published = server
    consumer = Consumer(kind, name)
    base = make_snapshot(0)
    published.snapshot = dataclasses.replace(
        base,
        consumer_grams_total=((consumer, 1.5),),
        consumer_embodied_grams_total=((consumer, 0.5),),
    )
    text = scrape_text(server)
    assert value(text, "carbond_consumer_emissions_grams_total",
                 consumer=name_text(name), kind=name_text(kind)) == 1.5
    om = scrape_text(server, Accept=OPENMETRICS)
    assert any(f.name == "carbond_consumer_embodied_grams" for f in openmetrics_families(om))


def test_cached_body_is_reused_within_a_tick_and_replaced_by_the_next(server):
    _, published = server
    published.snapshot = make_snapshot(3, tick=5)
    one, two = scrape_text(server), scrape_text(server)
    carbond_lines = [line for line in one.splitlines() if "carbond_" in line]
    assert carbond_lines == [line for line in two.splitlines() if "carbond_" in line]
    published.snapshot = make_snapshot(3, tick=6)
    assert value(scrape_text(server), "carbond_host_emissions_grams_total") == 45.0


def test_openmetrics_is_negotiated_and_ends_with_one_eof(server):
    running, _ = server
    reply = get(running.port, headers={"Accept": OPENMETRICS})
    assert reply.header("Content-Type").startswith("application/openmetrics-text")
    text = reply.body.decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    found = {f.name: f for f in openmetrics_families(text)}
    assert found["carbond_tick_duration_seconds"].type == "histogram"
    assert "process_cpu_seconds" in found


def test_a_garbled_accept_header_falls_back_to_text(server):
    running, _ = server
    for accept in ("application/openmetrics-text; version=x.y.z", "text/plain; version=1.0.0z",
                   "application/openmetrics-text; version=\x01"):
        reply = get(running.port, headers={"Accept": accept})
        assert reply.status == 200, accept
        assert families(reply.body.decode())["carbond_pue_ratio"]


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_gzip_body_is_the_same_exposition(server, accept):
    running, published = server
    published.snapshot = make_snapshot(50, tick=7)
    headers = {"Accept": accept, "Accept-Encoding": "gzip"}
    for _ in range(2):  # the first builds the cached stream, the second reuses it
        reply = get(running.port, headers=headers)
        assert reply.header("Content-Encoding") == "gzip"
        zipped = gzip.decompress(reply.body).decode()
        plain = get(running.port, headers={"Accept": accept}).body.decode()
        strip = [line for line in plain.splitlines() if not line.startswith("process_")]
        assert [line for line in zipped.splitlines() if not line.startswith("process_")] == strip


def consumers_api(server) -> dict:
    running, _ = server
    reply = get(running.port, "/api/v1/consumers")
    assert reply.status == 200
    assert reply.header("Content-Type") == "application/json"
    return json.loads(reply.body, parse_constant=_no_constants)


def _no_constants(name: str) -> None:
    raise AssertionError(f"not JSON: {name}")


def test_consumers_api_lists_every_consumer_with_power_energy_and_grams(server):
    _, published = server
    published.snapshot = snap = make_snapshot(3, tick=2)
    document = consumers_api(server)
    assert document["version"] == 1
    assert document["timestamp"] == snap.last_tick_timestamp_seconds
    assert document["intensity"] == {"grams_per_kwh": 380.0, "zone": "DE",
                                     "provider": "static", "age_seconds": 12.0,
                                     "marginal": False}
    assert document["host"]["watts"]["total"] == pytest.approx(166.0)
    by_name = {(c["kind"], c["name"]): c for c in document["consumers"]}
    assert set(by_name) == {(c.kind, name_text(c.name)) for c, _ in snap.consumer_grams_total}
    worker = by_name[("unit", "worker-0002.service")]
    assert worker["watts"] == {"cpu": 1.5, "dram": 2.5, "gpu": 3.5, "total": 7.5}
    assert worker["joules"]["cpu"] == 60.0
    assert worker["emissions_grams"] == pytest.approx(0.6)
    assert worker["embodied_grams"] == pytest.approx(0.06)
    assert ("unit", "bad\\xff.service") in by_name
    totals = [c["watts"]["total"] for c in document["consumers"]]
    assert totals == sorted(totals, reverse=True)


def test_api_never_emits_nan(server):
    _, published = server
    published.snapshot = dataclasses.replace(
        make_snapshot(1), host_grams_total=math.nan,
        budgets=(BudgetSample("x", math.inf, 1.0, math.nan, 0.0, 1.0),),
    )
    assert consumers_api(server)["host"]["emissions_grams"] is None
    running, _ = server
    budget = json.loads(get(running.port, "/api/v1/budgets").body,
                        parse_constant=_no_constants)["budgets"][0]
    assert budget["limit_grams"] is None and budget["projected_grams"] is None


def test_budgets_api(server):
    running, published = server
    published.snapshot = make_snapshot(1, tick=3)
    reply = get(running.port, "/api/v1/budgets", headers={"Accept-Encoding": "gzip"})
    document = json.loads(gzip.decompress(reply.body))
    assert document["version"] == 1
    assert [b["name"] for b in document["budgets"]] == ["research", "team-a"]
    research = document["budgets"][0]
    assert research["limit_grams"] == 250_000.0
    assert research["used_grams"] == 3_000.0
    assert research["projected_grams"] == 9_000.0
    assert research["period_start_time"] == "2023-11-01T00:00:00Z"


def test_before_the_first_tick_the_api_says_null_not_1970(server):
    _, published = server
    published.snapshot = dataclasses.replace(make_snapshot(0), last_tick_timestamp_seconds=0.0)
    document = consumers_api(server)
    assert document["timestamp"] is None and document["time"] is None


def test_landing_page_links_every_endpoint(server):
    running, _ = server
    body = get(running.port, "/").body.decode()
    for link in ("/metrics", "/api/v1/consumers", "/api/v1/budgets"):
        assert f'href="{link}"' in body


def test_hostile_consumer_in_api(server):
    _, published = server
    published.snapshot = dataclasses.replace(
        make_snapshot(0), consumers=(), consumer_grams_total=((HOSTILE, 2.0),),
        consumer_embodied_grams_total=())
    names = [c["name"] for c in consumers_api(server)["consumers"]]
    assert names == ["bad\\xff.service"]


def _doc_example(section: str) -> dict:
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "http.md")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    after = text.split(f"## `{section}`", 1)[1]
    block = after.split("```json\n", 1)[1].split("```", 1)[0]
    return json.loads(block)


def test_docs_examples_have_the_fields_the_api_serves(server):
    running, published = server
    published.snapshot = make_snapshot(2)
    consumers = consumers_api(server)
    example = _doc_example("/api/v1/consumers")
    assert set(example) == set(consumers)
    assert set(example["intensity"]) == set(consumers["intensity"])
    assert set(example["host"]) == set(consumers["host"])
    assert set(example["host"]["devices"][0]) == set(consumers["host"]["devices"][0])
    assert set(example["consumers"][0]) == set(consumers["consumers"][0])
    budgets = json.loads(get(running.port, "/api/v1/budgets").body)
    example = _doc_example("/api/v1/budgets")
    assert set(example) == set(budgets)
    assert set(example["budgets"][0]) == set(budgets["budgets"][0])


odd_floats = st.floats(allow_nan=True, allow_infinity=True)


@given(watts=st.lists(odd_floats, min_size=3, max_size=3), grams=odd_floats)
def test_api_documents_are_valid_json_whatever_the_numbers(watts, grams):
    consumer = Consumer("unit", "a.service")
    snap = dataclasses.replace(
        make_snapshot(0),
        consumers=tuple(SeriesSample(consumer, component, w, w)
                        for component, w in zip(("cpu", "dram", "gpu"), watts, strict=True)),
        consumer_grams_total=((consumer, grams),),
        budgets=(BudgetSample("b", grams, grams, grams, grams, grams),),
    )
    for document in (consumers_document(snap), budgets_document(snap)):
        json.loads(json.dumps(document, allow_nan=False))
