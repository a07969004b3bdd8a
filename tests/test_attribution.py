"""Pure attribution: the whole tick (`attribute`) and its per-device split."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.attribution import (
    PLATFORM_SOURCES,
    GpuWeights,
    Policy,
    TickInput,
    attribute,
    counted_devices,
    coverage_ratio,
    follow_split,
    split_energy,
    split_rest,
)
from carbond.types import IDLE, OTHER, Consumer, DeviceDelta

A, B, C = Consumer("unit", "a.service"), Consumer("unit", "b.service"), Consumer("user", "ada")

energy = st.floats(min_value=0.0, max_value=1e7, allow_nan=False)
seconds = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
watts = st.floats(min_value=0.0, max_value=5e3, allow_nan=False)
policy = st.sampled_from(["separate", "proportional"])
usage = st.dictionaries(
    st.builds(
        Consumer, st.sampled_from(["unit", "container", "process"]), st.text(min_size=1, max_size=6)
    ),
    st.floats(min_value=0.0, max_value=1e5, allow_nan=False),
    max_size=30,
)


def close(total: float, expected: float) -> bool:
    return abs(total - expected) <= 1e-9 * max(abs(expected), 1e-300)


@settings(max_examples=400)
@given(energy, seconds, watts, policy, usage)
def test_conservation_and_non_negative(e, dt, p_idle, pol, use) -> None:
    split = split_energy(e, dt, p_idle, pol, use)
    assert close(math.fsum(split.values()), e)
    assert all(v >= 0 for v in split.values())
    assert set(use) <= set(split) and IDLE in split


@settings(max_examples=300)
@given(energy, seconds, watts, policy, usage, st.floats(min_value=0, max_value=1e5))
def test_monotone_in_own_share(e, dt, p_idle, pol, use, extra) -> None:
    use = dict(use)
    use[A] = use.get(A, 0.0)
    before = split_energy(e, dt, p_idle, pol, use)[A]
    use[A] += extra
    after = split_energy(e, dt, p_idle, pol, use)[A]
    assert after >= before - 1e-9 * max(e, 1.0)


@settings(max_examples=300)
@given(energy, seconds, watts, policy, usage, energy)
def test_dram_follows_cpu_split(e, dt, p_idle, pol, use, e_dram) -> None:
    cpu = split_energy(e, dt, p_idle, pol, use)
    dram = follow_split(e_dram, cpu)
    assert close(math.fsum(dram.values()), e_dram)
    assert all(v >= 0 for v in dram.values())
    if e > 0 and e_dram > 0:
        for consumer, joules in cpu.items():
            assert dram[consumer] == pytest.approx(joules / e * e_dram, rel=1e-9, abs=1e-9)


def test_separate_policy_numbers() -> None:
    split = split_energy(100.0, 5.0, 8.0, "separate", {A: 3.0, B: 1.0})
    assert split[IDLE] == pytest.approx(40.0)
    assert split[A] == pytest.approx(45.0)
    assert split[B] == pytest.approx(15.0)


def test_proportional_policy_shares_idle() -> None:
    split = split_energy(100.0, 5.0, 8.0, "proportional", {A: 3.0, B: 1.0})
    assert split[IDLE] == 0.0
    assert split[A] == pytest.approx(75.0)
    assert split[B] == pytest.approx(25.0)


def test_below_idle_baseline_is_all_idle() -> None:
    split = split_energy(30.0, 5.0, 8.0, "separate", {A: 3.0, B: 1.0})
    assert split == {A: 0.0, B: 0.0, IDLE: 30.0}


def test_no_usage_is_all_idle_both_policies() -> None:
    for pol in ("separate", "proportional"):
        split = split_energy(50.0, 5.0, 1.0, pol, {A: 0.0})
        assert split == {A: 0.0, IDLE: 50.0}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        split_energy(1.0, 1.0, 1.0, "greedy", {})
    with pytest.raises(ValueError):
        split_energy(1.0, 1.0, -1.0, "separate", {})


# ---- the whole tick ------------------------------------------------------------------------

def rapl(device: str, component: str, joules: float) -> DeviceDelta:
    return DeviceDelta(component, device, "rapl", joules)


def model(component: str, joules: float) -> DeviceDelta:
    return DeviceDelta(component, component, "model", joules)


def gpu(index: int, joules: float) -> DeviceDelta:
    return DeviceDelta("gpu", f"gpu-{index}", "nvml", joules)


def platform(source: str, joules: float) -> DeviceDelta:
    return DeviceDelta("platform", "platform", source, joules)


def consumer_total(result, component: str | None = None) -> float:
    return math.fsum(j for parts in result.energy.values() for c, j in parts.items()
                     if component is None or c == component)


devices = st.lists(
    st.one_of(
        st.builds(rapl, st.sampled_from(["package-0", "package-1"]), st.just("cpu"), energy),
        st.builds(rapl, st.sampled_from(["dram-0", "dram-1"]), st.just("dram"), energy),
        st.builds(rapl, st.just("psys"), st.just("platform"), energy),
        st.builds(model, st.sampled_from(["cpu", "dram"]), energy),
        st.builds(gpu, st.integers(0, 3), energy),
    ),
    max_size=10,
)
platform_deltas = st.lists(st.builds(platform, st.sampled_from(PLATFORM_SOURCES),
                                     energy | st.just(0.0)), max_size=3)
platform_policy = st.sampled_from(["proportional", "idle"])
components = st.frozensets(st.sampled_from(["cpu", "dram"]))
gpu_weights = st.dictionaries(
    st.sampled_from([f"gpu-{i}" for i in range(4)]), st.builds(GpuWeights, usage, usage),
    max_size=4)


@settings(max_examples=400)
@given(devices, seconds, usage | st.none(), gpu_weights, components, watts, watts, policy,
       st.sampled_from(["off", "auto", "on"]))
def test_attribute_conserves_host_energy(deltas, dt, cpu, gpus, measured, cpu_idle, gpu_idle,
                                         pol, mode) -> None:
    result = attribute(TickInput(dt, deltas, cpu, gpus, measured, cpu_idle, gpu_idle),
                       Policy(pol, mode))
    assert close(consumer_total(result), result.host_joules)
    assert all(j >= 0 for parts in result.energy.values() for j in parts.values())
    # without a platform meter, psys never makes a platform component
    assert "platform" not in {c for parts in result.energy.values() for c in parts}
    assert result.platform_joules is None and result.coverage_ratio is None
    for component in ("cpu", "dram", "gpu"):
        counted = math.fsum(d.joules for d in result.counted if d.component == component)
        assert close(consumer_total(result, component), counted)
    for delta in result.counted:  # the model never adds to a measured component
        assert delta.source != "model" or delta.component not in measured
    if mode == "off":
        assert not result.model_used


def test_model_on_never_adds_to_measured_rapl() -> None:
    """Issue 10: with meters.model.enabled on, 100 J of RAPL came out as 103 J."""
    deltas = [rapl("package-0", "cpu", 100.0), model("cpu", 3.0), model("dram", 1.5)]
    usage_seconds = {A: 1.0, B: 1.0}
    for mode in ("auto", "on"):
        result = attribute(TickInput(1.0, deltas, usage_seconds, measured=frozenset({"cpu"})),
                           Policy(model=mode))
        assert consumer_total(result, "cpu") == pytest.approx(100.0, rel=1e-12)
    # DRAM is not measured here: `on` lets the model stand in for it, `auto` does not.
    on = attribute(TickInput(1.0, deltas, usage_seconds, measured=frozenset({"cpu"})),
                   Policy(model="on"))
    auto = attribute(TickInput(1.0, deltas, usage_seconds, measured=frozenset({"cpu"})),
                     Policy(model="auto"))
    assert consumer_total(on, "dram") == pytest.approx(1.5)
    assert consumer_total(auto, "dram") == 0.0
    assert on.model_used and not auto.model_used


def test_model_stands_in_without_rapl_and_never_when_off() -> None:
    deltas = [model("cpu", 3.0), model("dram", 1.0)]
    for mode in ("auto", "on"):
        result = attribute(TickInput(1.0, deltas, {A: 1.0}), Policy(model=mode))
        assert result.host_joules == pytest.approx(4.0) and result.model_used
    assert attribute(TickInput(1.0, deltas, {A: 1.0}), Policy(model="off")).host_joules == 0.0


def test_a_failed_rapl_read_does_not_let_the_model_in() -> None:
    """A zone read that failed this tick is still measured: its energy comes with the next
    read, so counting the model meanwhile would count that interval twice."""
    counted = counted_devices([model("cpu", 3.0)], frozenset({"cpu", "dram"}), "on")
    assert counted == ()


def test_psys_is_exported_but_never_attributed() -> None:
    deltas = [rapl("package-0", "cpu", 40.0), rapl("dram-0", "dram", 5.0),
              rapl("psys", "platform", 60.0)]
    result = attribute(TickInput(1.0, deltas, {A: 1.0}, measured=frozenset({"cpu", "dram"})),
                       Policy())
    assert result.host_joules == pytest.approx(45.0)
    assert consumer_total(result) == pytest.approx(45.0)
    assert any(d.device == "psys" for d in result.counted)


def test_dram_follows_the_cpu_split_with_idle() -> None:
    deltas = [rapl("package-0", "cpu", 100.0), rapl("dram-0", "dram", 10.0)]
    result = attribute(TickInput(5.0, deltas, {A: 3.0, B: 1.0}, measured=frozenset({"cpu"}),
                                 cpu_idle_watts=8.0), Policy())
    assert result.energy[IDLE]["cpu"] == pytest.approx(40.0)
    assert result.energy[A]["cpu"] == pytest.approx(45.0)
    assert result.energy[IDLE]["dram"] == pytest.approx(4.0)
    assert result.energy[A]["dram"] == pytest.approx(4.5)
    assert result.energy[B]["dram"] == pytest.approx(1.5)


def test_no_cpu_usage_source_gives_dynamic_energy_to_other() -> None:
    result = attribute(TickInput(1.0, [rapl("package-0", "cpu", 30.0)], None,
                                 measured=frozenset({"cpu"}), cpu_idle_watts=10.0), Policy())
    assert result.energy[OTHER]["cpu"] == pytest.approx(20.0)
    assert result.energy[IDLE]["cpu"] == pytest.approx(10.0)


def test_gpu_split_by_sm_then_memory_then_idle() -> None:
    deltas = [gpu(0, 100.0), gpu(1, 50.0), gpu(2, 10.0), gpu(3, 7.0)]
    gpus = {
        "gpu-0": GpuWeights(sm={A: 75 * 30, B: 25 * 30}, memory={A: 1.0, B: 9.0}),
        "gpu-1": GpuWeights(sm={A: 0.0}, memory={A: 1.0, B: 4.0}),  # no samples: memory
        "gpu-2": GpuWeights(),  # no processes: idle
    }  # gpu-3 has no usage at all (query failed): idle
    result = attribute(TickInput(1.0, deltas, {}, gpus), Policy())
    assert result.energy[A]["gpu"] == pytest.approx(75.0 + 10.0)
    assert result.energy[B]["gpu"] == pytest.approx(25.0 + 40.0)
    assert result.energy[IDLE]["gpu"] == pytest.approx(17.0)


def test_gpu_idle_baseline_applies_per_gpu() -> None:
    result = attribute(TickInput(2.0, [gpu(0, 100.0)], {}, {"gpu-0": GpuWeights(sm={A: 1.0})},
                                 gpu_idle_watts=20.0), Policy())
    assert result.energy[IDLE]["gpu"] == pytest.approx(40.0)
    assert result.energy[A]["gpu"] == pytest.approx(60.0)


def test_bad_policy() -> None:
    with pytest.raises(ValueError):
        Policy(idle="greedy")
    with pytest.raises(ValueError):
        Policy(model="sometimes")


def test_worked_example_of_docs_attribution_md() -> None:
    slurm = Consumer("job", "slurm/42")
    deltas = [rapl("package-0", "cpu", 100.0), rapl("dram-0", "dram", 10.0),
              rapl("psys", "platform", 130.0), model("cpu", 20.0), gpu(0, 1500.0)]
    tick = TickInput(5.0, deltas, {A: 3.0, B: 1.0},
                     {"gpu-0": GpuWeights(sm={slurm: 80.0 * 5, B: 20.0 * 5})},
                     measured=frozenset({"cpu", "dram"}), cpu_idle_watts=8.0)
    energy = attribute(tick, Policy()).energy
    assert energy[IDLE] == pytest.approx({"cpu": 40.0, "dram": 4.0, "gpu": 0.0})
    assert energy[A] == pytest.approx({"cpu": 45.0, "dram": 4.5})
    assert energy[B] == pytest.approx({"cpu": 15.0, "dram": 1.5, "gpu": 300.0})
    assert energy[slurm] == pytest.approx({"gpu": 1200.0})


# ---- the platform total (issue 22) -----------------------------------------------------------


@settings(max_examples=600)
@given(devices, platform_deltas, seconds, usage | st.none(), gpu_weights, components, watts,
       watts, policy, st.sampled_from(["off", "auto", "on"]), platform_policy)
def test_conservation_against_the_platform_total(deltas, platforms, dt, cpu, gpus, measured,
                                                 cpu_idle, gpu_idle, pol, mode,
                                                 plat_pol) -> None:
    """Random parts, platform readings and policies: the consumers sum to the host total,
    which is the chosen platform reading (or the parts where they exceed it), never less than
    the platform; no energy is negative; the rest is component platform and nothing else."""
    tick = TickInput(dt, [*deltas, *platforms], cpu, gpus, measured, cpu_idle, gpu_idle)
    result = attribute(tick, Policy(pol, mode, plat_pol))
    assert close(consumer_total(result), result.host_joules)
    assert all(j >= 0 for parts in result.energy.values() for j in parts.values())
    for component in ("cpu", "dram", "gpu"):  # the parts are attributed as without a platform
        counted = math.fsum(d.joules for d in result.counted if d.component == component)
        assert close(consumer_total(result, component), counted)
    readings = [d for d in platforms if d.joules > 0]
    if not readings:
        assert result.platform_joules is None
        assert close(result.host_joules, result.parts_joules)
        assert consumer_total(result, "platform") == 0.0
        return
    chosen = min(readings, key=lambda d: PLATFORM_SOURCES.index(d.source))
    assert result.platform_joules == chosen.joules
    assert result.host_joules >= chosen.joules
    assert close(result.host_joules, max(chosen.joules, result.parts_joules))
    assert close(consumer_total(result, "platform"), result.rest_joules)
    assert result.platform_excess_joules == pytest.approx(
        max(0.0, result.parts_joules - chosen.joules), rel=1e-9, abs=1e-9)
    # exactly one platform meter's energy counted: the exported series sum to the platform
    platform_counted = [d for d in result.counted if d.component == "platform"
                        and d.source in PLATFORM_SOURCES]
    assert math.fsum(d.joules for d in platform_counted) == chosen.joules
    if plat_pol == "idle":
        rest = {c: parts.get("platform", 0.0) for c, parts in result.energy.items()}
        assert all(j == 0.0 for c, j in rest.items() if c != IDLE)


@settings(max_examples=300)
@given(usage, energy, energy, energy)
def test_proportional_rest_follows_each_consumers_energy(use, cpu_j, gpu_j, platform_j) -> None:
    deltas = [rapl("package-0", "cpu", cpu_j), gpu(0, gpu_j), platform("acpi", platform_j)]
    gpus = {"gpu-0": GpuWeights(sm=use)}
    result = attribute(TickInput(1.0, deltas, use, gpus, frozenset({"cpu"})), Policy())
    parts = result.parts_joules
    if parts < 1e-6 or platform_j <= parts:  # subnormal parts: shares are not representable
        return
    rest = platform_j - parts
    for joules in result.energy.values():
        own = math.fsum(j for c, j in joules.items() if c != "platform")
        assert joules.get("platform", 0.0) == pytest.approx(rest * own / parts, rel=1e-9,
                                                            abs=1e-9 * platform_j)


def test_thousand_watt_platform_seven_hundred_watt_parts() -> None:
    """docs/attribution.md's platform example: 1,000 W node, 700 W measured, 300 W rest split
    in proportion to each consumer's measured energy; coverage 0.70."""
    slurm = Consumer("job", "slurm/42")
    deltas = [rapl("package-0", "cpu", 1500.0), rapl("dram-0", "dram", 250.0),
              gpu(0, 1750.0), platform("acpi", 5000.0), rapl("psys", "platform", 2000.0)]
    tick = TickInput(5.0, deltas, {A: 3.0, B: 1.0},
                     {"gpu-0": GpuWeights(sm={slurm: 400.0})},
                     measured=frozenset({"cpu", "dram"}), cpu_idle_watts=60.0)
    result = attribute(tick, Policy())
    energy = result.energy
    assert result.host_joules == pytest.approx(5000.0)
    assert result.coverage_ratio == pytest.approx(0.70)
    assert result.rest_joules == pytest.approx(1500.0)
    assert energy[IDLE] == pytest.approx({"cpu": 300.0, "dram": 50.0, "gpu": 0.0,
                                          "platform": 150.0})
    assert energy[A] == pytest.approx({"cpu": 900.0, "dram": 150.0, "platform": 450.0})
    assert energy[B] == pytest.approx({"cpu": 300.0, "dram": 50.0, "platform": 150.0})
    assert energy[slurm] == pytest.approx({"gpu": 1750.0, "platform": 750.0})
    assert consumer_total(result) == pytest.approx(5000.0, rel=1e-12)
    idle_policy = attribute(tick, Policy(platform="idle")).energy
    assert idle_policy[IDLE]["platform"] == pytest.approx(1500.0)
    assert idle_policy[A].get("platform", 0.0) == 0.0


