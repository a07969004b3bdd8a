"""Real cgroups, real burners: carbond's per-cgroup CPU time against the kernel's counters."""

from __future__ import annotations

import math
import os
import time

import pytest

from carbond.attribution import split_energy
from carbond.types import IDLE, ConfigError, Consumer
from carbond.workloads.cgroups import (
    CgroupReader,
    cgroup_root,
    detect_cgroup_root,
    read_usage_tree,
    tree_delta,
)
from carbond.workloads.naming import CgroupNamer
from tests.cgroup_helpers import TestTree, random_id, random_uid
from tests.helpers import wait_for

HIERARCHIES = ["v2", "v1"]



def reader_for(tree: TestTree) -> CgroupReader:
    return CgroupReader(cgroup_root(tree.root), CgroupNamer())


def paths(hierarchy: str) -> dict[str, tuple[str, Consumer, float]]:
    docker, ctr, uid = random_id(), random_id(), random_uid()
    slurm = (
        "system.slice/slurmstepd.scope/job_4242/step_0"
        if hierarchy == "v2"
        else "slurm/uid_0/job_4242/step_0"
    )
    return {
        "svc": ("system.slice/x.service", Consumer("unit", "x.service"), 0.12),
        "docker": (
            f"system.slice/docker-{docker}.scope",
            Consumer("container", f"docker/{docker[:12]}"),
            0.08,
        ),
        "k8s": (
            f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{uid.replace('-', '_')}.slice/cri-containerd-{ctr}.scope",
            Consumer("container", f"containerd/{ctr[:12]}"),
            0.06,
        ),
        "slurm": (slurm, Consumer("job", "slurm/4242"), 0.04),
        "user": ("user.slice/user-0.slice/session-1.scope", Consumer("user", "root"), 0.02),
    }


def test_shares_match_kernel_accounting(tree: TestTree) -> None:
    layout = paths(tree.hierarchy)
    for rel, _, duty in layout.values():
        tree.make(rel)
        tree.burners.start(duty, tree.procs(rel))
    assert wait_for(lambda: all(tree.usage_seconds(rel) > 0 for rel, _, _ in layout.values()))
    reader = reader_for(tree)
    before = {k: tree.usage_seconds(rel) for k, (rel, _, _) in layout.items()}
    assert reader.tick().baseline
    time.sleep(3.0)
    tick = reader.tick()
    after = {k: tree.usage_seconds(rel) for k, (rel, _, _) in layout.items()}

    kernel = {layout[k][1]: after[k] - before[k] for k in layout}
    kernel_total = sum(kernel.values())
    ours_total = sum(tick.usage.values()) + tick.root_own_cpu_seconds
    for consumer, seconds in kernel.items():
        assert tick.usage[consumer] / ours_total == pytest.approx(
            seconds / kernel_total, abs=0.02
        ), consumer
    # energy at constant host power: conservation is exact
    dt, host_watts = 3.0, 40.0
    split = split_energy(host_watts * dt, dt, 10.0, "separate", tick.usage)
    assert math.isclose(math.fsum(split.values()), host_watts * dt, rel_tol=1e-9)
    assert split[IDLE] == pytest.approx(10.0 * dt)


def test_cgroup_created_and_removed_between_ticks_keeps_its_time(tree: TestTree) -> None:
    """A container that lives only between two ticks still gets its CPU time, by name."""
    ident = random_id()
    rel = f"system.slice/docker-{ident}.scope"
    tree.make("system.slice")
    reader = reader_for(tree)
    reader.tick()
    tree.make(rel)
    proc = tree.burners.start(0.3, tree.procs(rel))
    assert wait_for(lambda: tree.usage_seconds(rel) >= 0.3, timeout=30)
    tree.burners.kill(proc)
    kernel = tree.usage_seconds(rel)
    tree.remove(rel)
    tick = reader.tick()
    container = Consumer("container", f"docker/{ident[:12]}")
    assert kernel > 0.05
    assert tick.usage[container] == pytest.approx(kernel, rel=0.02, abs=0.005)


