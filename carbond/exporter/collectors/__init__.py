"""The carbond_* families of DESIGN.md's metric table, one collector a file, each over one
snapshot (node_exporter's and client_python's one-collector-a-file layout)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from carbond.exporter.collectors.budgets import BudgetsCollector
from carbond.exporter.collectors.carbon import CarbonCollector
from carbond.exporter.collectors.consumers import ConsumersCollector
from carbond.exporter.collectors.host import HostCollector
from carbond.exporter.collectors.self import SelfCollector
from carbond.exporter.snapshot import Snapshot

COLLECTORS = (HostCollector, ConsumersCollector, CarbonCollector, BudgetsCollector,
              SelfCollector)


class SnapshotCollectors:
    """Every carbond_* family of one snapshot, in the shape prometheus_client's encoders and
    registries read."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        for collector in COLLECTORS:
            yield from collector(self.snap).collect()


def snapshot_families(snap: Snapshot) -> Iterator[Metric]:
    return SnapshotCollectors(snap).collect()
