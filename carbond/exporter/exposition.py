"""Prometheus text 0.0.4 and OpenMetrics bodies, byte for byte as prometheus_client writes them.

prometheus_client's encoders validate and escape every label name of every sample and format
each line through several calls; for carbond's ~4,000 samples per 500 consumers that is 6-10 us
a sample, paid on nearly every scrape because Prometheus scrapes about once per tick. carbond's
families use a few fixed legacy names, so this encoder checks and renders each distinct metric
name and label-name list once per body, and a sample costs a `%` on a cached template.

The fast path covers what carbond's collectors produce. A family with anything else (an
exemplar, a native histogram, a name outside `[a-zA-Z_][a-zA-Z0-9_]*`, a non-string label
value, an encoder or escaping it does not know) is rendered by prometheus_client itself, so
the output never depends on this module being complete. `agrees_with_prometheus_client()`
checks a set of awkward families against the installed prometheus_client, for a daemon to
run once at start and fall back wholesale if a release ever formats differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Sample, Timestamp
from prometheus_client.utils import floatToGoString

# prometheus_client's escaping schemes (openmetrics.exposition's constants, spelt out so this
# module also imports under releases that predate them).
ALLOW_UTF8 = "allow-utf-8"
UNDERSCORES = "underscores"
DOTS = "dots"
VALUES = "values"
_ESCAPINGS = frozenset({ALLOW_UTF8, UNDERSCORES, DOTS, VALUES})

# Names every escaping scheme leaves alone, or only doubles the underscores of: legacy label
# name characters (no colon, which OpenMetrics' sample name escaping would turn into "_").
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Text 0.0.4 has fewer types than OpenMetrics; generate_latest renames these.
_TEXT_TYPES = MappingProxyType({
    "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped",
})
_TEXT_NAME_SUFFIX = MappingProxyType({"counter": "_total", "info": "_info"})
# Samples the text format moves into a gauge family of their own, after the family.
_TEXT_DEFERRED = ("_created", "_gsum", "_gcount")
_EOF = "# EOF\n"
# The Sample layout the fast path unpacks; under any other it stays out of the way.
_SAMPLE_FIELDS = ("name", "labels", "value", "timestamp", "exemplar", "native_histogram")

Encoder = Callable[["Collector"], bytes]


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _Unsupported(Exception):
    """A family this module does not render; prometheus_client renders it instead."""


@dataclass(frozen=True)
class _One:
    """One family as a collector, for prometheus_client's encoders."""

    metric: Metric

    def collect(self) -> list[Metric]:
        return [self.metric]


@dataclass(frozen=True)
class _Many:
    """Fixed families as a collector."""

    metrics: tuple[Metric, ...]

    def collect(self) -> tuple[Metric, ...]:
        return self.metrics


@dataclass(frozen=True)
class Format:
    """What one of prometheus_client's encoders writes: which format, which name escaping."""

    openmetrics: bool
    escaping: str = UNDERSCORES


def format_of(encoder: Encoder) -> Format | None:
    """The Format of an encoder `choose_encoder` returned, or None for one not known here.

    Only prometheus_client's own two encoders qualify, bare or as the partials choose_encoder
    makes (escaping; OpenMetrics also a version, which only native histograms depend on).
    """
    if encoder is generate_text:
        return Format(openmetrics=False)
    if encoder is generate_openmetrics:
        return Format(openmetrics=True)
    if not isinstance(encoder, partial) or encoder.args:
        return None
    keywords = encoder.keywords
    escaping = keywords.get("escaping", UNDERSCORES)
    if escaping not in _ESCAPINGS:
        return None
    if encoder.func is generate_text and set(keywords) <= {"escaping"}:
        return Format(openmetrics=False, escaping=escaping)
    if encoder.func is generate_openmetrics and set(keywords) <= {"escaping", "version"}:
        return Format(openmetrics=True, escaping=escaping)
    return None


@dataclass(frozen=True)
class FastEncoder:
    """Renders as `reference` does, family by family; `reference` renders what is not covered."""

    format: Format
    reference: Encoder

    def __call__(self, collector: Collector) -> bytes:
        body = _Body(self.format)
        out: list[str] = []
        for metric in collector.collect():
            try:
                out.append(body.family(metric))
            except Exception:  # anything unexpected: the reference renders it, or raises
                out.append(self._reference(metric))
        if self.format.openmetrics:
            out.append(_EOF)
        return "".join(out).encode("utf-8")

    def _reference(self, metric: Metric) -> str:
        text = self.reference(_One(metric)).decode("utf-8")
        if self.format.openmetrics and text.endswith(_EOF):
            text = text[: -len(_EOF)]
        return text


