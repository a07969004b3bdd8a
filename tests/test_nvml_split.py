"""GPU attribution's parts: the energy split, pid -> cgroup parsing, pid -> consumer."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.attribution import GpuWeights, Policy, TickInput, attribute
from carbond.types import IDLE, OTHER, Consumer, DeviceDelta
from carbond.workloads.gpu import (
    PidConsumers,
    consumer_weights,
    memory_weights,
    pid_cgroup,
)
from tests.cgroup_helpers import TestTree, available


def split_gpu_energy(joules: float, weights: dict[Consumer, float]) -> dict[Consumer, float]:
    """One GPU's tick through `attribute` (no idle baseline configured), zero entries left out."""
    tick = TickInput(1.0, [DeviceDelta("gpu", "gpu-0", "nvml", joules)], {},
                     {"gpu-0": GpuWeights(sm=weights)})
    split = attribute(tick, Policy()).energy
    return {consumer: parts["gpu"] for consumer, parts in split.items() if parts.get("gpu")}


consumers = st.builds(Consumer, st.sampled_from(["unit", "job", "container"]),
                      st.text("abcdef0123456789", min_size=1, max_size=6))
weights = st.dictionaries(consumers, st.floats(0, 1e12, allow_nan=False), max_size=40)
energies = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)


@given(energies, weights)
def test_split_conserves_energy_and_is_non_negative(joules: float,
                                                    shares: dict[Consumer, float]) -> None:
    split = split_gpu_energy(joules, shares)
    assert math.fsum(split.values()) == pytest.approx(joules, rel=1e-9, abs=1e-12)
    assert all(value >= 0 for value in split.values())
    assert set(split) <= set(shares) | {IDLE}


@given(energies, weights)
def test_split_is_proportional(joules: float, shares: dict[Consumer, float]) -> None:
    split = split_gpu_energy(joules, shares)
    total = math.fsum(w for w in shares.values() if w > 0)
    if total > 0:
        for consumer, value in split.items():
            # share / total first: joules * 5e-324 underflows to 0 before the division
            assert value == pytest.approx(joules * (shares[consumer] / total), rel=1e-6,
                                          abs=1e-6)


def test_no_weights_is_all_idle() -> None:
    assert split_gpu_energy(12.5, {}) == {IDLE: 12.5}
    assert split_gpu_energy(12.5, {Consumer("unit", "a.service"): 0.0}) == {IDLE: 12.5}
    assert split_gpu_energy(12.5, {Consumer("unit", "a.service"): math.nan}) == {IDLE: 12.5}


def test_three_to_one() -> None:
    a, b = Consumer("job", "slurm/1"), Consumer("job", "slurm/2")
    assert split_gpu_energy(100.0, {a: 75 * 30, b: 25 * 30}) == {a: 75.0, b: 25.0}


def test_memory_weights_fall_back_to_equal_shares() -> None:
    assert memory_weights([(1, 100, 0), (2, 300, 0)]) == {1: 100.0, 2: 300.0}
    assert memory_weights([(1, None, 0), (2, None, 0)]) == {1: 1.0, 2: 1.0}


def write_cgroup(root: Path, pid: int, text: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(text)


def test_pid_cgroup_v2_v1_and_hybrid(tmp_path: Path) -> None:
    write_cgroup(tmp_path, 1, "0::/system.slice/slurmstepd.scope/job_42/step_0\n")
    write_cgroup(tmp_path, 2, "12:pids:/x\n3:cpu,cpuacct:/slurm/uid_0/job_7/step_0\n"
                              "1:name=systemd:/y\n")
    write_cgroup(tmp_path, 3, "4:cpu,cpuacct:/docker/0123456789abcdef\n0::/\n")
    write_cgroup(tmp_path, 4, "4:cpu,cpuacct:/\n0::/user.slice/user-1000.slice/session-1.scope\n")
    write_cgroup(tmp_path, 5, "0::/gone.scope (deleted)\n")
    assert pid_cgroup(1, tmp_path) == "/system.slice/slurmstepd.scope/job_42/step_0"
    assert pid_cgroup(2, tmp_path) == "/slurm/uid_0/job_7/step_0"
    assert pid_cgroup(3, tmp_path) == "/docker/0123456789abcdef"
    assert pid_cgroup(4, tmp_path) == "/user.slice/user-1000.slice/session-1.scope"
    assert pid_cgroup(5, tmp_path) == "/gone.scope"
    assert pid_cgroup(6, tmp_path) is None


def test_consumer_weights_merge_pids_of_one_consumer(tmp_path: Path) -> None:
    write_cgroup(tmp_path, 10, "0::/job/a\n")
    write_cgroup(tmp_path, 11, "0::/job/a\n")
    write_cgroup(tmp_path, 12, "0::/job/b\n")
    to_consumer = PidConsumers(lambda path: Consumer("cgroup", path), "/", tmp_path)
    pid_weights = {10: 30.0, 11: 20.0, 12: 50.0, 13: 5.0}
    assert consumer_weights(pid_weights, to_consumer) == {
        Consumer("cgroup", "job/a"): 50.0, Consumer("cgroup", "job/b"): 50.0, OTHER: 5.0}


def test_pid_consumers_see_a_process_move_and_exit_at_once() -> None:
    """PidConsumers keeps /proc/PID/cgroup open between calls: a move to another cgroup and
    an exit must still show on the very next call."""
    why = available("v2")
    if why:
        pytest.skip(why)
    tree = TestTree("v2")
    child = subprocess.Popen(["sleep", "600"])
    try:
        tree.make("job/a")
        tree.make("job/b")
        Path(tree.procs("job/a")).write_text(str(child.pid))
        rel = "/" + os.path.relpath(tree.root, tree.base)
        to_consumer = PidConsumers(lambda path: Consumer("cgroup", path), rel)
        assert to_consumer(child.pid) == Consumer("cgroup", "job/a")
        Path(tree.procs("job/b")).write_text(str(child.pid))
        assert to_consumer(child.pid) == Consumer("cgroup", "job/b")
        child.kill()
        child.wait()
        assert to_consumer(child.pid) == OTHER
    finally:
        child.kill()
        child.wait()
        tree.cleanup()