def test_parts_above_the_platform_give_no_rest_and_count_the_excess() -> None:
    deltas = [rapl("package-0", "cpu", 80.0), gpu(0, 40.0), platform("redfish", 100.0)]
    result = attribute(TickInput(1.0, deltas, {A: 1.0}, {"gpu-0": GpuWeights(sm={B: 1.0})},
                                 frozenset({"cpu"})), Policy())
    assert result.rest_joules == 0.0
    assert result.platform_excess_joules == pytest.approx(20.0)
    assert result.host_joules == pytest.approx(120.0)
    assert consumer_total(result) == pytest.approx(120.0)
    assert consumer_total(result, "platform") == 0.0
    assert result.coverage_ratio == pytest.approx(1.2)


def test_psys_is_never_the_platform_total() -> None:
    deltas = [rapl("package-0", "cpu", 40.0), rapl("psys", "platform", 90.0)]
    result = attribute(TickInput(1.0, deltas, {A: 1.0}, measured=frozenset({"cpu"})), Policy())
    assert result.platform_joules is None and result.host_joules == pytest.approx(40.0)
    assert consumer_total(result, "platform") == 0.0


def test_a_zero_platform_delta_is_no_reading() -> None:
    """A meter's first sighting is a 0 J baseline: the host falls back to the parts that tick
    instead of counting all of them as excess; the 0 J delta is still exported."""
    deltas = [rapl("package-0", "cpu", 40.0), platform("acpi", 0.0)]
    result = attribute(TickInput(1.0, deltas, {A: 1.0}, measured=frozenset({"cpu"})), Policy())
    assert result.platform_joules is None and result.platform_excess_joules == 0.0
    assert result.host_joules == pytest.approx(40.0)
    assert platform("acpi", 0.0) in result.counted


