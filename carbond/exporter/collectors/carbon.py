"""Host emissions, the grid intensity in use and its age, the feed's errors and the PUE."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from carbond.exporter.collectors.families import counter, counter_by, gauge, labels
from carbond.exporter.snapshot import Snapshot


class CarbonCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield counter("carbond_host_emissions_grams",
                      "CO2e of the attributed host energy since start.", snap.host_grams_total)
        intensity = GaugeMetricFamily(
            "carbond_grid_intensity_grams_per_kwh", "Grid carbon intensity in use.",
            labels=["zone", "provider"],
        )
        age = GaugeMetricFamily(
            "carbond_grid_intensity_age_seconds", "Age of the intensity figure in use.",
            labels=["zone", "provider"],
        )
        if snap.intensity is not None:
            names = labels((snap.zone or snap.intensity.zone, snap.intensity.provider))
            intensity.add_metric(names, snap.intensity.grams_per_kwh)
            age.add_metric(names, snap.intensity_age_seconds or 0.0)
        yield intensity
        yield age
        yield counter_by("carbond_intensity_fetch_errors",
                         "Failed or rejected intensity fetches.", "provider",
                         snap.intensity_fetch_errors_total)
        yield gauge("carbond_pue_ratio", "Power usage effectiveness applied.", snap.pue)
