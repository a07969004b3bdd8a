"""Energy, power and emissions per consumer: at most `max_consumers` named, the rest `other`;
and `carbond_consumer_info`, the owner's labels of the same consumers, for `group_left` joins."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from carbond.exporter.collectors.families import energy_and_power, per_consumer
from carbond.exporter.snapshot import Snapshot
from carbond.types import Consumer, name_text
from carbond.workloads.identity.metadata import LABELS

INFO = "carbond_consumer_info"

CONSUMER_LABELS = ["consumer", "kind", "component"]


class ConsumersCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield from energy_and_power(
            "consumer", "per consumer", CONSUMER_LABELS,
            (([c.consumer.name, c.consumer.kind, c.component], c.joules_total, c.watts)
             for c in snap.consumers),
        )
        yield per_consumer("carbond_consumer_emissions_grams",
                           "CO2e attributed to a consumer since start.", snap.consumer_grams_total)
        yield per_consumer("carbond_consumer_embodied_grams",
                           "Embodied emissions of the host attributed to a consumer since start.",
                           snap.consumer_embodied_grams_total)
        yield consumer_info(snap.consumer_info)


def consumer_info(rows: Iterable[tuple[Consumer, Mapping[str, str]]]) -> Metric:
    """One series = 1 per consumer with the metadata labels that apply to it (each row its
    own label set, so a unit carries none of a pod's); every value escaped like any label."""
    family = GaugeMetricFamily(INFO, "What is known of a consumer's owner (value 1), to join "
                               "with group_left on kind and consumer.", labels=["kind", "consumer"])
    for consumer, metadata in rows:
        values = {"kind": name_text(consumer.kind), "consumer": name_text(consumer.name)}
        for key in LABELS:
            value = metadata.get(key)
            if value:
                values[key] = name_text(value)
        family.samples.append(Sample(INFO, values, 1.0))
    return family
