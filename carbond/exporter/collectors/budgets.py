"""Each emission budget's limit, used and projected grams in its current period."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from carbond.exporter.snapshot import Snapshot
from carbond.types import name_text


class BudgetsCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("carbond_budget_limit_grams",
                                  "An emission budget's limit for its current period.",
                                  labels=["budget"])
        used = GaugeMetricFamily("carbond_budget_used_grams",
                                 "CO2e counted against a budget in its current period.",
                                 labels=["budget"])
        projected = GaugeMetricFamily("carbond_budget_projected_grams",
                                      "CO2e a budget is projected to reach by its period's end.",
                                      labels=["budget"])
        for budget in self.snap.budgets:
            name = [name_text(budget.name)]
            limit.add_metric(name, budget.limit_grams)
            used.add_metric(name, budget.used_grams)
            projected.add_metric(name, budget.projected_grams)
        yield limit
        yield used
        yield projected
