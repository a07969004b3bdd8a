"""Energy -> consumers: one pure function of one tick, `attribute()`.

Everything between the meters' device deltas and joules per consumer is decided here, and
nowhere else: which devices count as host energy (RAPL, or the model standing in where no
counter measures a component, never both; `psys` exported but never attributed), the CPU split
by CPU time with the idle baseline and the idle policy, DRAM following the CPU split, each
GPU's split by its processes' SM utilisation with used memory as the fallback, and, where a
platform meter (acpi, ipmi, redfish) measured the whole node, the rest of the node beyond
the parts as component `platform`, by `attribution.platform`.

Invariant (DESIGN.md): every tick the consumers, `idle` and `other` included, sum to the
host energy within 1e-9 relative: the platform reading where there is one (or the parts, in a
tick where the parts exceed it), else cpu + dram + gpu. Splits are computed share by share and
the rounding remainder is put on the largest part, so `math.fsum` of a split equals its input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from carbond.types import IDLE, OTHER, Consumer, ConsumerEnergy, DeviceDelta

SEPARATE, PROPORTIONAL = "separate", "proportional"
POLICIES = (SEPARATE, PROPORTIONAL)
# meters.model.enabled: off never, auto where the host has no CPU counter at all, on for each
# component (cpu, dram) that no hardware counter measures.
MODEL_OFF, MODEL_AUTO, MODEL_ON = "off", "auto", "on"
MODELLED = ("cpu", "dram")  # the components the model can stand in for
ATTRIBUTED = ("cpu", "dram", "gpu")  # the parts; psys overlaps cpu + dram: exported only
MODEL_SOURCE = "model"
PLATFORM = "platform"
# Whole-node meters, in the order one is preferred when several deliver in a tick: the
# in-band ACPI meter is sampled every second on the host, IPMI in-band through the kernel,
# Redfish over the network at its own slower cadence. Only the chosen one is counted, so the
# exported platform series of these sources sum to the host's platform energy.
PLATFORM_SOURCES = ("acpi", "ipmi", "redfish")
# attribution.platform: the rest of the node in proportion to each consumer's energy of the
# tick (idle included), or all of it to consumer `idle`.
PLATFORM_PROPORTIONAL, PLATFORM_IDLE = "proportional", "idle"
PLATFORM_POLICIES = (PLATFORM_PROPORTIONAL, PLATFORM_IDLE)
BASIS_SM, BASIS_MEMORY = "sm", "memory"

K = TypeVar("K")


class Labelled(Protocol):
    """A device delta or an exported device series: what names a device's reading."""

    component: str
    source: str


@dataclass(frozen=True)
class GpuWeights:
    """Who used one GPU over the tick, two ways; `attribute` picks the basis."""

    sm: Mapping[Consumer, float] = field(default_factory=dict)  # summed SM-utilisation samples
    memory: Mapping[Consumer, float] = field(default_factory=dict)  # used bytes, running procs


@dataclass(frozen=True)
class TickInput:
    """One tick's measurements. `cpu_seconds` None: no CPU usage source (all to `other`)."""

    seconds: float
    devices: Sequence[DeviceDelta]
    cpu_seconds: Mapping[Consumer, float] | None = None
    gpus: Mapping[str, GpuWeights] = field(default_factory=dict)  # "gpu-N" -> weights
    measured: frozenset[str] = frozenset()  # components a hardware counter measures here
    cpu_idle_watts: float = 0.0
    gpu_idle_watts: float = 0.0


@dataclass(frozen=True)
class Policy:
    idle: str = SEPARATE
    model: str = MODEL_AUTO
    platform: str = PLATFORM_PROPORTIONAL

    def __post_init__(self) -> None:
        if self.idle not in POLICIES:
            raise ValueError(f"idle policy must be one of {POLICIES}, not {self.idle!r}")
        if self.model not in (MODEL_OFF, MODEL_AUTO, MODEL_ON):
            raise ValueError(f"model must be off, auto or on, not {self.model!r}")
        if self.platform not in PLATFORM_POLICIES:
            raise ValueError(f"platform policy must be one of {PLATFORM_POLICIES}, "
                             f"not {self.platform!r}")


@dataclass(frozen=True)
class Attribution:
    energy: ConsumerEnergy  # joules per consumer and component
    counted: tuple[DeviceDelta, ...]  # the device deltas that are host energy (exported)
    cpu_joules: float  # host CPU energy of the tick, whichever source counted
    parts_joules: float = 0.0  # cpu + dram + gpu counted, the model included where it stood in
    measured_parts_joules: float = 0.0  # the same from hardware counters only (no model)
    platform_joules: float | None = None  # the platform meter's energy; None: none this tick
    platform_excess_joules: float = 0.0  # parts beyond the platform reading (sampling skew)

    @property
    def host_joules(self) -> float:
        """The host energy, what the consumers sum to: the platform reading where there is
        one (raised to the parts in a tick where they exceed it), else the parts."""
        if self.platform_joules is None:
            return self.parts_joules
        return self.platform_joules + self.platform_excess_joules

    @property
    def rest_joules(self) -> float:
        """Component `platform` of the consumers: the node beyond cpu + dram + gpu."""
        if self.platform_joules is None:
            return 0.0
        return max(0.0, self.platform_joules - self.parts_joules)

    @property
    def coverage_ratio(self) -> float | None:
        """Measured parts / platform for `carbond_host_coverage_ratio`; None without one."""
        if self.platform_joules is None:
            return None
        return coverage_ratio(self.measured_parts_joules, self.platform_joules)

    @property
    def model_used(self) -> bool:
        return any(d.source == MODEL_SOURCE for d in self.counted)


