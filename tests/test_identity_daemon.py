"""Issue 20's done-when through the real `carbond run` (a subprocess, scraped over HTTP): real
cgroups laid out as the kubelet and containerd make them, real processes in them, stand-in CRI
and PodResources gRPC servers on Unix sockets serving three namespaces of pods, the stand-in
libnvidia-ml for the GPUs; and every metadata socket (and scontrol) hanging."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.burners import Burners
from tests.cgroup_helpers import TestTree, available
from tests.fakes.nvml import FakeGpu, FakeProcess, Scenario, samples_for
from tests.helpers import Carbond, Samples, carbond_run, select, total, wait_for
from tests.identity_servers import (
    CriServer,
    Pod,
    PodResourcesServer,
    UnixServer,
    hex_id,
    hostile,
    three_namespaces,
)
from tests.powercap import ConstantPower
from tests.test_identity_kubernetes import cgroup_paths
from tests.test_identity_slurm import LAYOUTS

CONSUMER = "carbond_consumer_energy_joules_total"
HOST = "carbond_host_energy_joules_total"
INFO = "carbond_consumer_info"
ERRORS = "carbond_metadata_errors_total"
SOURCES = ("cri", "podresources", "docker", "podman", "slurm")
HELD = "GPU-11111111-2222-3333-4444-555555555555"  # team-a/trainer-0/pytorch, alone
SHARED = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"  # two ml-prod triton replicas
GIB = 1 << 30


@dataclass
class Node:
    """A Kubernetes node's cgroups, its runtime's and kubelet's sockets, and its processes."""

    tree: TestTree
    pods: list[Pod]
    cri: CriServer
    kubelet: PodResourcesServer
    pids: dict[str, int] = field(default_factory=dict)  # NS/POD/CONTAINER -> pid in it

    def config(self, path: Path, extra: str = "") -> str:
        path.write_text(
            "attribution: {idle_watts: {cpu: 0}, max_consumers: 10000}\n"
            f"metadata: {{cri: {{socket: '{self.cri.socket_path}'}}, "
            f"podresources: {{socket: '{self.kubelet.socket_path}'}}, docker: {{socket: off}}, "
            f"podman: {{socket: off}}, slurm: {{scontrol: off}}}}\n{extra}")
        return str(path)


@contextlib.contextmanager
def kubernetes_node(tmp_path: Path, hierarchy: str, driver: str, duty: float) -> Iterator[Node]:
    """Every pod of `three_namespaces` as cgroups of `driver`'s layout, a process in each
    container (a burner at `duty`, or a sleeper at 0) and one in the first pod's sandbox;
    all removed afterwards, also when the test failed."""
    why = available(hierarchy)
    if why:
        pytest.skip(why)
    directory = tmp_path / "s"  # Unix socket paths are short
    directory.mkdir()
    pods = three_namespaces()
    cri = CriServer(str(directory / "cri.sock"), pods).start()
    kubelet = PodResourcesServer(str(directory / "kubelet.sock"), pods).start()
    tree = TestTree(hierarchy)
    burners = Burners()
    try:
        node = Node(tree, pods, cri, kubelet)
        for p in pods:
            _, dirs = cgroup_paths(p, driver)
            for rel in dirs:
                tree.make(rel)
            if p is pods[0]:
                burners.start(max(duty, 0.02), tree.procs(dirs[0]))  # the pause container
            for c, rel in zip(p.containers, dirs[1:], strict=True):
                proc = (burners.start(duty, tree.procs(rel)) if duty else
                        burners.start(0.0, tree.procs(rel), period_ms=1000.0))
                node.pids[f"{p.namespace}/{p.name}/{c.name}"] = proc.pid
        yield node
    finally:
        burners.stop_all()
        tree.cleanup()
        cri.stop()
        kubelet.stop()


def consumers(samples: Samples, kind: str | None = None) -> set[str]:
    return {dict(key)["consumer"] for key in select(samples, CONSUMER)
            if kind is None or dict(key)["kind"] == kind}


def info(samples: Samples) -> dict[tuple[str, str], dict[str, str]]:
    """(kind, consumer) -> the metadata labels of its carbond_consumer_info series."""
    found = {}
    for key, value in select(samples, INFO).items():
        labels = dict(key)
        assert value == 1.0
        found[(labels.pop("kind"), labels.pop("consumer"))] = labels
    return found


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def settle(daemon: Carbond, done, timeout: float = 60.0) -> Samples:
    """Scrapes until `done(samples)` holds (the sources answer on their own threads)."""
    seen: list[Samples] = []

    def check() -> bool:
        seen.append(daemon.scrape())
        return bool(done(seen[-1]))

    assert wait_for(check, timeout, 0.2), sorted(consumers(seen[-1]))
    return seen[-1]


