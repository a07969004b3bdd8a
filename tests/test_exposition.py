"""carbond.exporter.exposition writes what prometheus_client's encoders write, byte for byte.

The reference is always the encoder choose_encoder picks for an Accept header; the fast one
must produce the same bytes, for carbond's own families without ever falling back.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.metrics_core import METRIC_TYPES
from prometheus_client.samples import Exemplar, Sample, Timestamp

from carbond.carbon.intensity import Intensity
from carbond.exporter import app as exporter
from carbond.exporter.app import MetricsApp
from carbond.exporter.collectors import snapshot_families
from carbond.exporter.exposition import (
    ALLOW_UTF8,
    DOTS,
    UNDERSCORES,
    VALUES,
    FastEncoder,
    agrees_with_prometheus_client,
    fast_encoder,
    format_of,
)
from carbond.exporter.series import SeriesSample
from carbond.exporter.snapshot import BudgetSample, DeviceSeries, GpuLabel, Snapshot
from carbond.types import Consumer
from carbond.web.server import Request
from tests.snapshots import HOSTILE, make_snapshot

ESCAPINGS = (ALLOW_UTF8, UNDERSCORES, DOTS, VALUES)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# Accept headers as scrapers (and odd clients) send them; each picks one reference encoder.
ACCEPTS = (
    "",
    "*/*",
    "text/plain; version=0.0.4",
    "application/openmetrics-text",
    OPENMETRICS,
    "application/openmetrics-text; version=2.0.0; charset=utf-8",
    "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "text/plain; version=1.0.0; escaping=bogus",
    *(f"application/openmetrics-text; version=1.0.0; escaping={e}" for e in ESCAPINGS),
    *(f"text/plain; version=1.0.0; escaping={e}" for e in ESCAPINGS),
)
# Label values carbond can be handed: every one goes through name_text first.
NASTY = ("", "\\", "\\n", "a\\b", 'say "hi"', '"', "two\nlines", "\n", "\r\n", "tab\tx",
         "bad\udcff.service", "\udc80", "\ud800x", "\u00e9t\u00e9 \u2603", "} # EOF",
         '{x="y"}', " ", "\x00", "trailing\\", "\U0001f525")
AWKWARD = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e300, 5e-324, 12345678.9, 1e6, 1234567.0,
           0.1 + 0.2, 2.5e-7, -1e21)


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Families collected once, so two encoders see the very same objects."""

    metrics: tuple[Metric, ...]

    def collect(self) -> tuple[Metric, ...]:
        return self.metrics


def carbond_families(snap: Snapshot) -> Fixed:
    """What MetricsApp encodes per snapshot, plus the process metrics it adds per scrape."""
    return Fixed((*snapshot_families(snap), *PlatformCollector(registry=None).collect(),
                  *ProcessCollector(registry=None).collect()))


def refuse(collector: Fixed) -> bytes:
    raise AssertionError(f"fell back to prometheus_client for {list(collector.collect())}")


def strict(accept: str) -> tuple[FastEncoder, object]:
    """The fast encoder for `accept`, made unable to fall back, and the reference."""
    reference = choose_encoder(accept)[0]
    fast = fast_encoder(reference)
    assert isinstance(fast, FastEncoder), accept
    return FastEncoder(fast.format, refuse), reference


def test_the_installed_prometheus_client_agrees():
    """Else MetricsApp would quietly serve every body through prometheus_client."""
    assert agrees_with_prometheus_client()


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize(("count", "tick"), [(0, 1), (1, 2), (3, 4), (50, 7)])
def test_snapshot_bodies_equal_prometheus_client(accept, count, tick):
    families = carbond_families(make_snapshot(count, tick))
    fast, reference = strict(accept)
    assert fast(families) == reference(families)


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_a_500_consumer_body_equals_prometheus_client(accept):
    families = carbond_families(make_snapshot(500, tick=2))
    fast, reference = strict(accept)
    assert fast(families) == reference(families)


