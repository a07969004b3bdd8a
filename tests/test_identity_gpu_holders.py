"""Issue 20's GPU done-when, through the real parts: the stand-in libnvidia-ml (real pynvml,
carbond's NVML meter and usage tracker in a child process), the stand-in CRI and PodResources
servers, the resolver, `held_weights` and `attribute`. A GPU held by one container with no
NVML process samples goes 100% to it; two containers time-sharing a GPU get their SM shares;
each GPU's consumers sum to its energy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from carbond.attribution import GpuWeights, Policy, TickInput, attribute
from carbond.meters.nvml import GpuInfo, MigInstance
from carbond.pipeline.deltas import DeviceDelta
from carbond.types import IDLE, Consumer
from carbond.workloads.identity.cri import CriSource
from carbond.workloads.identity.gpus import devices_by_id, held_weights, holders_by_device
from carbond.workloads.identity.podresources import PodResourcesSource
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.naming import consumer_for_cgroup
from tests.fakes.nvml import Driver, FakeGpu, FakeProcess, Scenario, samples_for
from tests.identity_servers import CriServer, PodResourcesServer, three_namespaces

HELD = "GPU-11111111-2222-3333-4444-555555555555"  # team-a/trainer-0/pytorch, alone
SHARED = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"  # two ml-prod triton replicas


def fake_proc(root: Path, pid: int, cgroup: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(f"0::/{cgroup}\n")


@pytest.fixture
def node(tmp_path):
    directory = tmp_path / "s"
    directory.mkdir()
    pods = three_namespaces()
    cri = CriServer(str(directory / "cri.sock"), pods).start()
    kubelet = PodResourcesServer(str(directory / "kubelet.sock"), pods).start()
    try:
        yield cri, kubelet, pods
    finally:
        cri.stop()
        kubelet.stop()


def test_held_gpu_goes_whole_to_its_container_and_shared_gpu_by_sm(node, fake_lib, tmp_path):
    cri, kubelet, pods = node
    triton_a, triton_b = pods[2], pods[3]
    proc = tmp_path / "proc"
    for pid, p in ((4001, triton_a), (4002, triton_b)):
        fake_proc(proc, pid, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                  f"{p.uid.replace('-', '_')}.slice/cri-containerd-{p.containers[0].id}.scope")
    scenario = Scenario(
        gpus=[FakeGpu(0, HELD, energy_millijoules=1_000_000),
              FakeGpu(1, SHARED, energy_millijoules=2_000_000)],
        processes=[FakeProcess(1, 4001, 2 << 30), FakeProcess(1, 4002, 2 << 30)],
        samples=[*samples_for(1, 4001, 60, 1_000_000, 6), *samples_for(1, 4002, 20, 1_000_001, 6)])
    path = tmp_path / "scenario.txt"
    scenario.write(path)
    with Driver(fake_lib, path, proc_root=str(proc), fake_clock=True) as driver:
        driver.call("usage")  # the baseline sample
        first = driver.call("read")["devices"]
        scenario.gpu(0).energy_millijoules += 500_000  # 500 J, and no process on it at all
        scenario.gpu(1).energy_millijoules += 800_000  # 800 J
        scenario.samples += [*samples_for(1, 4001, 60, 2_000_000, 6),
                             *samples_for(1, 4002, 20, 2_000_001, 6)]
        scenario.write(path)
        driver.call("advance", seconds=5)  # the GPUs drew that over 5 s, as hardware can
        usage = driver.call("usage")
        second = driver.call("read")["devices"]
        infos = [GpuInfo(**{**g, "mig_instances": tuple(MigInstance(**m)
                                                        for m in g["mig_instances"])})
                 for g in driver.call("gpus")]
    assert usage["gpu-0"]["basis"] is None  # NVML says nothing about GPU 0
    assert usage["gpu-1"]["basis"] == "sm", usage

    resolver = MetadataResolver([CriSource([cri.socket_path]),
                                 PodResourcesSource(kubelet.socket_path)], min_list_seconds=0.0)
    resolver.start()
    try:
        def name(label: str) -> Consumer:  # the driver names pids by cgroup path
            return resolver.lookup(consumer_for_cgroup(label.split(":", 1)[1])).consumer

        pids = list(usage["gpu-1"]["consumers"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                len(resolver.gpu_holders()) < 2
                or {name(c).name.count("/") for c in pids} != {2}):
            time.sleep(0.02)
        nvml = {device: GpuWeights(sm={name(c): w for c, w in u["consumers"].items()}
                                   if u["basis"] == "sm" else {})
                for device, u in usage.items()}
        holders = holders_by_device(resolver.gpu_holders(), devices_by_id(infos))
    finally:
        resolver.stop()
    pytorch = Consumer("container", "team-a/trainer-0/pytorch")
    a = Consumer("container", "ml-prod/infer-5f6/triton")
    b = Consumer("container", "ml-prod/infer-9x2/triton")
    assert holders == {"gpu-0": frozenset({pytorch}), "gpu-1": frozenset({a, b})}
    deltas = [DeviceDelta("gpu", d, "nvml", second[d] - first[d]) for d in ("gpu-0", "gpu-1")]
    assert [d.joules for d in deltas] == [pytest.approx(500.0), pytest.approx(800.0)]
    tick = TickInput(5.0, deltas, gpus=held_weights(nvml, holders))
    energy = attribute(tick, Policy(model="off")).energy
    assert energy[pytorch]["gpu"] == pytest.approx(500.0)  # 100 %, with no process samples
    assert energy[a]["gpu"] == pytest.approx(600.0)  # SM 60 against 20
    assert energy[b]["gpu"] == pytest.approx(200.0)
    assert energy.get(IDLE, {}).get("gpu", 0.0) == pytest.approx(0.0, abs=1e-9)
    assert math.fsum(p.get("gpu", 0.0) for p in energy.values()) == pytest.approx(1300.0,
                                                                                   rel=1e-9)
    # without the holders GPU 0 was idle's: the kubelet's answer is what names it
    plain = attribute(TickInput(5.0, deltas, gpus=nvml), Policy(model="off")).energy
    assert plain[IDLE]["gpu"] == pytest.approx(500.0)