@pytest.mark.parametrize(("hierarchy", "driver"), [("v2", "systemd"), ("v1", "cgroupfs")])
def test_three_namespaces_of_pods_are_named_and_described(tmp_path, hierarchy, driver):
    with kubernetes_node(tmp_path, hierarchy, driver, duty=0.05) as node, \
            ConstantPower(str(tmp_path / "powercap"), package_watts=50.0), carbond_run(
                "--config", node.config(tmp_path / "carbond.yaml"),
                "--powercap-root", str(tmp_path / "powercap"), "--interval", "1s",
                "--cgroup-root", node.tree.root) as daemon:
        containers = set(node.pids)
        named = settle(daemon, lambda s: containers <= consumers(s, "container"))
        later = daemon.wait_ticks(3)
    first = node.pods[0]
    for p in node.pods:
        for c in p.containers:
            consumer = f"{p.namespace}/{p.name}/{c.name}"
            assert grew(named, later, CONSUMER, kind="container", consumer=consumer) > 0
            assert info(later)[("container", consumer)] == {
                "namespace": p.namespace, "pod": p.name, "pod_uid": p.uid,
                "container": c.name, "container_id": c.id, "runtime": "containerd"}
    # the pause container is its pod's, kind pod, NAMESPACE/POD
    pod = f"{first.namespace}/{first.name}"
    assert grew(named, later, CONSUMER, kind="pod", consumer=pod) > 0
    assert info(later)[("pod", pod)]["namespace"] == "team-a"
    assert {labels.get("namespace") for labels in info(later).values()} >= {
        "team-a", "ml-prod", "kube-system"}
    # Once named, the ID series take nothing more: the energy moved, it was not copied.
    for key in select(later, CONSUMER):
        name = dict(key)["consumer"]
        if name.startswith(("containerd/", "pod/")):
            assert grew(named, later, CONSUMER, consumer=name) == 0, name
    host = sum(grew(named, later, HOST, component=c) for c in ("cpu", "dram"))
    assert grew(named, later, CONSUMER) == pytest.approx(host, rel=1e-9)
    assert {dict(k)["source"]: v for k, v in select(later, ERRORS).items()} == dict.fromkeys(
        SOURCES, 0.0)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to build the fake NVML")
def test_a_gpu_held_by_one_container_is_its_whole_a_shared_one_split_by_sm(tmp_path, fake_lib):
    """GPU 0 is the kubelet's gift to team-a/trainer-0/pytorch and NVML sees no process on it:
    100 % is that container's. GPU 1 is time-shared by two triton replicas at SM 60:20: they
    get 3:1. Each GPU's consumers sum to its energy: nothing copied to several holders."""
    with kubernetes_node(tmp_path, "v2", "systemd", duty=0.0) as node:
        pytorch = "team-a/trainer-0/pytorch"
        triton_a, triton_b = "ml-prod/infer-5f6/triton", "ml-prod/infer-9x2/triton"
        a, b = node.pids[triton_a], node.pids[triton_b]
        path = tmp_path / "scenario.txt"
        sc = Scenario(gpus=[FakeGpu(0, HELD, energy_millijoules=1_000_000),
                            FakeGpu(1, SHARED, energy_millijoules=2_000_000)],
                      processes=[FakeProcess(1, a, 2 * GIB), FakeProcess(1, b, 2 * GIB)])
        sc.write(path)
        (tmp_path / "powercap").mkdir()
        stamp = [1_700_000_000_000_000]

        def step(daemon: Carbond, gpu0_mj: int, gpu1_mj: int) -> None:
            """New energy and SM samples, written right after a tick (see test_nvml_daemon)."""
            sc.gpu(0).energy_millijoules += gpu0_mj
            sc.gpu(1).energy_millijoules += gpu1_mj
            sc.samples = [*samples_for(1, a, 60, stamp[0], 6), *samples_for(1, b, 20, stamp[0], 6)]
            stamp[0] += 10_000_000
            daemon.wait_ticks(1)
            sc.write(path)

        with carbond_run("--config", node.config(tmp_path / "carbond.yaml"),
                         "--powercap-root", str(tmp_path / "powercap"), "--interval", "1s",
                         "--cgroup-root", node.tree.root,
                         env={"LD_LIBRARY_PATH": str(fake_lib),
                              "FAKE_NVML_SCENARIO": str(path)}) as daemon:
            for _ in range(60):  # until the CRI and the kubelet have answered
                step(daemon, 100_000, 100_000)
                seen = daemon.scrape()
                if {pytorch, triton_a, triton_b} <= consumers(seen, "container"):
                    break
            step(daemon, 100_000, 100_000)
            before = daemon.wait_ticks(1)
            for gpu0_mj, gpu1_mj in ((500_000, 800_000), (250_000, 400_000), (123_456, 98_765)):
                step(daemon, gpu0_mj, gpu1_mj)
            after = daemon.wait_ticks(2)
    gpu0 = grew(before, after, HOST, device="gpu-0")
    gpu1 = grew(before, after, HOST, device="gpu-1")
    assert gpu0 == pytest.approx(873.456, rel=1e-9)
    assert gpu1 == pytest.approx(1298.765, rel=1e-9)
    held = grew(before, after, CONSUMER, component="gpu", kind="container", consumer=pytorch)
    assert held == pytest.approx(gpu0, rel=1e-9)  # 100 %, with no process samples at all
    share_a = grew(before, after, CONSUMER, component="gpu", consumer=triton_a)
    share_b = grew(before, after, CONSUMER, component="gpu", consumer=triton_b)
    assert share_a / (share_a + share_b) == pytest.approx(0.75, rel=1e-6)
    assert share_a + share_b == pytest.approx(gpu1, rel=1e-9)
    assert grew(before, after, CONSUMER, component="gpu") == pytest.approx(gpu0 + gpu1,
                                                                            rel=1e-9)
    assert grew(before, after, CONSUMER, component="gpu", consumer="idle") == pytest.approx(
        0.0, abs=1e-6)
    described = info(after)
    assert described[("container", triton_a)]["namespace"] == "ml-prod"
    assert total(after, ERRORS, source="podresources") == 0