def coverage_ratio(measured_parts_joules: float, platform_joules: float) -> float | None:
    """How much of the node the hardware counters see: None when the platform reading is not
    a positive, finite number. Above 1 in a tick where the parts exceed the platform."""
    if not (math.isfinite(platform_joules) and platform_joules > 0):
        return None
    if not math.isfinite(measured_parts_joules) or measured_parts_joules < 0:
        return None
    return measured_parts_joules / platform_joules


def is_platform_meter(delta: Labelled) -> bool:
    """A whole-node reading (acpi, ipmi, redfish); RAPL's psys is not one."""
    return delta.component == PLATFORM and delta.source in PLATFORM_SOURCES


def platform_delta(devices: Sequence[DeviceDelta]) -> DeviceDelta | None:
    """The platform reading that is the host total this tick: the preferred source's first
    delta with energy (PLATFORM_SOURCES). A delta of 0 J is no reading: it is the baseline a
    meter gives on its first sighting, and a working node never draws nothing."""
    # One pass to find the readings (most ticks have none: RAPL and NVML only), then the
    # preferred source among them; this runs twice a tick over every device.
    readings = [d for d in devices if d.component == PLATFORM and d.source in PLATFORM_SOURCES
                and d.joules > 0 and math.isfinite(d.joules)]
    for source in PLATFORM_SOURCES:
        for delta in readings:
            if delta.source == source:
                return delta
    return None


def model_stands_in(measured: frozenset[str], model: str) -> frozenset[str]:
    """The components the power model counts for, given what the hardware's counters cover:
    none with `off`; with `on` each one no counter measures; with `auto` CPU and DRAM only
    where no counter measures the CPU."""
    if model == MODEL_OFF or (model == MODEL_AUTO and "cpu" in measured):
        return frozenset()
    return frozenset(MODELLED) - measured


def counted_devices(
    devices: Sequence[DeviceDelta], measured: frozenset[str], model: str
) -> tuple[DeviceDelta, ...]:
    """The deltas that are host energy: every hardware delta, and the model's only for the
    components it stands in for. The hardware's view is `measured` (what its counters cover,
    also in a tick where one read failed: that energy arrives with the next read). Of the
    platform meters only the chosen one (`platform_delta`) counts; a 0 J delta of another is
    kept, adding nothing, so its series exists from the start."""
    standing_in = model_stands_in(measured, model)
    chosen = platform_delta(devices)
    return tuple(
        d for d in devices
        if (d.source != MODEL_SOURCE or (d.component in standing_in and d.component in MODELLED))
        and (d.component != PLATFORM or d.source not in PLATFORM_SOURCES or d is chosen
             or d.joules == 0)
    )


def gpu_basis(
    sm: Mapping[K, float], memory: Mapping[K, float]
) -> tuple[str | None, Mapping[K, float]]:
    """SM-utilisation samples where there are any; else the running processes' memory, since
    holding GPU memory still keeps the GPU busy for them; else nothing (the GPU was idle)."""
    if _positive_total(sm) > 0:
        return BASIS_SM, sm
    if _positive_total(memory) > 0:
        return BASIS_MEMORY, memory
    return None, {}


def attribute(tick: TickInput, policy: Policy) -> Attribution:
    """Joules per consumer and component for one tick; see the module docstring."""
    counted = counted_devices(tick.devices, tick.measured, policy.model)
    energy: ConsumerEnergy = {}
    cpu_joules = math.fsum(d.joules for d in counted if d.component == "cpu")
    dram_joules = math.fsum(d.joules for d in counted if d.component == "dram")
    cpu_seconds = {OTHER: 1.0} if tick.cpu_seconds is None else tick.cpu_seconds
    cpu = split_energy(cpu_joules, tick.seconds, tick.cpu_idle_watts, policy.idle, cpu_seconds)
    _add(energy, cpu, "cpu")
    _add(energy, follow_split(dram_joules, cpu), "dram")
    for delta in counted:
        if delta.component != "gpu":
            continue
        weights = tick.gpus.get(delta.device, GpuWeights())
        _, shares = gpu_basis(weights.sm, weights.memory)
        _add(energy, split_energy(delta.joules, tick.seconds, tick.gpu_idle_watts, policy.idle,
                                  shares), "gpu")
    parts = [d for d in counted if d.component in ATTRIBUTED]
    parts_joules = math.fsum(d.joules for d in parts)
    measured_joules = math.fsum(d.joules for d in parts if d.source != MODEL_SOURCE)
    platform = platform_delta(counted)
    if platform is None:
        return Attribution(energy, counted, cpu_joules, parts_joules, measured_joules)
    rest_joules = platform.joules - parts_joules
    for consumer, joules in split_rest(max(0.0, rest_joules), energy, policy.platform).items():
        energy.setdefault(consumer, {})[PLATFORM] = joules  # the first platform part of each
    return Attribution(energy, counted, cpu_joules, parts_joules, measured_joules,
                       platform.joules, max(0.0, -rest_joules))