def hostile_snapshot() -> Snapshot:
    """Every label carbond writes set to something awkward, every value it can carry too."""
    base = make_snapshot(3, tick=5)
    people = [*(Consumer(kind, name) for kind, name in zip(NASTY[::-1], NASTY, strict=True)),
              HOSTILE]
    values = [AWKWARD[i % len(AWKWARD)] for i in range(len(people) * 3)]
    return dataclasses.replace(
        base,
        devices=tuple(DeviceSeries(a, b, c, v, -v) for a, b, c, v in
                      zip(NASTY, NASTY[1:], NASTY[2:], AWKWARD, strict=False)),
        meters_up={name: bool(i % 2) for i, name in enumerate(NASTY)},
        meter_errors_total={name: AWKWARD[i % len(AWKWARD)] for i, name in enumerate(NASTY)},
        counter_wraps_total={name: 2**64 + i for i, name in enumerate(NASTY)},
        counter_resets_total={name: i for i, name in enumerate(NASTY)},
        tick_buckets=(("0.005", 1), ("1e-05", 2), ("NaN", 3), ("+Inf", 4)),
        tick_seconds_sum=math.nan,
        consumers=tuple(SeriesSample(c, component, joules_total=values[i * 3 + j],
                                     watts=-values[i * 3 + j])
                        for i, c in enumerate(people)
                        for j, component in enumerate(("cpu", *NASTY[:2]))),
        consumer_grams_total=tuple(zip(people, values[::-3], strict=True)),
        consumer_embodied_grams_total=tuple(zip(people, values[::3], strict=True)),
        host_grams_total=math.inf,
        intensity=Intensity(grams_per_kwh=math.nan, zone='z"\n\\', provider="\udcfe",
                            observed_at=0.0, fetched_at=0.0),
        zone="",
        intensity_age_seconds=-math.inf,
        intensity_fetch_errors_total={name: 1.5 for name in NASTY},
        pue=math.nan,
        gpus=tuple(GpuLabel(a, b, c) for a, b, c in zip(NASTY, NASTY[3:], NASTY[6:], strict=False)),
        budgets=tuple(BudgetSample(name, v, -v, v * 2, 0.0, 1.0)
                      for name, v in zip(NASTY, AWKWARD, strict=False)),
        exited_tasks_total=2**70,
        last_tick_timestamp_seconds=1e300,
    )


@pytest.mark.parametrize("accept", ACCEPTS)
def test_hostile_labels_and_values_equal_prometheus_client(accept):
    families = carbond_families(hostile_snapshot())
    fast, reference = strict(accept)
    body = fast(families)
    assert body == reference(families)
    assert b"bad\\\\xff.service" in body  # the non-UTF-8 name, visible and escaped
    assert b'say \\"hi\\"' in body and b"two\\nlines" in body


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_metrics_app_serves_what_prometheus_client_would(accept, encoding):
    """The cached snapshot part through the fast encoder, the live tail as before."""
    snap = hostile_snapshot()
    live = Fixed(tuple(ProcessCollector(registry=None).collect()))
    static = PlatformCollector(registry=None)
    app = MetricsApp(lambda: snap, live=live, static=static)
    reply = app(Request("GET", "/metrics", "HTTP/1.1",
                        {"accept": accept, "accept-encoding": encoding}))
    encoder, content_type = choose_encoder(accept)
    expected = encoder(Fixed((*snapshot_families(snap), *static.collect(), *live.metrics)))
    assert reply.content_type == content_type
    assert (gzip.decompress(reply.body) if reply.gzip else reply.body) == expected


@pytest.mark.parametrize("accept", [
    "application/openmetrics-text; version=1.x",  # choose_encoder raises: text, as before
    "application/openmetrics-text; version=1.0.0; escaping=\u00e9",  # not printable ASCII
    "text/plain; version=1.0.0; escaping=dots",
    "application/openmetrics-text; version=3.1; escaping=values",
])
def test_odd_accept_headers_pick_the_same_format_as_before(accept):
    snap = make_snapshot(2)
    live = Fixed(())
    app = MetricsApp(lambda: snap, live=live, static=Fixed(()))
    reply = app(Request("GET", "/metrics", "HTTP/1.1", {"accept": accept}))
    try:
        encoder, content_type = choose_encoder(exporter._safe_accept(accept))
    except TypeError:
        encoder, content_type = generate_text, "text/plain; version=0.0.4; charset=utf-8"
    assert reply.content_type == content_type
    assert reply.body == encoder(Fixed(tuple(snapshot_families(snap))))


def test_metrics_app_uses_prometheus_client_alone_when_they_disagree(monkeypatch, caplog):
    monkeypatch.setattr(exporter, "agrees_with_prometheus_client", lambda: False)
    monkeypatch.setattr(exporter, "fast_encoder", refuse)
    snap = make_snapshot(2)
    with caplog.at_level(logging.WARNING, logger="carbond.exporter.app"):
        app = MetricsApp(lambda: snap, live=Fixed(()), static=Fixed(()))
    assert "formats differently" in caplog.text
    reply = app(Request("GET", "/metrics", "HTTP/1.1", {}))
    assert reply.body == generate_text(Fixed(tuple(snapshot_families(snap))))


def test_unknown_encoders_are_left_alone():
    def custom(collector: Fixed) -> bytes:
        return b""

    assert fast_encoder(custom) is custom
    assert format_of(custom) is None
    reference = choose_encoder("text/plain; version=1.0.0; escaping=dots")[0]
    assert format_of(reference).escaping == DOTS


