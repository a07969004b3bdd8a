"""Kubernetes names (CRI) and GPU holders (PodResources) from stand-in gRPC servers on Unix
sockets, speaking the real protobuf services; cgroup paths of the systemd and cgroupfs drivers
named through the resolver as the daemon will (issue 20)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from carbond.types import Consumer
from carbond.workloads.identity.cri import CriSource
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.podresources import PodResourcesSource, device_key
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.naming import consumer_for_cgroup
from tests.identity_servers import CriServer, Pod, PodResourcesServer, hostile, three_namespaces
from tests.identity_servers import UnixServer as RawServer


@pytest.fixture
def sockets(tmp_path) -> Iterator[tuple[str, str]]:
    # Unix socket paths are limited to 107 bytes: a short directory of our own.
    directory = tmp_path / "s"
    directory.mkdir()
    yield str(directory / "cri.sock"), str(directory / "kubelet.sock")


@pytest.fixture
def node(sockets) -> Iterator[tuple[CriServer, PodResourcesServer, list[Pod]]]:
    pods = three_namespaces()
    cri_server = CriServer(sockets[0], pods).start()
    kubelet = PodResourcesServer(sockets[1], pods).start()
    try:
        yield cri_server, kubelet, pods
    finally:
        cri_server.stop()
        kubelet.stop()


def cgroup_paths(p: Pod, driver: str) -> tuple[str, list[str]]:
    """The pod's cgroup and its containers' (sandbox first), as kubelet and containerd lay
    them out with each cgroup driver (the same below the root on v1 and v2)."""
    if driver == "systemd":
        pod_dir = ("kubepods.slice/kubepods-burstable.slice/"
                   f"kubepods-burstable-pod{p.uid.replace('-', '_')}.slice")
        ids = [p.sandbox_id, *(c.id for c in p.containers)]
        return pod_dir, [f"{pod_dir}/cri-containerd-{i}.scope" for i in ids]
    pod_dir = f"kubepods/besteffort/pod{p.uid}"
    return pod_dir, [f"{pod_dir}/{i}" for i in [p.sandbox_id, *(c.id for c in p.containers)]]


def settled(resolver: MetadataResolver, consumer: Consumer, want: Consumer) -> Consumer:
    """Look up until the source threads have answered (they run on their own)."""
    deadline = time.monotonic() + 10
    while True:
        got = resolver.lookup(consumer).consumer
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_cri_lists_three_namespaces_of_pods(node, sockets):
    _, _, pods = node
    table = CriSource([sockets[0]]).fetch([], 5.0)
    for p in pods:
        assert table[("pod", p.uid)].namespace == p.namespace
        assert table[("pod", p.uid)].pod == p.name
        for c in p.containers:
            found = table[("cri", c.id[:12])]
            assert (found.namespace, found.pod, found.pod_uid, found.container,
                    found.container_id) == (p.namespace, p.name, p.uid, c.name, c.id)
        assert table[("cri", p.sandbox_id[:12])].container == ""  # the pause container
    assert {m.namespace for m in table.values()} == {"team-a", "ml-prod", "kube-system"}


@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_cgroup_paths_become_namespace_pod_container(node, sockets, driver):
    _, _, pods = node
    resolver = MetadataResolver([CriSource([sockets[0]])], min_list_seconds=0.0)
    resolver.start()
    try:
        for p in pods:
            pod_dir, container_dirs = cgroup_paths(p, driver)
            pod_consumer = consumer_for_cgroup(pod_dir)
            assert pod_consumer == Consumer("pod", f"pod/{p.uid}")  # today's ID name
            want_pod = Consumer("pod", f"{p.namespace}/{p.name}")
            assert settled(resolver, pod_consumer, want_pod) == want_pod
            identity = resolver.lookup(pod_consumer)
            assert identity.metadata.labels() == {"namespace": p.namespace, "pod": p.name,
                                                  "pod_uid": p.uid}
            sandbox = consumer_for_cgroup(container_dirs[0])
            assert resolver.lookup(sandbox).consumer == want_pod  # pause joins its pod
            for c, path in zip(p.containers, container_dirs[1:], strict=True):
                consumer = consumer_for_cgroup(path)
                assert consumer == Consumer("container", f"containerd/{c.id[:12]}")
                identity = resolver.lookup(consumer)
                assert identity.consumer == Consumer(
                    "container", f"{p.namespace}/{p.name}/{c.name}")
                assert identity.metadata.labels() == {
                    "namespace": p.namespace, "pod": p.name, "pod_uid": p.uid,
                    "container": c.name, "container_id": c.id, "runtime": "containerd"}
    finally:
        resolver.stop()
    assert resolver.errors()["cri"] == 0


def test_a_new_pod_is_named_after_the_next_list(node, sockets):
    """A pod the runtime lists after carbond's last list is named once its ID is asked for,
    without waiting for the slow periodic re-list."""
    cri_server, _, pods = node
    resolver = MetadataResolver([CriSource([sockets[0]])], relist_seconds=3600.0,
                                min_list_seconds=0.0)
    resolver.start()
    try:
        first = Consumer("container", f"containerd/{pods[0].containers[0].id[:12]}")
        settled(resolver, first, Consumer("container", "team-a/web-7d4b9c/nginx"))
        lists = cri_server.behaviour.calls.count("ListContainers")
        from tests.identity_servers import pod as make_pod
        late = make_pod("team-b", "late-1", {"app": ()})
        pods.append(late)
        consumer = Consumer("container", f"containerd/{late.containers[0].id[:12]}")
        want = Consumer("container", "team-b/late-1/app")
        assert settled(resolver, consumer, want) == want
        assert cri_server.behaviour.calls.count("ListContainers") == lists + 1
    finally:
        resolver.stop()


def test_podresources_says_who_holds_each_gpu(node, sockets):
    holders = PodResourcesSource(sockets[1]).fetch([], 5.0)
    assert holders == {
        "GPU-11111111-2222-3333-4444-555555555555": (
            Consumer("container", "team-a/trainer-0/pytorch"),),
        "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee": (
            Consumer("container", "ml-prod/infer-5f6/triton"),
            Consumer("container", "ml-prod/infer-9x2/triton")),
    }


def test_resolver_lists_gpu_holders_when_asked(node, sockets):
    resolver = MetadataResolver([PodResourcesSource(sockets[1])])
    resolver.start()
    try:
        assert resolver.gpu_holders() == {}  # not asked before: nothing known yet
        deadline = time.monotonic() + 10
        while not resolver.gpu_holders() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(resolver.gpu_holders()) == 2
    finally:
        resolver.stop()


def test_device_ids_of_time_slicing_replicas():
    assert device_key("GPU-aaaa::3") == "GPU-aaaa"
    assert device_key("MIG-1234-5678") == "MIG-1234-5678"
    assert device_key("0") == "0"


# ---- hostile sockets --------------------------------------------------------------------------

GRPC_FAULTS = ["unavailable", "garbage", "huge"]


@pytest.mark.parametrize("mode", GRPC_FAULTS)
def test_cri_faults_are_source_errors(node, sockets, mode):
    cri_server, kubelet, _ = node
    cri_server.behaviour.mode = kubelet.behaviour.mode = mode
    with pytest.raises(SourceError):
        CriSource([sockets[0]]).fetch([], 5.0)
    with pytest.raises(SourceError):
        PodResourcesSource(sockets[1]).fetch([], 5.0)


@pytest.mark.parametrize("mode", ["close", "garbage", "hang", "huge"])
def test_byte_level_peers_are_source_errors_within_the_deadline(tmp_path, mode):
    path = str(tmp_path / "raw.sock")
    server = RawServer(path, hostile(mode)).start()
    try:
        # A hanging peer holds each call for ten minutes: these return by their deadline.
        with pytest.raises(SourceError):
            CriSource([path]).fetch([], 1.0)
        with pytest.raises(SourceError):
            PodResourcesSource(path).fetch([], 1.0)
        assert server.connections >= 1 or mode == "close"
    finally:
        server.stop()


def test_missing_and_refusing_sockets(tmp_path):
    with pytest.raises(SourceError, match="no CRI socket"):
        CriSource([str(tmp_path / "none.sock")]).fetch([], 1.0)
    stale = tmp_path / "stale.sock"  # a socket file nobody listens on: connection refused
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(SourceError):
        CriSource([str(stale)]).fetch([], 1.0)
    with pytest.raises(SourceError):
        PodResourcesSource(str(stale)).fetch([], 1.0)


def test_a_runtime_hanging_for_minutes_never_delays_lookup(node, sockets):
    """Every call hangs (the stand-in would for ten minutes): lookup answers at once with the
    ID names, the error is counted after each deadline, and the names come once it answers."""
    cri_server, _, pods = node
    cri_server.behaviour.mode = "hang"
    resolver = MetadataResolver([CriSource([sockets[0]])], timeout_seconds=0.5,
                                min_list_seconds=0.0)
    resolver.start()
    try:
        consumer = Consumer("container", f"containerd/{pods[1].containers[0].id[:12]}")
        assert resolver.lookup(consumer).consumer == consumer
        deadline = time.monotonic() + 10
        while not cri_server.behaviour.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cri_server.behaviour.calls  # the source thread is now stuck in the call
        # fifty "ticks" while it is: each returns (a blocking lookup would hang the test
        # until the stand-in lets go) with today's ID name
        seen = {resolver.lookup(consumer).consumer for _ in range(50)}
        assert seen == {consumer}
        assert not cri_server.behaviour.release.is_set()
        deadline = time.monotonic() + 10
        while resolver.errors()["cri"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resolver.errors()["cri"] >= 1
        assert {k for k, v in resolver.errors().items() if v} == {"cri"}
    finally:
        resolver.stop()
        cri_server.behaviour.release.set()


def test_hostile_names_never_forge_a_consumer(sockets):
    """Names with a slash, control characters or odd Unicode: the pod keeps its ID name where
    a name cannot be one, and every label value is valid, visible UTF-8."""
    evil = [
        Pod("team-a/evil", "x", "0b1c2d3e-0000-4000-8000-000000000001", "a" * 64, []),
        Pod("ns", "line\nbreak", "0b1c2d3e-0000-4000-8000-000000000002", "b" * 64, []),
        Pod("ns", "caf\u00e9-\u2603", "0b1c2d3e-0000-4000-8000-000000000003", "c" * 64, []),
        Pod("ns", "n" * 300, "0b1c2d3e-0000-4000-8000-000000000004", "d" * 64, []),
    ]
    server = CriServer(sockets[0], evil).start()
    resolver = MetadataResolver([CriSource([sockets[0]])], min_list_seconds=0.0)
    resolver.start()
    try:
        ids = [Consumer("pod", f"pod/{p.uid}") for p in evil]
        settled(resolver, ids[2], Consumer("pod", "ns/caf\u00e9-\u2603"))
        named = [resolver.lookup(c) for c in ids]
        assert named[0].consumer == ids[0]  # "team-a/evil" would forge team-a's pods
        assert named[1].consumer == ids[1]
        assert named[2].consumer == Consumer("pod", "ns/caf\u00e9-\u2603")
        assert named[3].consumer == ids[3]  # longer than any Kubernetes name
        assert named[1].metadata.pod == "line\\x0abreak"
        for identity in named:
            for value in identity.metadata.labels().values():
                value.encode("utf-8")
                assert "\n" not in value and len(value) <= 256
    finally:
        resolver.stop()
        server.stop()


def test_stop_returns_while_a_call_hangs(node, sockets):
    cri_server, _, pods = node
    cri_server.behaviour.mode = "hang"
    resolver = MetadataResolver([CriSource([sockets[0]])], timeout_seconds=30.0,
                                min_list_seconds=0.0)
    resolver.start()
    resolver.lookup(Consumer("pod", f"pod/{pods[0].uid}"))
    deadline = time.monotonic() + 5
    while not cri_server.behaviour.calls and time.monotonic() < deadline:
        time.sleep(0.02)
    resolver.stop(timeout_seconds=0.5)
    # stop() returned while the source thread is still inside the 30 s call: it did not
    # wait for it (the thread is a daemon and ends at its own deadline)
    stuck = [t for t in threading.enumerate() if t.name == "carbond-metadata-cri"]
    assert stuck and stuck[0].is_alive()
    cri_server.behaviour.release.set()
    stuck[0].join(30)
    assert not stuck[0].is_alive()