def split_rest(rest_joules: float, energy: ConsumerEnergy, policy: str) -> dict[Consumer, float]:
    """The node beyond its measured parts, per consumer: `proportional` by each consumer's
    energy of the tick over every component (`idle` included, being a consumer with energy),
    `idle` all to consumer `idle`; with no energy to weigh by, all to `idle` too."""
    if policy not in PLATFORM_POLICIES:
        raise ValueError(f"platform policy must be one of {PLATFORM_POLICIES}, not {policy!r}")
    if rest_joules <= 0 or not math.isfinite(rest_joules):
        return {IDLE: 0.0}
    if policy == PLATFORM_IDLE:
        return {IDLE: rest_joules}
    # shares need no exact sums (the split puts its rounding on the largest part)
    weights = {consumer: sum(parts.values()) for consumer, parts in energy.items()}
    return _split(rest_joules, weights) or {IDLE: rest_joules}


def _positive_total(weights: Mapping[K, float]) -> float:
    return math.fsum(w for w in weights.values() if w > 0 and math.isfinite(w))


def _split(joules: float, weights: Mapping[Consumer, float]) -> dict[Consumer, float]:
    """`joules` in proportion to positive weights; exact sum by putting rounding on the max."""
    positive = {c: w for c, w in weights.items() if w > 0 and math.isfinite(w)}
    total = math.fsum(positive.values())
    if total <= 0:
        return {}
    parts = {c: joules * (w / total) for c, w in positive.items()}
    largest = max(parts, key=parts.__getitem__)
    parts[largest] += joules - math.fsum(parts.values())
    return parts


def _merge(into: dict[Consumer, float], parts: Mapping[Consumer, float]) -> None:
    for consumer, joules in parts.items():
        into[consumer] = into.get(consumer, 0.0) + joules


def _add(energy: ConsumerEnergy, split: Mapping[Consumer, float], component: str) -> None:
    for consumer, joules in split.items():
        parts = energy.setdefault(consumer, {})
        parts[component] = parts.get(component, 0.0) + joules


def split_energy(
    energy_joules: float,
    interval_seconds: float,
    idle_watts: float,
    policy: str,
    usage: Mapping[Consumer, float],
) -> dict[Consumer, float]:
    """One device's energy per consumer, by `usage` weights (CPU seconds, GPU samples).

    Dynamic energy ΔE - P_idle·Δt is split by share; idle energy goes to `idle` (separate) or
    is shared too (proportional). ΔE below the idle baseline is all idle; no usage at all is
    all `idle`. Every consumer in `usage` appears in the result (0.0 if it used nothing) and
    `idle` always does.
    """
    if policy not in POLICIES:
        raise ValueError(f"idle policy must be one of {POLICIES}, not {policy!r}")
    if idle_watts < 0 or interval_seconds < 0:
        raise ValueError("idle_watts and interval_seconds must not be negative")
    result = dict.fromkeys(usage, 0.0)
    result[IDLE] = 0.0
    if energy_joules <= 0 or not math.isfinite(energy_joules):
        result[IDLE] = energy_joules if math.isfinite(energy_joules) else 0.0
        return result
    weights = {c: s for c, s in usage.items() if c != IDLE}
    idle_joules = min(energy_joules, idle_watts * interval_seconds)
    if policy == PROPORTIONAL:
        parts = _split(energy_joules, weights) or {IDLE: energy_joules}
    else:
        parts = _split(energy_joules - idle_joules, weights)
        if parts:
            parts[IDLE] = parts.get(IDLE, 0.0) + idle_joules
        else:
            parts = {IDLE: energy_joules}
    _merge(result, parts)
    return result


def follow_split(energy_joules: float, split: Mapping[Consumer, float]) -> dict[Consumer, float]:
    """Another component's energy (DRAM) with the same shares as a computed CPU split."""
    result = dict.fromkeys(split, 0.0)
    result.setdefault(IDLE, 0.0)
    if energy_joules <= 0 or not math.isfinite(energy_joules):
        result[IDLE] = energy_joules if math.isfinite(energy_joules) else 0.0
        return result
    _merge(result, _split(energy_joules, split) or {IDLE: energy_joules})
    return result
