"""Which container holds which GPU, from the kubelet's PodResources API (v1 `List`).

The kubelet answers, per pod and container, the device IDs its device plugins allocated. The
NVIDIA device plugin's IDs are GPU UUIDs (`GPU-…`), MIG device UUIDs (`MIG-…`) or, with
`deviceIDStrategy: index`, NVML indices; with time-slicing each replica is `UUID::N`, so several
containers hold one GPU. The answer names pods by namespace and name only (no UID, no
container ID): a holder is the consumer `NAMESPACE/POD/CONTAINER`, the name the CRI gives the
same container.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from carbond.types import Consumer
from carbond.workloads.identity import grpcunix
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import name_part

KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
SERVICE = "PodResourcesLister"
MODULE = "podresources_v1_pb2"
GPU_RESOURCE_PREFIX = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/mig-1g.10gb, gpu.shared

Holders = dict[str, tuple[Consumer, ...]]
"""A device ID (GPU or MIG UUID, or an NVML index as text) -> the containers holding it."""


class PodResourcesSource:
    name = "podresources"
    per_id = False

    def __init__(self, socket_path: str = KUBELET_SOCKET,
                 max_message_bytes: int = grpcunix.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Holders:
        grpc, api = grpcunix.load(MODULE)
        with grpcunix.UnixChannel(grpc, self.socket_path, timeout_seconds,
                                  self.max_message_bytes) as channel:
            answer = channel.call(grpcunix.method_path(api, SERVICE, "List"),
                                  api.ListPodResourcesRequest(), api.ListPodResourcesResponse)
        return holders(answer.pod_resources)


def device_key(device_id: str) -> str:
    """A plugin device ID without its time-slicing replica suffix (`GPU-…::3` -> `GPU-…`)."""
    return device_id.split("::", 1)[0]


def holders(pods: Iterable[Any]) -> Holders:
    """Device -> holders, each holder once, in the kubelet's order. Containers whose names
    cannot be a consumer name (see `name_part`) are left out: their GPUs keep today's split."""
    found: dict[str, dict[Consumer, None]] = {}
    for pod in pods:
        namespace, pod_name = name_part(pod.namespace), name_part(pod.name)
        if not namespace or not pod_name:
            continue
        for container in pod.containers:
            name = name_part(container.name)
            if not name:
                continue
            holder = Consumer("container", f"{namespace}/{pod_name}/{name}")
            for devices in container.devices:
                if not devices.resource_name.startswith(GPU_RESOURCE_PREFIX):
                    continue
                for device_id in devices.device_ids:
                    if device_id:
                        found.setdefault(device_key(device_id), {})[holder] = None
    return {device: tuple(consumers) for device, consumers in found.items()}


def check_holders(value: object) -> Mapping[str, tuple[Consumer, ...]]:
    """The holders the resolver keeps: what `holders` built, or SourceError."""
    if not isinstance(value, dict):
        raise SourceError("PodResources answer did not parse into holders")
    return value
