"""carbond about itself: exits read, ticks and their failures, the ledger, the metadata
sources, the build."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from carbond import __version__
from carbond.exporter.collectors.families import counter, counter_by, gauge
from carbond.exporter.snapshot import Snapshot
from carbond.workloads.identity.resolver import SOURCES


class SelfCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield counter("carbond_exited_tasks",
                      "Tasks whose final CPU time came from taskstats exit events.",
                      snap.exited_tasks_total)
        yield counter("carbond_exit_records_lost",
                      "Taskstats exit records the kernel dropped before carbond read them.",
                      snap.exit_records_lost_total)
        tick = HistogramMetricFamily("carbond_tick_duration_seconds",
                                     "Wall time of one measurement tick.")
        tick.add_metric([], list(snap.tick_buckets), snap.tick_seconds_sum)
        yield tick
        yield counter("carbond_tick_failures", "Ticks that failed and were skipped.",
                      snap.tick_failures_total)
        yield gauge("carbond_last_tick_timestamp_seconds",
                    "Wall clock (epoch seconds) of the last successful tick.",
                    snap.last_tick_timestamp_seconds)
        yield counter("carbond_ledger_errors", "Failed ledger writes.", snap.ledger_errors_total)
        yield counter_by("carbond_metadata_errors",
                         "Failed calls to a metadata source (names fall back to IDs).", "source",
                         {**dict.fromkeys(SOURCES, 0), **snap.metadata_errors_total})
        info = GaugeMetricFamily("carbond_build_info", "carbond build.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