def test_only_the_preferred_platform_meter_counts() -> None:
    deltas = [rapl("package-0", "cpu", 40.0), platform("redfish", 120.0),
              platform("acpi", 100.0), platform("ipmi", 110.0)]
    result = attribute(TickInput(1.0, deltas, {A: 1.0}, measured=frozenset({"cpu"})), Policy())
    assert result.platform_joules == 100.0
    assert [d.source for d in result.counted if d.component == "platform"] == ["acpi"]
    alone = attribute(TickInput(1.0, deltas[:2], {A: 1.0}, measured=frozenset({"cpu"})),
                      Policy())
    assert alone.platform_joules == 120.0


def test_no_parts_at_all_puts_the_whole_platform_on_idle() -> None:
    result = attribute(TickInput(1.0, [platform("ipmi", 300.0)], {A: 1.0}), Policy())
    assert result.energy[IDLE]["platform"] == pytest.approx(300.0)
    assert result.coverage_ratio == 0.0


def test_coverage_and_rest_helpers() -> None:
    assert coverage_ratio(700.0, 1000.0) == pytest.approx(0.7)
    assert coverage_ratio(700.0, 0.0) is None
    assert coverage_ratio(700.0, math.nan) is None
    assert coverage_ratio(math.inf, 10.0) is None
    assert split_rest(0.0, {A: {"cpu": 1.0}}, "proportional") == {IDLE: 0.0}
    assert split_rest(10.0, {}, "proportional") == {IDLE: 10.0}
    with pytest.raises(ValueError):
        split_rest(1.0, {}, "everyone")
    with pytest.raises(ValueError):
        Policy(platform="everyone")