def test_families_outside_the_fast_path_are_rendered_by_prometheus_client():
    odd_name = Metric("caf\u00e9_seconds", "Not a legacy name.", "gauge")
    odd_name.add_sample("caf\u00e9_seconds", {"x": "1"}, 1.0)
    colon = Metric("job:rate", "A recording rule's name.", "gauge")
    colon.add_sample("job:rate", {}, 2.0)
    exemplar = Metric("requests", "With an exemplar.", "counter")
    exemplar.add_sample("requests_total", {"path": "/"}, 3.0,
                        exemplar=Exemplar({"trace_id": 'a"b'}, 0.5, 1.25))
    odd_label = Metric("things", "A label that is not a legacy name.", "gauge")
    odd_label.add_sample("things", {"caf\u00e9": "x", "a": "b"}, 4.0)
    number_label = Metric("numbered", "A label value that is not a str.", "gauge")
    number_label.add_sample("numbered", {"n": 7}, 5.0)  # type: ignore[dict-item]
    fine = Metric("fine", "Rendered by the fast path between the others.", "gauge")
    fine.add_sample("fine", {"a": "b"}, 6.0)
    families = Fixed((odd_name, fine, colon, exemplar, odd_label, fine))
    for accept in ACCEPTS:
        reference = choose_encoder(accept)[0]
        fast = fast_encoder(reference)
        assert isinstance(fast, FastEncoder)
        assert outcome(fast, families) == outcome(reference, families), accept


def outcome(encoder, collector: Fixed) -> bytes | type[Exception]:
    try:
        return encoder(collector)
    except Exception as error:
        return type(error)


def test_an_error_in_a_family_is_prometheus_client_s_error():
    broken = Metric("broken", "A value that is no number.", "gauge")
    broken.add_sample("broken", {}, "many")  # type: ignore[arg-type]
    families = Fixed((broken,))
    for accept in ("", OPENMETRICS):
        reference = choose_encoder(accept)[0]
        assert outcome(fast_encoder(reference), families) is ValueError
        assert outcome(reference, families) is ValueError


# Hypothesis: arbitrary families, mostly in the fast path's shape, some outside it.
legacy = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True)
names = st.one_of(legacy, legacy, legacy, st.text(min_size=1, max_size=6,
                                                  alphabet=st.characters(codec="utf-8")))
texts = st.one_of(st.sampled_from(NASTY[:10]),
                  st.text(max_size=8, alphabet=st.characters(codec="utf-8")))
numbers = st.one_of(st.floats(), st.sampled_from(AWKWARD), st.integers(-(2**70), 2**70),
                    st.booleans())
stamps = st.one_of(st.none(), st.none(), st.floats(-1e12, 1e12),
                   st.builds(Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999)))
SUFFIXES = ("", "", "_total", "_created", "_bucket", "_count", "_sum", "_gsum", "_gcount",
            "_info")


@st.composite
def families(draw: st.DrawFn) -> Metric:
    kind = draw(st.sampled_from(METRIC_TYPES))
    unit = draw(st.sampled_from(("", "", "seconds", "bytes")))
    metric = Metric(draw(names), draw(texts), kind, unit)
    label_names = draw(st.lists(st.one_of(legacy, st.just("le"), names), max_size=3,
                                unique=True))
    for _ in range(draw(st.integers(0, 5))):
        suffix = draw(st.sampled_from(SUFFIXES))
        labels = {name: draw(texts) for name in label_names}
        exemplar = None
        if draw(st.integers(0, 9)) == 0:
            exemplar = Exemplar({"trace_id": draw(texts)}, draw(numbers), draw(stamps))
        metric.add_sample(metric.name + suffix, labels, draw(numbers), draw(stamps), exemplar)
    return metric


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(families(), max_size=4))
def test_any_families_encode_as_prometheus_client_encodes_them(metrics: Iterable[Metric]):
    collector = Fixed(tuple(metrics))
    for accept in ACCEPTS:
        reference = choose_encoder(accept)[0]
        assert outcome(fast_encoder(reference), collector) == outcome(reference, collector)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(legacy, texts, numbers), max_size=6))
def test_legacy_families_never_fall_back(rows: list[tuple[str, str, float]]):
    """What carbond makes (legacy names, str label values, plain samples): no fallback."""
    metrics = []
    for i, (name, value, number) in enumerate(rows):
        metric = Metric(f"{name}_{i}", value, ("counter", "gauge")[i % 2])
        sample_name = metric.name + ("_total" if metric.type == "counter" else "")
        metric.samples.append(Sample(sample_name, {"a": value, name: "x"}, number))
        metrics.append(metric)
    collector = Fixed(tuple(metrics))
    for accept in ACCEPTS:
        fast, reference = strict(accept)
        assert fast(collector) == reference(collector)
