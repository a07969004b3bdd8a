"""Kubernetes names from the node's CRI runtime (containerd, CRI-O): `runtime.v1`.

Two read-only calls list everything on the node: `ListPodSandbox` (pod UID, name, namespace,
and the sandbox ID, the pod's pause container) and `ListContainers` (container ID, its
sandbox, its name). The kubelet writes the same facts as labels (`io.kubernetes.pod.name`,
`io.kubernetes.pod.namespace`, `io.kubernetes.pod.uid`, `io.kubernetes.container.name`);
the metadata fields win, the labels fill in where a runtime leaves them empty. Why the CRI and
not the kubelet or the API server: docs/identity.md.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from carbond.workloads.identity import grpcunix
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import Metadata

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
DEFAULT_SOCKETS = (CONTAINERD_SOCKET, CRIO_SOCKET)
SERVICE = "RuntimeService"
POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
MODULE = "cri_runtime_v1_pb2"

Table = dict[tuple[str, str], Metadata]
"""("pod", UID) -> the pod; ("cri", 12-hex ID) -> a container, or a sandbox as its pod."""


class CriSource:
    """The first of `sockets` that exists (containerd's, then CRI-O's, by default)."""

    name = "cri"
    per_id = False

    def __init__(self, sockets: Sequence[str] = DEFAULT_SOCKETS,
                 max_message_bytes: int = grpcunix.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.sockets = tuple(sockets)
        self.max_message_bytes = max_message_bytes

    def socket(self) -> str:
        """The socket in use now; a runtime installed or restarted later is found again."""
        for path in self.sockets:
            if os.path.exists(path):
                return path
        raise SourceError(f"no CRI socket at {', '.join(self.sockets)}")

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Table:
        grpc, api = grpcunix.load(MODULE)
        with grpcunix.UnixChannel(grpc, self.socket(), timeout_seconds,
                                  self.max_message_bytes) as channel:
            sandboxes = channel.call(grpcunix.method_path(api, SERVICE, "ListPodSandbox"),
                                     api.ListPodSandboxRequest(), api.ListPodSandboxResponse)
            containers = channel.call(grpcunix.method_path(api, SERVICE, "ListContainers"),
                                      api.ListContainersRequest(), api.ListContainersResponse)
        return table(sandboxes.items, containers.containers)


def table(sandboxes: Sequence[Any], containers: Sequence[Any]) -> Table:
    """Pods by UID, sandboxes and containers by 12-hex ID, from the two list answers."""
    result: Table = {}
    pods_by_sandbox: dict[str, Metadata] = {}
    for sandbox in sandboxes:
        labels: Mapping[str, str] = sandbox.labels
        pod = Metadata(
            namespace=sandbox.metadata.namespace or labels.get(POD_NAMESPACE, ""),
            pod=sandbox.metadata.name or labels.get(POD_NAME, ""),
            pod_uid=sandbox.metadata.uid or labels.get(POD_UID, ""))
        if sandbox.id:
            pods_by_sandbox[sandbox.id] = pod
            result[("cri", sandbox.id[:12])] = Metadata(
                namespace=pod.namespace, pod=pod.pod, pod_uid=pod.pod_uid,
                container_id=sandbox.id)
        if pod.pod_uid:
            result[("pod", pod.pod_uid)] = pod
    for container in containers:
        if not container.id:
            continue
        labels = container.labels
        pod = pods_by_sandbox.get(container.pod_sandbox_id, Metadata())
        result[("cri", container.id[:12])] = Metadata(
            namespace=labels.get(POD_NAMESPACE, "") or pod.namespace,
            pod=labels.get(POD_NAME, "") or pod.pod,
            pod_uid=labels.get(POD_UID, "") or pod.pod_uid,
            container=container.metadata.name or labels.get(CONTAINER_NAME, ""),
            container_id=container.id)
    return result