SCONTROL_HANGS = "#!/bin/sh\nexec sleep 600\n"


def test_every_socket_hanging_the_interval_holds_and_names_stay_ids(tmp_path):
    """CRI, PodResources, Docker and Podman sockets accept and never answer; scontrol never
    exits. Every tick still takes well under its interval, the consumers keep their ID names
    (with what the IDs say as metadata), and each source counts its errors."""
    why = available("v2")
    if why:
        pytest.skip(why)
    directory = tmp_path / "s"
    directory.mkdir()
    servers = {name: UnixServer(str(directory / f"{name}.sock"), hostile("hang")).start()
               for name in ("cri", "kubelet", "docker", "podman")}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.chmod(bin_dir, 0o755)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(SCONTROL_HANGS)
    os.chmod(scontrol, 0o755)
    p = three_namespaces()[0]
    docker_id, podman_id = hex_id("docker-c"), hex_id("podman-c")
    _, container_dirs = cgroup_paths(p, "systemd")
    groups = {"pod": container_dirs[1], "docker": f"docker/{docker_id}",
              "podman": f"libpod_parent/libpod-{podman_id}", "slurm": LAYOUTS["v2"]}
    tree = TestTree("v2")
    burners = Burners()
    config = tmp_path / "carbond.yaml"
    config.write_text(
        "attribution: {idle_watts: {cpu: 0}}\n"
        f"metadata: {{timeout: 1s, cri: {{socket: '{servers['cri'].socket_path}'}}, "
        f"podresources: {{socket: '{servers['kubelet'].socket_path}'}}, "
        f"docker: {{socket: '{servers['docker'].socket_path}'}}, "
        f"podman: {{socket: '{servers['podman'].socket_path}'}}, "
        f"slurm: {{scontrol: '{scontrol}'}}}}\n")
    try:
        for rel in groups.values():
            tree.make(rel)
            burners.start(0.05, tree.procs(rel))
        with ConstantPower(str(tmp_path / "powercap"), package_watts=50.0), carbond_run(
                "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                "--interval", "1s", "--cgroup-root", tree.root) as daemon:
            wanted = ("cri", "docker", "podman", "slurm")
            last = settle(daemon, lambda s: all(total(s, ERRORS, source=n) >= 2 for n in wanted))
    finally:
        burners.stop_all()
        tree.cleanup()
        for server in servers.values():
            server.stop()
    ids = {f"containerd/{p.containers[0].id[:12]}", f"docker/{docker_id[:12]}",
           f"podman/{podman_id[:12]}"}
    assert ids <= consumers(last, "container")
    assert "slurm/4242" in consumers(last, "job")
    assert not {c for c in consumers(last) if c.count("/") == 2}  # nothing was named
    # the interval held: every tick, while each source hung, took less than its 1 s interval
    ticks = total(last, "carbond_tick_duration_seconds_count")
    assert ticks >= 4
    assert total(last, "carbond_tick_duration_seconds_bucket", le="1.0") == ticks
    described = info(last)
    assert described[("container", f"podman/{podman_id[:12]}")] == {
        "container_id": podman_id[:12], "runtime": "podman"}
    assert total(last, ERRORS, source="podresources") == 0  # no GPU here: never asked


def test_a_reload_starts_the_new_sources_and_names_follow(tmp_path):
    """`metadata` is reloaded on SIGHUP: off at start (ID names), then the CRI socket (names
    within a tick or two), then off again (ID names once more). The daemon never restarts."""
    with kubernetes_node(tmp_path, "v2", "systemd", duty=0.05) as node, \
            ConstantPower(str(tmp_path / "powercap"), package_watts=50.0):
        config = tmp_path / "carbond.yaml"
        config.write_text("attribution: {idle_watts: {cpu: 0}, max_consumers: 10000}\n"
                          "metadata: {enabled: off}\n")
        nginx = "team-a/web-7d4b9c/nginx"
        ident = f"containerd/{node.pods[0].containers[0].id[:12]}"
        with carbond_run("--config", str(config), "--powercap-root",
                         str(tmp_path / "powercap"), "--interval", "1s",
                         "--cgroup-root", node.tree.root) as daemon:
            before = settle(daemon, lambda s: ident in consumers(s, "container"))
            assert not {c for c in consumers(before) if c.count("/") == 2}
            node.config(config)
            daemon.process.send_signal(signal.SIGHUP)
            named = settle(daemon, lambda s: nginx in consumers(s, "container"))
            assert info(named)[("container", nginx)]["namespace"] == "team-a"
            config.write_text("attribution: {idle_watts: {cpu: 0}, max_consumers: 10000}\n"
                              "metadata: {enabled: off}\n")
            daemon.process.send_signal(signal.SIGHUP)
            first = daemon.wait_ticks(2)
            later = daemon.wait_ticks(2)
            assert daemon.process.poll() is None
    assert grew(first, later, CONSUMER, kind="container", consumer=ident) > 0
    assert grew(first, later, CONSUMER, kind="container", consumer=nginx) == 0


def test_report_by_owner_after_the_pods_and_jobs_ended_equals_the_counters(tmp_path):
    """Three namespaces of pods and Slurm job 4242 (account physics, a stand-in scontrol)
    through `carbond run`; their processes stop and the sources go away (their energy stops,
    nothing can name them any more), the counters freeze; after the daemon stopped, `carbond
    report --by namespace` and `--by account` from its ledger equal the frozen counters summed
    per owner (joined on carbond_consumer_info, as PromQL would)."""
    import json
    import subprocess
    import sys

    from tests.test_identity_slurm import stand_in

    state = str(tmp_path / "state")
    scontrol, _ = stand_in(tmp_path / "bin")
    burners = Burners()
    with kubernetes_node(tmp_path, "v2", "systemd", duty=0.05) as node:
        try:
            node.tree.make(LAYOUTS["v2"])
            burners.start(0.05, node.tree.procs(LAYOUTS["v2"]))
            config = Path(node.config(tmp_path / "carbond.yaml"))
            config.write_text(config.read_text().replace(
                "slurm: {scontrol: off}", f"slurm: {{scontrol: '{scontrol}'}}"))
            with ConstantPower(str(tmp_path / "powercap"), package_watts=50.0), carbond_run(
                    "--config", str(config), "--state-dir", state, "--interval", "1s",
                    "--powercap-root", str(tmp_path / "powercap"),
                    "--cgroup-root", node.tree.root) as daemon:
                containers = set(node.pids)
                settle(daemon, lambda s: containers <= consumers(s, "container")
                       and ("job", "slurm/4242") in info(s))
                daemon.wait_ticks(3)
                for directory, _, _ in os.walk(node.tree.root):  # nothing runs on
                    with open(os.path.join(directory, "cgroup.procs")) as procs:
                        for pid in procs.read().split():
                            os.kill(int(pid), signal.SIGSTOP)
                node.cri.stop()
                node.kubelet.stop()
                os.remove(scontrol)
                daemon.wait_ticks(2)
                frozen = daemon.wait_ticks(2)
        finally:
            burners.stop_all()
    for by, owners in (("namespace", {"team-a", "ml-prod", "kube-system"}),
                       ("account", {"physics"})):
        of = {key: labels.get(by) for key, labels in info(frozen).items()}
        counted: dict[str, float] = {}
        for key, joules in select(frozen, CONSUMER).items():
            labels = dict(key)
            owner = of.get((labels["kind"], labels["consumer"]))
            if owner:
                counted[owner] = counted.get(owner, 0.0) + joules
        assert set(counted) == owners
        result = subprocess.run([sys.executable, "-m", "carbond", "report", "--state-dir",
                                 state, "--since", "1d", "--by", by, "--format", "json"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        rows = {row[by]: row["joules"] for row in json.loads(result.stdout)["rows"]}
        for owner, joules in counted.items():
            assert rows[owner] == pytest.approx(joules, rel=0.005), (by, owner)