def fast_encoder(encoder: Encoder) -> Encoder:
    """`encoder` itself where its format is not known here, else a FastEncoder for it."""
    found = format_of(encoder)
    if found is None or Sample._fields != _SAMPLE_FIELDS:
        return encoder
    return FastEncoder(found, encoder)


def _escape_value(value: str) -> str:
    """A label value (or OpenMetrics HELP) as prometheus_client escapes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@dataclass
class _Body:
    """The renderings shared by all families of one body; they live as long as the body does."""

    format: Format
    # family or sample name -> its text in this format
    _names: dict[str, str] = field(default_factory=dict)
    _sample_names: dict[str, str] = field(default_factory=dict)
    # label names in a sample's order -> a `%` template for its labels, sorted by name
    _templates: dict[tuple[str, ...], str] = field(default_factory=dict)

    def name(self, name: str) -> str:
        """A family, HELP/TYPE or text sample name: prometheus_client's escape_metric_name."""
        found = self._names.get(name)
        if found is None:
            if name.__class__ is not str or not _PLAIN_NAME.fullmatch(name):
                raise _Unsupported(name)
            found = name.replace("_", "__") if self.format.escaping == DOTS else name
            self._names[name] = found
        return found

    def sample_name(self, name: str) -> str:
        """A sample's name: escape_metric_name in text, a rune-by-rune `_escape` in
        OpenMetrics (which gives "values" its `U__` prefix even on a legacy name)."""
        found = self.name(name)
        if self.format.openmetrics and self.format.escaping == VALUES:
            found = "U__" + name.replace("_", "__")
        self._sample_names[name] = found
        return found

    def _template(self, names: tuple[str, ...]) -> str:
        """`{a="%(a)s",b="%(b)s"}` for label names (b, a): sorted, to be filled by `%`."""
        for name in names:
            if name.__class__ is not str or not _PLAIN_NAME.fullmatch(name):
                raise _Unsupported(name)
        dots = self.format.escaping == DOTS
        found = "{" + ",".join(
            f'{name.replace("_", "__") if dots else name}="%({name})s"' for name in sorted(names)
        ) + "}"
        self._templates[names] = found
        return found

    def labels(self, labels: dict[str, str]) -> str:
        """`{name="value",...}` sorted by name, as prometheus_client writes it.

        Rendered per sample rather than cached: a cache keyed by label items would keep
        thousands of tuples alive per body, and the garbage collector passes they cause
        cost more than rendering (a `%` on a cached template) saves.
        """
        names = tuple(labels)
        template = self._templates.get(names) or self._template(names)
        for value in labels.values():
            if value.__class__ is not str:
                raise _Unsupported(value)
        found = template % labels
        # Escaping is rare: only when a value holds a backslash, newline or double quote.
        if "\\" in found or "\n" in found or found.count('"') != 2 * len(names):
            found = template % {name: _escape_value(value) for name, value in labels.items()}
        return found

    def family(self, metric: Metric) -> str:
        return self._openmetrics(metric) if self.format.openmetrics else self._text(metric)

    def _samples(self, samples: Iterable[Sample], out: list[str],
                 timestamp: Callable[[float | Timestamp], str]) -> None:
        """One line per sample onto `out`; the hot loop, so lookups are inlined."""
        names, sample_name = self._sample_names, self.sample_name
        render_labels = self.labels
        append = out.append
        for name, labels, value, stamp, exemplar, native_histogram in samples:
            if exemplar is not None or native_histogram is not None:
                raise _Unsupported("exemplar or native histogram")
            line = names.get(name) or sample_name(name)
            if labels:
                line += render_labels(labels)
            # floatToGoString, which is repr() for a finite float unless Go would use an
            # exponent (more than six digits before the point).
            text = repr(value) if value.__class__ is float else "n"
            if "n" in text or (value > 0 and text.find(".") > 6):
                if value is None:
                    raise _Unsupported("no value")
                text = floatToGoString(value)
            if stamp is None:
                append(f"{line} {text}\n")
            else:
                append(f"{line} {text}{timestamp(stamp)}\n")

    def _openmetrics(self, metric: Metric) -> str:
        name = self.name(metric.name)
        out = [f"# HELP {name} {_escape_value(metric.documentation)}\n",
               f"# TYPE {name} {metric.type}\n"]
        if metric.unit:
            out.append(f"# UNIT {name} {metric.unit}\n")
        self._samples(metric.samples, out, _openmetrics_timestamp)
        return "".join(out)

    def _text(self, metric: Metric) -> str:
        kind = metric.type
        name = self.name(metric.name + _TEXT_NAME_SUFFIX.get(kind, ""))
        help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out = [f"# HELP {name} {help_text}\n", f"# TYPE {name} {_TEXT_TYPES.get(kind, kind)}\n"]
        moved = {metric.name + suffix: suffix for suffix in _TEXT_DEFERRED}
        deferred: dict[str, list[Sample]] = {}
        samples = metric.samples
        if any(sample[0] in moved for sample in samples):
            kept = []
            for sample in samples:
                suffix = moved.get(sample[0])
                if suffix is None:
                    kept.append(sample)
                else:
                    deferred.setdefault(suffix, []).append(sample)
            samples = kept
        self._samples(samples, out, _text_timestamp)
        for suffix, lines in sorted(deferred.items()):
            gauge = self.name(metric.name + suffix)
            out.append(f"# HELP {gauge} {help_text}\n# TYPE {gauge} gauge\n")
            self._samples(lines, out, _text_timestamp)
        return "".join(out)