# ---- where the ticks fall --------------------------------------------------------------------

RUN = Consumer("project", "run")


def _run_joules(phase: float, start: float, length: float, background_cores: float,
                package_joules: Callable[[float, float], float], idle_watts: float,
                dram_share: float = 0.125, horizon: float = 30.0) -> float:
    """The run's CPU + DRAM joules over ticks of 1 s at `phase`, the run using one core from
    `start` for `length` seconds beside `background_cores` busy ones. `package_joules(dt,
    busy_core_seconds)` is the hardware; DRAM draws `dram_share` of the package's energy."""
    edges = sorted({0.0, horizon, *(phase + k for k in range(int(horizon) + 1)
                                    if 0 < phase + k < horizon)})
    total = 0.0
    for begin, end in itertools.pairwise(edges):
        dt = end - begin
        run = max(0.0, min(end, start + length) - max(begin, start))
        busy = background_cores * dt + run
        package = package_joules(dt, busy)
        devices = [DeviceDelta("cpu", "package-0", "rapl", package),
                   DeviceDelta("dram", "dram-0", "rapl", dram_share * package)]
        result = attribute(TickInput(dt, devices, {RUN: run, OTHER: background_cores * dt},
                                     measured=frozenset({"cpu", "dram"}),
                                     cpu_idle_watts=idle_watts), Policy())
        total += math.fsum(result.energy.get(RUN, {}).values())
    return total


