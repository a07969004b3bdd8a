"""Building blocks of the collectors: metric families with every label value escaped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from carbond.types import Consumer, name_text


def labels(values: Iterable[str]) -> list[str]:
    """Every label value goes through here: a scrape never breaks on a name."""
    return [name_text(v) for v in values]


def energy_and_power(
    subject: str, per: str, label_names: list[str],
    rows: Iterable[tuple[list[str], float, float]],
) -> Iterator[Metric]:
    """carbond_<subject>_energy_joules_total and carbond_<subject>_power_watts, one row each."""
    energy = CounterMetricFamily(f"carbond_{subject}_energy_joules",
                                 f"Energy {per} since start.", labels=label_names)
    power = GaugeMetricFamily(f"carbond_{subject}_power_watts",
                              f"Mean power {per} over the last tick.", labels=label_names)
    for names, joules_total, watts in rows:
        values = labels(names)
        energy.add_metric(values, joules_total)
        power.add_metric(values, watts)
    yield energy
    yield power


def counter_by(name: str, help_text: str, label: str, counts: Mapping[str, float],
               known: Iterable[str] = ()) -> Metric:
    """One series per label value counted, and at 0 for each `known` value not counted yet:
    a series that appears only at its first event hides that event from `increase()`."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value, count in sorted({**dict.fromkeys(known, 0), **counts}.items()):
        family.add_metric([name_text(value)], count)
    return family


def counter(name: str, help_text: str, value: float) -> Metric:
    family = CounterMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def gauge(name: str, help_text: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, help_text)
    family.add_metric([], value)
    return family


def per_consumer(name: str, help_text: str,
                  rows: Iterable[tuple[Consumer, float]]) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=["consumer", "kind"])
    for consumer, grams in rows:
        family.add_metric(labels((consumer.name, consumer.kind)), grams)
    return family
