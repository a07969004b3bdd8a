"""A real rootful Podman container (issue 20's done-when): carbond names it `podman/NAME` from
the engine API of `podman system service`, with its Compose labels, and the daemon (`carbond
run`, the resolver asking that API) exports its cgroup (`/libpod_parent/libpod-<ID>`, kind
container, `podman/<ID12>` until the name is known) as `podman/NAME` with its kernel CPU share
within 1 percentage point and its metadata in carbond_consumer_info, on v2 and v1."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from carbond.types import Consumer
from carbond.workloads.identity.engine import EngineSource
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.naming import consumer_for_cgroup
from tests.cgroup_helpers import CPUACCT, UNIFIED
from tests.helpers import total
from tests.podman_helpers import PodmanContainer, podman_container, unavailable
from tests.powercap import ConstantPower
from tests.test_accounting import CONSUMER, HOST, exact_cpu_seconds, next_tick

LABELS = {"com.docker.compose.project": "shop", "com.docker.compose.service": "burner"}


@pytest.fixture(scope="module")
def container() -> Iterator[PodmanContainer]:
    why = unavailable()
    if why:
        pytest.skip(why)
    with podman_container("carbond-burner", LABELS) as made:
        yield made


def test_the_container_lands_where_naming_expects_it(container):
    for root in (UNIFIED, CPUACCT):
        path = container.cgroup(root)
        assert os.path.isdir(path), path
        below = os.path.relpath(path, root)
        assert consumer_for_cgroup(below) == Consumer("container",
                                                      f"podman/{container.ident[:12]}")


def test_the_engine_api_names_it_with_its_compose_labels(container):
    table = EngineSource("podman", container.socket_path).fetch([], 10.0)
    found = table[("podman", container.ident[:12])]
    assert (found.container, found.container_id) == ("carbond-burner", container.ident)
    assert (found.compose_project, found.compose_service) == ("shop", "burner")
    resolver = MetadataResolver([EngineSource("podman", container.socket_path)],
                                timeout_seconds=10.0, min_list_seconds=0.0)
    resolver.start()
    try:
        consumer = Consumer("container", f"podman/{container.ident[:12]}")
        deadline = time.monotonic() + 20
        while resolver.lookup(consumer).consumer == consumer and time.monotonic() < deadline:
            time.sleep(0.05)
        identity = resolver.lookup(consumer)
    finally:
        resolver.stop()
    assert identity.consumer == Consumer("container", "podman/carbond-burner")
    assert identity.metadata.labels() == {
        "container": "carbond-burner", "container_id": container.ident, "runtime": "podman",
        "compose_project": "shop", "compose_service": "burner"}
    assert resolver.errors() == dict.fromkeys(resolver.errors(), 0)


def kernel_seconds(path: str, v2: bool) -> float:
    with open(os.path.join(path, "cpu.stat" if v2 else "cpuacct.usage")) as f:
        return int(f.readline().split()[1]) / 1e6 if v2 else int(f.read()) / 1e9


@pytest.mark.parametrize("hierarchy", ["v2", "v1"])
def test_its_cpu_share_through_the_daemon_is_the_kernels(container, tmp_path, hierarchy):
    if not os.path.isfile(os.path.join(CPUACCT, "cpuacct.usage")):
        pytest.skip("no v1 cpuacct root: no exact host-wide CPU counter to compare with")
    from tests.helpers import carbond_run, select

    root = UNIFIED if hierarchy == "v2" else CPUACCT
    path = container.cgroup(root)
    consumer = "podman/carbond-burner"
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {idle_watts: {cpu: 0}, max_consumers: 10000}\n"
                      f"metadata: {{podman: {{socket: '{container.socket_path}'}}, "
                      "docker: {socket: off}, cri: {socket: off}, slurm: {scontrol: off}}\n")
    with ConstantPower(str(tmp_path / "powercap"), package_watts=60.0), carbond_run(
        "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
        "--state-dir", str(tmp_path / "state"), "--interval", "2s", "--cgroup-root", root,
    ) as daemon:
        deadline = time.monotonic() + 60
        while not select(next_tick(daemon), CONSUMER, consumer=consumer):
            assert time.monotonic() < deadline, "never named podman/carbond-burner"
        first = next_tick(daemon)
        kernel_first, host_first = kernel_seconds(path, hierarchy == "v2"), exact_cpu_seconds()
        for _ in range(5):
            last = next_tick(daemon)
        kernel_last, host_last = kernel_seconds(path, hierarchy == "v2"), exact_cpu_seconds()
    cpu_joules = total(last, HOST, component="cpu") - total(first, HOST, component="cpu")
    joules = (total(last, CONSUMER, consumer=consumer, kind="container", component="cpu")
              - total(first, CONSUMER, consumer=consumer, kind="container", component="cpu"))
    kernel_share = (kernel_last - kernel_first) / (host_last - host_first)
    assert kernel_share > 0.05  # the burner ran (on a 2-core host shared with others)
    assert joules / cpu_joules == pytest.approx(kernel_share, abs=0.01)
    id_series = f"podman/{container.ident[:12]}"
    assert total(last, CONSUMER, consumer=id_series) == total(first, CONSUMER,
                                                              consumer=id_series)
    described = select(last, "carbond_consumer_info", consumer=consumer)
    assert list(described.values()) == [1.0]
    labels = dict(next(iter(described)))
    assert labels == {"kind": "container", "consumer": consumer, "container": "carbond-burner",
                      "container_id": container.ident, "runtime": "podman",
                      "compose_project": "shop", "compose_service": "burner"}
    assert total(last, "carbond_metadata_errors_total", source="podman") == 0
