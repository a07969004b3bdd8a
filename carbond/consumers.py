"""Who energy is attributed to: a (kind, name) pair, as in DESIGN.md's consumer table."""

from __future__ import annotations

from typing import NamedTuple


class Consumer(NamedTuple):
    kind: str  # unit, container, pod, job, user, project, process, cgroup, idle, other
    name: str  # the `consumer` label value


IDLE = Consumer("idle", "idle")
OTHER = Consumer("other", "other")
