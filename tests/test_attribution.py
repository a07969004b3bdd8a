"""Pure attribution: conservation, non-negativity, monotone in share; the idle baseline."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.attribution import IdleBaseline, cpu_share, follow_split, split_energy
from carbond.consumers import IDLE, Consumer

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


def test_cpu_share() -> None:
    assert cpu_share({A: 3.0, B: 1.0}) == {A: 0.75, B: 0.25}
    assert cpu_share({A: 0.0}) == {}


def test_idle_baseline_fixed_and_zero() -> None:
    assert IdleBaseline(fixed_watts=0.0).watts() == 0.0
    fixed = IdleBaseline(fixed_watts=12.5)
    fixed.observe(300.0, 0.0)
    assert fixed.watts() == 12.5
    with pytest.raises(ValueError):
        IdleBaseline(fixed_watts=-1)


def test_idle_baseline_learns_low_percentile_over_window() -> None:
    base = IdleBaseline(percentile=5.0, window_seconds=100.0, min_samples=5, max_samples=1000)
    assert base.watts() == 0.0
    for i in range(100):  # 20 W floor with bursts up to 120 W
        base.observe(20.0 + (i % 10) * 10.0, float(i))
    assert base.watts() == pytest.approx(20.0)
    for i in range(100, 300):  # the machine got busier: the old floor leaves the window
        base.observe(60.0 + (i % 10) * 10.0, float(i))
    assert base.watts() == pytest.approx(60.0)
    assert len(base._samples) <= 101


def test_idle_baseline_memory_bounded() -> None:
    base = IdleBaseline(window_seconds=1e9, max_samples=50, min_samples=1)
    for i in range(10_000):
        base.observe(float(i), float(i))
    assert len(base._samples) == 50
