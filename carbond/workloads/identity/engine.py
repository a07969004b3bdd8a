"""Docker and Podman container names from the engine API socket (read-only).

One call, `GET /containers/json?all=true`, lists every container with its ID, names and labels
(Podman's service answers the same Docker-compatible path). A container's name is its first
name without the leading `/`; Compose's project and service come from the labels
`com.docker.compose.project` / `com.docker.compose.service`. Containers that a kubelet runs
through the engine (cri-dockerd) carry `io.kubernetes.*` labels and are named as pods' are.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from carbond.workloads.identity import unixhttp
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import Metadata

DOCKER_SOCKET = "/var/run/docker.sock"
PODMAN_SOCKET = "/run/podman/podman.sock"
LIST_TARGET = "/containers/json?all=true"
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # ~10,000 containers with generous labels
K8S_POD_NAME = "io.kubernetes.pod.name"
K8S_POD_NAMESPACE = "io.kubernetes.pod.namespace"
K8S_POD_UID = "io.kubernetes.pod.uid"
K8S_CONTAINER_NAME = "io.kubernetes.container.name"
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"

Table = dict[tuple[str, str], Metadata]


class EngineSource:
    """The Docker or Podman engine; `name` ("docker", "podman") is also the runtime and the
    `source` label of its errors."""

    per_id = False

    def __init__(self, name: str, socket_path: str,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.name = name
        self.socket_path = socket_path
        self.max_answer_bytes = max_answer_bytes

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Table:
        """Every container the engine lists, keyed (runtime, first 12 hex of the ID)."""
        body = unixhttp.get(self.socket_path, LIST_TARGET, timeout_seconds,
                            self.max_answer_bytes)
        return parse_containers(self.name, body)


def parse_containers(runtime: str, body: bytes) -> Table:
    """The engine's container list; SourceError if it is not one. Entries that are not
    containers (no 64-hex ID) are skipped, the rest kept."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        raise SourceError("answer is not JSON") from None
    if not isinstance(answer, list):
        raise SourceError("answer is not a list of containers")
    table: Table = {}
    for item in answer:
        if not isinstance(item, Mapping):
            continue
        ident = item.get("Id")
        if not isinstance(ident, str) or len(ident) != 64 or not _hex(ident):
            continue
        labels = item.get("Labels")
        labels = labels if isinstance(labels, Mapping) else {}
        table[(runtime, ident[:12])] = container_metadata(runtime, ident, item.get("Names"),
                                                          labels)
    return table


def container_metadata(runtime: str, ident: str, names: object,
                       labels: Mapping[str, object]) -> Metadata:
    name = ""
    if isinstance(names, list) and names and isinstance(names[0], str):
        name = names[0][1:] if names[0].startswith("/") else names[0]
    if all(isinstance(labels.get(k), str) for k in (K8S_POD_NAMESPACE, K8S_POD_NAME)):
        return Metadata(
            namespace=_text(labels.get(K8S_POD_NAMESPACE)), pod=_text(labels.get(K8S_POD_NAME)),
            pod_uid=_text(labels.get(K8S_POD_UID)), container=_text(labels.get(K8S_CONTAINER_NAME)),
            container_id=ident, runtime=runtime)
    return Metadata(container=name, container_id=ident, runtime=runtime,
                    compose_project=_text(labels.get(COMPOSE_PROJECT)),
                    compose_service=_text(labels.get(COMPOSE_SERVICE)))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