@settings(max_examples=200, deadline=None)
@given(phase=st.floats(0.0, 0.999), start=st.floats(1.0, 10.0), length=st.floats(0.5, 15.0),
       background=st.floats(0.0, 3.0), idle=st.floats(0.0, 50.0), per_core=st.floats(1.0, 30.0))
def test_power_that_follows_cpu_use_gives_a_run_the_same_joules_wherever_the_ticks_fall(
        phase: float, start: float, length: float, background: float, idle: float,
        per_core: float) -> None:
    """With the idle baseline at the hardware's idle draw, every dynamic joule was drawn by a
    CPU second: a run's joules are its own CPU seconds' whatever the ticks' phase, which is
    why exec (ticks from the run's start) and a daemon (ticks of its own) agree. DRAM, which
    follows the CPU split with its idle share, agrees where its draw has the package's shape."""
    def hardware(dt: float, busy: float) -> float:
        return idle * dt + per_core * busy

    got = _run_joules(phase, start, length, background, hardware, idle)
    assert got == pytest.approx(per_core * 1.125 * length, rel=1e-9)


def test_a_constant_draw_gives_a_run_more_in_the_ticks_it_starts_and_ends_in() -> None:
    """The measured cause of exec and a daemon disagreeing by 2.5-6 % on a constant-power
    stand-in (40 W, idle configured at 10 W): the 30 W above idle follow no CPU second, and a
    tick's dynamic energy goes by that tick's CPU shares, so a tick the run covers only in
    part gives it a larger share of the whole tick than of the part it ran in. Ticks that
    start with the run (exec's) give 1/2 of 30 W; a daemon's at phase 0.41 gives 6.5 % more."""
    def constant(dt: float, busy: float) -> float:
        return 40.0 * dt

    aligned = _run_joules(0.59, 10.59, 5.0, 1.0, constant, 10.0)
    offset = _run_joules(0.0, 10.59, 5.0, 1.0, constant, 10.0)
    assert aligned == pytest.approx(5.0 * 30.0 / 2 * 1.125, rel=1e-9)
    assert offset / aligned == pytest.approx(1.065, abs=0.005)
