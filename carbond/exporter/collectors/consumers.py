"""Energy, power and emissions per consumer: at most `max_consumers` named, the rest `other`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from carbond.exporter.collectors.families import energy_and_power, per_consumer
from carbond.exporter.snapshot import Snapshot

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
