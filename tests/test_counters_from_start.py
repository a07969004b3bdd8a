"""Issue 21 item 10: every labelled counter is exported at 0 for each known label set from the
first tick, so `increase()` sees the first event and the Host dashboard's "Counter wraps and
resets" panel has data on a healthy host."""

from __future__ import annotations

import dataclasses

from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from carbond.exporter.collectors import SnapshotCollectors
from carbond.exporter.snapshot import DeviceSeries, Snapshot
from tests import powercap
from tests.helpers import carbond_run, select
from tests.snapshots import make_snapshot

RAPL_DEVICES = {"package-0", "package-1", "dram-0", "dram-1", "psys"}


def by_label(samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: value for key, value in select(samples, name).items()}


def test_a_healthy_host_exports_wraps_resets_and_errors_at_zero_from_its_first_tick(tmp_path):
    powercap.intel_two_socket(str(tmp_path))
    with carbond_run("--powercap-root", str(tmp_path), "--interval", "1s") as daemon:
        first = daemon.wait_ticks(1)
    for family in ("carbond_counter_wraps_total", "carbond_counter_resets_total"):
        assert by_label(first, family, "device") == dict.fromkeys(RAPL_DEVICES, 0.0), family
    errors = by_label(first, "carbond_meter_errors_total", "meter")
    assert errors.keys() >= {"rapl"} and set(errors.values()) == {0.0}, errors
    fetch_errors = by_label(first, "carbond_intensity_fetch_errors_total", "provider")
    assert fetch_errors and set(fetch_errors.values()) == {0.0}, fetch_errors
    assert select(first, "carbond_ledger_errors_total") == {(): 0.0}
    assert select(first, "carbond_tick_failures_total") == {(): 0.0}


def family_samples(snap: Snapshot, name: str) -> dict[str, float]:
    for family in SnapshotCollectors(snap).collect():
        if family.name == name:
            return {next(iter(s.labels.values())): s.value for s in family.samples}
    raise AssertionError(name)


def test_counted_devices_keep_their_count_and_the_models_estimate_has_no_counter():
    snap = dataclasses.replace(
        make_snapshot(), devices=(*make_snapshot().devices,
                                  DeviceSeries("cpu", "cpu", "model", 1.0, 1.0)))
    assert family_samples(snap, "carbond_counter_wraps") == {
        "package-0": 1, "dram-0": 0, "gpu-0": 0}
    assert family_samples(snap, "carbond_counter_resets") == {
        "package-0": 0, "dram-0": 0, "gpu-0": 2}
    # a meter that is known (it has an up gauge) but never failed: at 0
    assert family_samples(snap, "carbond_meter_errors") == {"rapl": 2, "nvml": 0, "model": 0}
    assert b'carbond_counter_wraps_total{device="dram-0"} 0.0' in openmetrics_latest(
        SnapshotCollectors(snap))
