"""Who a consumer is in its owner's words, and the consumer name that follows from it.

Cgroup paths only carry IDs (`pod/<UID>`, `containerd/<ID12>`, `slurm/<ID>`); the container
runtime, the engine API and Slurm know the names. This module is pure: it turns an ID consumer
and what a source said about it into the named consumer (DESIGN.md's consumer table) and the
labels of `carbond_consumer_info`. Values come from sockets and commands carbond does not
control, so every value is cleaned here: a name part that could forge another name (a `/`, a
control character, nothing at all) is refused and the ID name stands; a metadata value is made
valid UTF-8, visible and bounded.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from carbond.types import Consumer, name_text

LABELS = (
    "namespace", "pod", "pod_uid", "container", "container_id", "runtime", "user", "account",
    "partition", "job_name", "compose_project", "compose_service",
)
"""The metadata labels of `carbond_consumer_info`, in export order (DESIGN.md)."""

MAX_NAME_PART_CHARS = 253  # a Kubernetes DNS subdomain; Docker names are shorter
MAX_LABEL_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HEX_ID = re.compile(r"^[0-9a-f]{12,64}$")
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$|^[0-9a-f]{32}$")
_JOB_ID = re.compile(r"^[0-9]{1,10}$")

CONTAINER_RUNTIMES = ("containerd", "crio", "docker", "podman")  # prefixes naming.py writes
ENGINE_RUNTIMES = ("docker", "podman")  # named RUNTIME/NAME outside Kubernetes


class Metadata(NamedTuple):
    """What is known about one consumer; "" where a field does not apply or is unknown. A
    tuple, fields in LABELS order: thousands are made per list, and a tuple is made fast."""

    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""
    container: str = ""
    container_id: str = ""
    runtime: str = ""
    user: str = ""
    account: str = ""
    partition: str = ""
    job_name: str = ""
    compose_project: str = ""
    compose_service: str = ""

    def labels(self) -> dict[str, str]:
        """The `carbond_consumer_info` labels that apply (non-empty), in LABELS order."""
        return {name: value for name, value in zip(LABELS, self, strict=True) if value}

    def merged(self, other: Metadata) -> Metadata:
        """This metadata with every field `other` knows taking precedence."""
        return Metadata._make([theirs or mine for mine, theirs in zip(self, other, strict=True)])


EMPTY = Metadata()


class Identity(NamedTuple):
    """A consumer as it is exported: its (possibly renamed) consumer and its metadata."""

    consumer: Consumer
    metadata: Metadata


def label_value(raw: object) -> str:
    """A metadata value from an outside source as a label value: text that encodes as UTF-8
    (lone surrogates escaped, as `name_text` does), control characters written as `\\xNN`,
    at most MAX_LABEL_CHARS characters. Anything but a string or an integer is ""."""
    if isinstance(raw, str) and raw.isascii() and raw.isprintable():
        return raw[:MAX_LABEL_CHARS]  # the common case, and the fast one
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        return ""
    text = name_text(str(raw))
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)
    return text[:MAX_LABEL_CHARS]


def name_part(raw: object) -> str | None:
    """One part of a consumer name (a namespace, a pod, a container, an engine name), or None
    when it cannot be one: not a string, empty, longer than MAX_NAME_PART_CHARS, or holding a
    `/` (which would let `a/b` + `c` pass for `a` + `b/c`), a control character or a lone
    surrogate. Refused rather than altered, so two different answers never make one name."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_NAME_PART_CHARS:
        return None
    if "/" in raw or _CONTROL.search(raw) or name_text(raw) != raw:
        return None
    return raw


def id_key(consumer: Consumer) -> tuple[str, str] | None:
    """The (space, ID) a source can resolve for an ID-named consumer, else None: ("pod",
    UID), (runtime, 12-hex ID) for containers, ("slurm", job ID)."""
    kind, name = consumer
    prefix, slash, ident = name.partition("/")
    if not slash:
        return None
    if kind == "pod" and prefix == "pod" and _UID.match(ident):
        return ("pod", ident)
    if kind == "container" and prefix in CONTAINER_RUNTIMES and _HEX_ID.match(ident):
        return (prefix, ident[:12])
    if kind == "job" and prefix == "slurm" and _JOB_ID.match(ident):
        return ("slurm", ident)
    return None


def id_metadata(key: tuple[str, str] | None) -> Metadata:
    """What the ID itself says, before any source answers."""
    if key is None:
        return EMPTY
    space, ident = key
    if space == "pod":
        return Metadata(pod_uid=ident)
    if space in CONTAINER_RUNTIMES:
        return Metadata(container_id=ident, runtime=space)
    return EMPTY


def named(consumer: Consumer, metadata: Metadata) -> Consumer:
    """The consumer DESIGN.md's table names from `metadata`, or `consumer` unchanged where the
    metadata does not name it (the ID name stands).

    kind `pod`: NAMESPACE/POD. kind `container` in a pod: NAMESPACE/POD/CONTAINER; a pod's
    sandbox (pause) container, which has a pod but no container name: the pod, NAMESPACE/POD,
    kind `pod`. Docker and Podman outside Kubernetes: RUNTIME/NAME. Slurm jobs keep slurm/ID.
    """
    return name_for(consumer.kind, metadata) or consumer


def name_for(kind: str, metadata: Metadata) -> Consumer | None:
    """`named` for a consumer of `kind`; None where the ID name stands."""
    if kind not in ("pod", "container"):
        return None
    namespace, pod = name_part(metadata.namespace), name_part(metadata.pod)
    if kind == "pod":
        return Consumer("pod", f"{namespace}/{pod}") if namespace and pod else None
    container = name_part(metadata.container)
    if namespace and pod:
        if container:
            return Consumer("container", f"{namespace}/{pod}/{container}")
        return Consumer("pod", f"{namespace}/{pod}")
    if container and metadata.runtime in ENGINE_RUNTIMES:
        return Consumer("container", f"{metadata.runtime}/{container}")
    return None


def clean(metadata: Metadata) -> Metadata:
    """Every field through `label_value`: what a source parsed, fit to export."""
    return Metadata._make([label_value(value) if value else "" for value in metadata])
