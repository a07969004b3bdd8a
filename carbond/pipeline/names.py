"""ID consumers renamed from the metadata resolver's cache, once a tick, never waiting on it.

Cgroups name consumers by ID (`containerd/3a9b2c…`, `pod/<UID>`); the resolver's source
threads learn the names owners use (`team-a/web/nginx`). Each tick the CPU seconds and the GPU
weights are renamed *before* attribution, so every joule is split once among the named
consumers: two IDs that name one consumer (a pod's cgroup and its pause container) have their
weights summed, never their energy copied. A GPU the kubelet gave to exactly one container is
that container's whole (`identity.gpus.held_weights`); a shared one keeps its SM split.

What is known of each consumer's owner (its `carbond_consumer_info` labels) is kept here, by
consumer as exported, for the tick's `TickRecord.metadata` and for budgets by owner.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from carbond.attribution import GpuWeights
from carbond.types import Consumer
from carbond.workloads.identity.gpus import (
    GpuIdentity,
    devices_by_id,
    held_weights,
    holders_by_device,
)
from carbond.workloads.identity.metadata import Identity

log = logging.getLogger(__name__)

MAX_CONSUMERS = 65536  # consumers remembered (as the resolver): churn starts over, bounded
LOG_EVERY = 1000
NO_LABELS: Mapping[str, str] = MappingProxyType({})


class Resolver(Protocol):
    """What a tick needs of `identity.resolver.MetadataResolver`: both calls never block."""

    def lookup(self, consumer: Consumer) -> Identity: ...

    def settled(self, consumer: Consumer) -> bool: ...

    def gpu_holders(self) -> Mapping[str, tuple[Consumer, ...]]: ...

    def errors(self) -> Mapping[str, int]: ...


class Names:
    """The tick thread's view of the resolver: `usage` and `gpus` rename a tick's inputs,
    `metadata` gives the labels of the consumers a tick attributed energy to."""

    def __init__(self, resolver: Resolver | None, max_consumers: int = MAX_CONSUMERS) -> None:
        self.resolver = resolver
        self._max = max_consumers
        # ID consumer -> (the resolver's answer it was made from, the consumer it is now)
        self._seen: dict[Consumer, tuple[Identity, Consumer]] = {}
        # ID consumer -> its name for good (the resolver will not change it): not asked again
        self._settled: dict[Consumer, Consumer] = {}
        self._labels: dict[tuple[str, str], Mapping[str, str]] = {}  # as exported -> labels
        self.failures = 0  # ticks whose names failed (a bug): they kept their ID names

    def use(self, resolver: Resolver | None) -> None:
        """Another resolver from the next tick on (a reload of `metadata`). Names already
        known stay (an ID's name does not change with the source that told it); none: the
        ID names, as with `metadata.enabled: off`."""
        self.resolver = resolver
        self._seen.clear()
        if resolver is None:
            self._settled.clear()
            self._labels.clear()

    def labels(self, consumer: tuple[str, str]) -> Mapping[str, str]:
        """The consumer's metadata labels as last known, {} when none (budgets' lookup)."""
        return self._labels.get(consumer, NO_LABELS)

    def name(self, consumer: Consumer) -> Consumer:
        """The consumer as it is known now (the resolver answers from memory)."""
        resolver = self.resolver
        if resolver is None:
            return consumer
        identity = resolver.lookup(consumer)
        seen = self._seen.get(consumer)
        if seen is not None and seen[0] is identity:
            return seen[1]
        if len(self._seen) >= self._max:
            self._seen.clear()
            self._settled.clear()
        named = identity.consumer
        self._seen[consumer] = (identity, named)
        if resolver.settled(consumer):
            self._settled[consumer] = named
        labels = identity.metadata.labels()
        # Several IDs may name one consumer (a pod and its pause container): the one of the
        # same kind (the pod's own cgroup) says what the consumer's labels are.
        if labels and (named.kind == consumer.kind or named not in self._labels):
            if len(self._labels) >= self._max:
                self._labels.clear()
            self._labels[named] = labels
        return named

    def usage(self, seconds: Mapping[Consumer, float]) -> dict[Consumer, float]:
        """CPU seconds (or any weights) by named consumer, summed where IDs meet."""
        if self.resolver is None:
            return dict(seconds)
        named: dict[Consumer, float] = {}
        # one dict look-up a consumer whose name is settled (nearly all, every tick)
        settled, name, add = self._settled.get, self.name, named.get
        for consumer, value in seconds.items():
            key = settled(consumer) or name(consumer)
            named[key] = add(key, 0.0) + value
        return named

    def gpus(self, weights: Mapping[str, GpuWeights],
             gpus: Iterable[GpuIdentity]) -> dict[str, GpuWeights]:
        """Each GPU's weights by named consumer, and a GPU held by one container its whole."""
        if self.resolver is None:
            return dict(weights)
        renamed = {device: GpuWeights(self.usage(w.sm), self.usage(w.memory))
                   for device, w in weights.items()}
        devices = devices_by_id(gpus)
        if not devices:  # no GPU: the kubelet is never asked
            return renamed
        holders = self.resolver.gpu_holders()
        if not holders:
            return renamed
        return held_weights(renamed, holders_by_device(holders, devices))

    def metadata(self, energy: Mapping[Consumer, Mapping[str, float]]
                 ) -> dict[Consumer, Mapping[str, str]]:
        """TickRecord.metadata: the labels of the consumers that used energy in the tick and
        whose owner is known (an idle cgroup's labels are not repeated every tick)."""
        known = self._labels
        if not known:
            return {}
        return {c: known[c] for c, parts in energy.items() if c in known and any(parts.values())}

    def errors(self) -> Mapping[str, int]:
        """Failed calls per metadata source (carbond_metadata_errors_total)."""
        return self.resolver.errors() if self.resolver is not None else {}

    def failed(self) -> None:
        """A tick's naming raised (a bug, not a source: sources never raise into a tick)."""
        self.failures += 1
        if self.failures % LOG_EVERY == 1:  # the first, then one in LOG_EVERY: no log flood
            log.exception("naming consumers failed (%d ticks so far); this tick keeps the ID "
                          "names", self.failures)
