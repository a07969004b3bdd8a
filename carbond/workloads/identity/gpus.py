"""GPU weights adjusted by who holds each GPU (pure: no I/O).

NVML's per-process samples say who used a GPU; the kubelet says who was given it. A GPU (or
every MIG device of it) held by exactly one container is that container's, whole: it gets the
GPU's split even when NVML has no process samples for it (MIG devices often give none, and a
pod's processes can be named by a relative cgroup path under cgroup namespaces). A GPU held by
several containers (time-slicing replicas, MIG devices of different pods) keeps NVML's SM or
memory split, as today. Either way each GPU's energy is split once: one GpuWeights per GPU,
never the GPU's energy copied to each holder (dcgm-exporter #582, #587).

MIG devices have no energy counter: their holders are holders of the parent GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from carbond.attribution import GpuWeights
from carbond.types import Consumer


class _Mig(Protocol):
    @property
    def uuid(self) -> str: ...


class GpuIdentity(Protocol):
    """What is needed of `carbond.meters.nvml.GpuInfo`."""

    @property
    def index(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def uuid(self) -> str: ...
    @property
    def mig_instances(self) -> tuple[_Mig, ...]: ...


def devices_by_id(gpus: Iterable[GpuIdentity]) -> dict[str, str]:
    """Every ID a device plugin may use for a GPU -> its device ("gpu-N"): the GPU's UUID, its
    MIG devices' UUIDs, and its NVML index as text."""
    found: dict[str, str] = {}
    for gpu in gpus:
        found[str(gpu.index)] = gpu.device
        if gpu.uuid:
            found[gpu.uuid] = gpu.device
        for mig in gpu.mig_instances:
            if mig.uuid:
                found[mig.uuid] = gpu.device
    return found


def holders_by_device(holders: Mapping[str, Iterable[Consumer]],
                      devices: Mapping[str, str]) -> dict[str, frozenset[Consumer]]:
    """Device ID -> holders (from PodResources) to device -> holders; IDs of no GPU of this
    host (a GPU that is down, a stale answer) are dropped."""
    result: dict[str, set[Consumer]] = {}
    for device_id, consumers in holders.items():
        device = devices.get(device_id)
        if device is not None:
            result.setdefault(device, set()).update(consumers)
    return {device: frozenset(consumers) for device, consumers in result.items()}


def held_weights(gpus: Mapping[str, GpuWeights],
                 holders: Mapping[str, Iterable[Consumer]]) -> dict[str, GpuWeights]:
    """Per device, the weights `attribution.attribute` splits its energy by: a device held by
    exactly one consumer goes to it whole (weight 1 on both bases, whatever NVML saw); any
    other device keeps NVML's weights unchanged."""
    result = dict(gpus)
    for device, consumers in holders.items():
        owners = frozenset(consumers)
        if len(owners) == 1:
            (owner,) = owners
            result[device] = GpuWeights(sm={owner: 1.0}, memory={owner: 1.0})
    return result