def _text_timestamp(stamp: float | Timestamp) -> str:
    """Milliseconds, as the text format's generate_latest writes them."""
    return f" {int(float(stamp) * 1000):d}"


def _openmetrics_timestamp(stamp: float | Timestamp) -> str:
    """Seconds, as str() has them (OpenMetrics' generate_latest)."""
    return f" {stamp}"


def _probe_families() -> list[Metric]:
    """Families in every shape the fast path renders, with awkward values and text."""
    nasty = ["", "a\\b", 'say "hi"', "two\nlines", "bad\\xff.service", "\u00e9t\u00e9 \u2603",
             "} # EOF", "trailing\\"]
    numbers = [0, 1, -1, 0.5, 1e-9, 1e6, 1234567.0, 12345678.9, 1e21, -1e21, 2**63, True,
               math.inf, -math.inf, math.nan, -0.0, 3.14159265358979]
    counter = CounterMetricFamily("probe_events", 'Help with \\ and\nnewline and "quotes".',
                                  labels=["b_label", "a_label", "A"])
    gauge = GaugeMetricFamily("probe_level_bytes", "Level.", labels=["x"], unit="bytes")
    for i, text in enumerate(nasty):
        counter.add_metric([text, nasty[-1 - i], str(i)], numbers[i],
                           created=1_700_000_000.5 if i % 2 else None)
    for i, number in enumerate(numbers):
        gauge.add_metric([f"v{i}"], number, timestamp=1_700_000_000.25 if i == 3 else None)
    histogram = HistogramMetricFamily("probe_seconds", "", labels=["path"])
    histogram.add_metric(["/"], [("0.001", 1), ("1.0", 2.5), ("+Inf", 3)], 0.75)
    summary = SummaryMetricFamily("probe_size", "Size.", labels=["q"])
    summary.add_metric(['"'], 4, 10.5)
    info = InfoMetricFamily("probe_build", "Build.")
    info.add_metric([], {"version": "1.0\n", "commit": "ab\\c"})
    stateset = StateSetMetricFamily("probe_state", "State.")
    stateset.add_metric([], {"on": True, "off": False})
    unknown = UnknownMetricFamily("probe_thing", "Thing.", value=7)
    empty = GaugeMetricFamily("probe_empty", "No samples.", labels=["x"])
    return [counter, gauge, histogram, summary, info, stateset, unknown, empty]


_PROBE_ACCEPT = (
    "",
    "application/openmetrics-text; version=1.0.0; charset=utf-8",
    *(f"application/openmetrics-text; version=1.0.0; escaping={e}" for e in sorted(_ESCAPINGS)),
    *(f"text/plain; version=1.0.0; escaping={e}" for e in sorted(_ESCAPINGS)),
)


def agrees_with_prometheus_client() -> bool:
    """Whether the fast path writes what the installed prometheus_client writes, for every
    family shape and escaping it covers; a start-up check against a release that changed."""
    families = _probe_families()
    whole = _Many(tuple(families))
    for accept in _PROBE_ACCEPT:
        reference = choose_encoder(accept)[0]
        fast = fast_encoder(reference)
        if isinstance(fast, FastEncoder):
            body = _Body(fast.format)
            for metric in families:  # each shape must take the fast path, not the fallback
                try:
                    body.family(metric)
                except Exception:
                    return False
        if fast(whole) != reference(whole):
            return False
    return True
