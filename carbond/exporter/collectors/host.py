"""Host energy and power per device, the meters' health, and the GPUs NVML sees."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from carbond.attribution import MODEL_SOURCE
from carbond.exporter.collectors.families import counter, counter_by, energy_and_power, labels
from carbond.exporter.snapshot import Snapshot
from carbond.types import name_text

DEVICE_LABELS = ["component", "device", "source"]


class HostCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield from energy_and_power(
            "host", "per device", DEVICE_LABELS,
            (([d.component, d.device, d.source], d.joules_total, d.watts) for d in snap.devices),
        )
        up = GaugeMetricFamily("carbond_meter_up", "1 when the meter's last read gave a sample.",
                               labels=["meter"])
        for meter, is_up in sorted(snap.meters_up.items()):
            up.add_metric([name_text(meter)], 1.0 if is_up else 0.0)
        yield up
        yield counter_by("carbond_meter_errors", "Failed device reads per meter.", "meter",
                         snap.meter_errors_total, known=snap.meters_up)
        # Every device a hardware counter measures can wrap or reset: each is there at 0
        # from the first scrape (the model's estimates have no counter).
        counted = sorted({d.device for d in snap.devices if d.source != MODEL_SOURCE})
        yield counter_by("carbond_counter_wraps", "Hardware energy counter wraps handled.",
                         "device", snap.counter_wraps_total, known=counted)
        yield counter_by("carbond_counter_resets",
                         "Hardware energy counter resets (a counter that went backwards).",
                         "device", snap.counter_resets_total, known=counted)
        gpu_info = GaugeMetricFamily("carbond_gpu_info", "GPUs seen by NVML (value 1).",
                                     labels=["device", "uuid", "name"])
        for gpu in snap.gpus:
            gpu_info.add_metric(labels((gpu.device, gpu.uuid, gpu.name)), 1.0)
        yield gpu_info
        coverage = GaugeMetricFamily(
            "carbond_host_coverage_ratio",
            "Energy the CPU, DRAM and GPU counters measured over the platform meter's, last "
            "tick (absent without a platform meter).")
        if snap.coverage_ratio is not None:
            coverage.add_metric([], snap.coverage_ratio)
        yield coverage
        yield counter("carbond_platform_excess_joules",
                      "Energy the parts measured beyond the platform meter's reading (sampling "
                      "skew): never attributed as negative rest.",
                      snap.platform_excess_joules_total)