def test_cgroup_removed_after_its_last_reading(tree: TestTree) -> None:
    ident, uid = random_id(), random_uid()
    pod_uid = uid.replace("-", "_")
    pod = f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_uid}.slice"
    rel = f"{pod}/crio-{ident}.scope"
    tree.make(rel)
    proc = tree.burners.start(0.3, tree.procs(rel))
    assert wait_for(lambda: tree.usage_seconds(rel) > 0)
    reader = reader_for(tree)
    reader.tick()
    seen = tree.usage_seconds(rel)
    assert wait_for(lambda: tree.usage_seconds(rel) >= seen + 0.2, timeout=30)
    tree.burners.kill(proc)
    final = tree.usage_seconds(rel)
    tree.remove(pod)  # the whole pod goes: the container still names the time
    tick = reader.tick()
    assert tick.usage[Consumer("container", f"crio/{ident[:12]}")] == pytest.approx(
        final - seen, rel=0.02, abs=0.005
    )


def test_cached_listings_and_open_counters_follow_the_tree(tree: TestTree) -> None:
    """The walk re-lists only directories inotify reports changed and keeps counter files
    open; neither may hide a change: nested cgroups made after a tick are found, and a cgroup
    removed and made again under its name is read from its new counter, not the old one."""
    tree.make("system.slice")
    reader = reader_for(tree)
    base = reader.tick().cgroups
    tree.make("system.slice/a.service/sub")
    tick = reader.tick()
    assert tick.cgroups == base + 2 and Consumer("unit", "a.service") in tick.usage

    rel, unit = "system.slice/b.service", Consumer("unit", "b.service")
    tree.make(rel)
    proc = tree.burners.start(0.5, tree.procs(rel))
    assert wait_for(lambda: tree.usage_seconds(rel) >= 0.2, timeout=30)
    tree.burners.kill(proc)
    assert reader.tick().usage[unit] > 0.05  # b's counter file is now held open
    tree.remove(rel)
    tree.make(rel)
    proc = tree.burners.start(0.3, tree.procs(rel))
    assert wait_for(lambda: tree.usage_seconds(rel) >= 0.2, timeout=30)
    tree.burners.kill(proc)
    kernel = tree.usage_seconds(rel)
    tick = reader.tick()
    assert kernel > 0.05
    assert tick.usage[unit] == pytest.approx(kernel, rel=0.02, abs=0.005)

    tree.remove("system.slice/a.service")
    reader.tick()
    tick = reader.tick()
    assert tick.cgroups == base + 1 and Consumer("unit", "a.service") not in tick.usage
    reader.close()


def test_tree_delta_pure() -> None:
    prev = {"": 10.0, "a": 4.0, "a/x": 3.0, "b": 1.0, "c": 5.0}
    cur = {"": 20.0, "a": 9.0, "b": 2.0, "c": 1.0, "d": 2.0}
    delta = tree_delta(prev, cur, born=["a/y", "a/y/z"])
    # a/x vanished, a/y and a/y/z lived between ticks, c was recreated (counter restarted)
    assert delta.vanished == {"a": ["a/x", "a/y/z"], "": ["c"]}
    assert delta.own["a"] == 5.0
    assert delta.own["c"] == 1.0 and delta.own["d"] == 2.0
    assert delta.own[""] == pytest.approx(10.0 - 5.0 - 1.0 - 1.0 - 2.0)
    assert all(v >= 0 for v in delta.own.values())


def test_detect_and_configured_roots(tmp_path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cpu.stat").write_text("usage_usec 1\n")
    assert detect_cgroup_root(sys_root=str(tmp_path)).mode == "hybrid"
    (tmp_path / "cgroup.controllers").write_text("cpu\n")
    assert detect_cgroup_root(sys_root=str(tmp_path)).mode == "v2"
    with pytest.raises(ConfigError) as info:
        detect_cgroup_root(override=str(tmp_path / "nowhere"))
    assert info.value.key == "cgroup_root"
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpuacct.usage").write_text("5000000000\n")
    root = cgroup_root(str(v1))
    assert root.hierarchy == "v1" and read_usage_tree(root) == {"": 5.0}


def test_host_root_is_detected() -> None:
    if not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("no /sys/fs/cgroup")
    root = detect_cgroup_root()
    assert root.mode in ("v1", "v2", "hybrid")
    assert "" in read_usage_tree(root)
