"""A measured tick priced in CO2e: the `carbon` stage of DESIGN.md's pipeline. Pure, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from carbond.carbon.embodied import embodied_grams_per_second, share_embodied
from carbond.carbon.emissions import grams
from carbond.carbon.intensity import Intensity
from carbond.types import Consumer, ConsumerEnergy, DeviceDelta, TickRecord


@dataclass(frozen=True)
class Pricing:
    """What turns joules into grams: the facility's PUE and the host's embodied carbon."""

    pue: float = 1.0
    embodied_grams_per_second: float = 0.0

    @classmethod
    def from_config(cls, pue: float, embodied_kgco2e: float, lifetime_seconds: float
                    ) -> Pricing:
        return cls(pue, embodied_grams_per_second(embodied_kgco2e, lifetime_seconds))


def account(energy: ConsumerEnergy, devices: Sequence[DeviceDelta], seconds: float,
            wall_time: float, intensity: Intensity | None, pricing: Pricing,
            metadata: Mapping[Consumer, Mapping[str, str]] | None = None) -> TickRecord:
    """The tick's energy with its grams at the intensity valid during it (none yet: no grams),
    and the embodied grams of its seconds shared by energy; `metadata` (each consumer's
    owner labels, where known) is carried as it is."""
    consumer_grams: dict[Consumer, float] = {}
    if intensity is not None:  # only consumers that used energy: most cgroups idle most ticks
        for consumer, parts in energy.items():
            joules = math.fsum(parts.values())
            if joules > 0:
                consumer_grams[consumer] = grams(joules, intensity.grams_per_kwh, pricing.pue)
    embodied = share_embodied(pricing.embodied_grams_per_second * seconds, energy)
    return TickRecord(
        wall_time, seconds, energy, consumer_grams, embodied, tuple(devices),
        intensity.grams_per_kwh if intensity else None, intensity.provider if intensity else None,
        metadata if metadata is not None else {})
