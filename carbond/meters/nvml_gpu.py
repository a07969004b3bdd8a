"""One GPU as the NVML meter sees it: what is exported about it, and its mutable state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carbond.meters.base import CEILING_WATTS, EnergyCounter
from carbond.meters.nvml_errors import STATUS_ERROR, STATUS_OK


@dataclass(frozen=True)
class MigInstance:
    """A MIG device of a GPU. It has no energy counter of its own: its share of the parent's
    energy comes from its processes' usage (see carbond.workloads.gpu)."""

    slot: int  # index for nvmlDeviceGetMigDeviceHandleByIndex
    uuid: str
    gpu_instance_id: int
    compute_instance_id: int


@dataclass(frozen=True)
class GpuInfo:
    """What is known about one GPU, for `carbond_gpu_info` and `carbond check`."""

    index: int  # NVML index
    device: str  # "gpu-N", the `device` label
    uuid: str  # "" when the GPU was never readable
    name: str
    status: str  # ok, lost, not supported, no permission, error
    reason: str  # why it is down; "" when ok
    method: str  # "energy counter", "power integration", or "" while down
    mig_enabled: bool
    mig_instances: tuple[MigInstance, ...]


class GpuState:
    """Mutable per-GPU state; only touched under NvmlMeter's lock."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.device = f"gpu-{index}"
        self.uuid = ""
        self.name = ""
        self.handle: Any = None
        self.status = STATUS_ERROR
        self.reason = "not yet read"
        self.method = ""
        # mJ; no range: a decrease is a reset. mW is mJ/s: the bound is in the counter's units.
        self.max_milliwatts = CEILING_WATTS * 1000.0
        self.counter = EnergyCounter(None, self.max_milliwatts)
        self.rejecting = False  # the last energy or power value was impossible
        self.power_millijoules = 0.0  # integrated power
        self.last_power_milliwatts: int | None = None
        self.last_power_time = 0.0
        self.last_retry = float("-inf")
        self.mig_enabled = False
        self.mig_instances: tuple[MigInstance, ...] = ()

    @property
    def joules(self) -> float:
        return (self.counter.total_units + self.power_millijoules) / 1000.0

    def info(self) -> GpuInfo:
        return GpuInfo(self.index, self.device, self.uuid, self.name, self.status,
                       "" if self.status == STATUS_OK else self.reason,
                       self.method if self.status == STATUS_OK else "",
                       self.mig_enabled, self.mig_instances)
