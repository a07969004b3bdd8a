"""Snapshots built by hand, for exporter tests and the scrape benchmark."""

from __future__ import annotations

from carbond.carbon.intensity import Intensity
from carbond.exporter.series import SeriesSample
from carbond.exporter.snapshot import BudgetSample, DeviceSeries, GpuLabel, Snapshot
from carbond.types import IDLE, OTHER, Consumer

COMPONENTS = ("cpu", "dram", "gpu")
HOSTILE = Consumer("unit", "bad\udcff.service")  # os.fsdecode of b"bad\xff.service"


def consumers(count: int) -> list[Consumer]:
    """`count` units, plus idle, other and one name that is not UTF-8."""
    made = [Consumer("unit", f"worker-{i:04d}.service") for i in range(count)]
    return [*made, IDLE, OTHER, HOSTILE]


def make_snapshot(count: int = 3, tick: int = 1) -> Snapshot:
    """Every field set; values grow with `tick` so successive snapshots differ."""
    people = consumers(count)
    series = tuple(
        SeriesSample(c, component, joules_total=tick * (i + 1) * 10.0 + j,
                     watts=(i + 1) * 0.5 + j)
        for i, c in enumerate(people) for j, component in enumerate(COMPONENTS)
    )
    return Snapshot(
        devices=(
            DeviceSeries("cpu", "package-0", "rapl", tick * 100.0, 42.0),
            DeviceSeries("dram", "dram-0", "rapl", tick * 10.0, 4.0),
            DeviceSeries("gpu", "gpu-0", "nvml", tick * 300.0, 120.0),
        ),
        meters_up={"rapl": True, "nvml": True, "model": False},
        meter_errors_total={"rapl": 2, "nvml": 0},
        counter_wraps_total={"package-0": 1},
        tick_buckets=(("0.001", tick), ("0.01", tick + 1), ("+Inf", tick + 2)),
        tick_seconds_sum=0.02 * tick,
        consumers=series,
        consumer_grams_total=tuple((c, tick * (i + 1) * 0.1) for i, c in enumerate(people)),
        exited_tasks_total=3 * tick,
        host_grams_total=tick * 7.5,
        intensity=Intensity(grams_per_kwh=380.0, zone="DE", provider="static",
                            observed_at=1_700_000_000.0, fetched_at=1_700_000_000.0),
        intensity_age_seconds=12.0,
        intensity_fetch_errors_total={"electricitymaps": 4},
        pue=1.2,
        gpus=(GpuLabel("gpu-0", "GPU-1234", "NVIDIA H100 80GB HBM3"),),
        consumer_embodied_grams_total=tuple(
            (c, tick * (i + 1) * 0.01) for i, c in enumerate(people)
        ),
        budgets=(
            BudgetSample("research", 250_000.0, 1_000.0 * tick, 9_000.0, 1_698_796_800.0,
                         1_701_388_800.0),
            BudgetSample("team-a", 5_000.0, 10.0 * tick, 70.0, 1_699_833_600.0,
                         1_700_438_400.0),
        ),
        counter_resets_total={"gpu-0": 2},
        exit_records_lost_total=5,
        tick_failures_total=1,
        last_tick_timestamp_seconds=1_700_000_100.0 + tick,
        ledger_errors_total=6,
        consumer_info=(
            (Consumer("container", "team-a/web/nginx"), {
                "namespace": "team-a", "pod": "web", "pod_uid": "0b1c2d3e-0000-4000-8000-1",
                "container": "nginx", "container_id": "3a9b2c" * 4, "runtime": "containerd"}),
            (Consumer("job", "slurm/12345"), {
                "user": "alice", "account": "physics", "partition": "gpu",
                "job_name": 'say "hi"\n'}),
            (Consumer("container", "docker/web-1"), {
                "container": "web-1", "runtime": "docker", "compose_project": "shop",
                "compose_service": "web"}),
        ),
        metadata_errors_total={"cri": 3, "slurm": 1},
    )
