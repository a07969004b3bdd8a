"""Docker and Podman names from a stand-in engine API on a Unix socket (Docker's answer shape),
and every hostile way that socket can answer: closed, garbage, hanging, dripping, huge,
redirecting, truncated, not JSON; plus names with any bytes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from carbond.types import Consumer
from carbond.workloads.identity.engine import EngineSource, parse_containers
from carbond.workloads.identity.errors import SourceError
from carbond.workloads.identity.metadata import clean
from carbond.workloads.identity.metadata import named as name_of
from carbond.workloads.identity.resolver import MetadataResolver
from tests.identity_servers import UnixServer, docker_container, engine, hex_id, hostile

COMPOSE = {"com.docker.compose.project": "shop", "com.docker.compose.service": "db",
           "com.docker.compose.container-number": "1"}


@pytest.fixture
def socket_path(tmp_path) -> str:
    return str(tmp_path / "docker.sock")


@pytest.fixture
def docker(socket_path) -> Iterator[tuple[UnixServer, list[bytes]]]:
    seen: list[bytes] = []
    server = UnixServer(socket_path, engine([
        docker_container("shop-db-1", COMPOSE),
        docker_container("plain"),
        docker_container("k8s_app_web-1_team-a_0b1c_0", {
            "io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "team-a",
            "io.kubernetes.pod.uid": "0b1c2d3e-0000-4000-8000-000000000001",
            "io.kubernetes.container.name": "app"}),
    ], seen)).start()
    try:
        yield server, seen
    finally:
        server.stop()


def test_names_and_compose_labels(docker, socket_path):
    _, seen = docker
    table = EngineSource("docker", socket_path).fetch([], 5.0)
    db = table[("docker", hex_id("shop-db-1")[:12])]
    assert (db.container, db.runtime, db.compose_project, db.compose_service) == (
        "shop-db-1", "docker", "shop", "db")
    assert table[("docker", hex_id("plain")[:12])].compose_project == ""
    k8s = table[("docker", hex_id("k8s_app_web-1_team-a_0b1c_0")[:12])]
    assert (k8s.namespace, k8s.pod, k8s.container) == ("team-a", "web-1", "app")
    # read-only: one GET of the list, nothing else
    assert [r.split(b"\r\n")[0] for r in seen] == [b"GET /containers/json?all=true HTTP/1.1"]


def test_resolver_names_docker_containers(docker, socket_path):
    resolver = MetadataResolver([EngineSource("docker", socket_path)], min_list_seconds=0.0)
    resolver.start()
    try:
        ids = {name: Consumer("container", f"docker/{hex_id(name)[:12]}")
               for name in ("shop-db-1", "plain", "k8s_app_web-1_team-a_0b1c_0")}
        want = {"shop-db-1": Consumer("container", "docker/shop-db-1"),
                "plain": Consumer("container", "docker/plain"),
                "k8s_app_web-1_team-a_0b1c_0": Consumer("container", "team-a/web-1/app")}
        deadline = time.monotonic() + 10
        while (resolver.lookup(ids["plain"]).consumer != want["plain"]
               and time.monotonic() < deadline):
            time.sleep(0.02)
        assert {n: resolver.lookup(c).consumer for n, c in ids.items()} == want
        assert resolver.lookup(ids["shop-db-1"]).metadata.labels() == {
            "container": "shop-db-1", "container_id": hex_id("shop-db-1"), "runtime": "docker",
            "compose_project": "shop", "compose_service": "db"}
    finally:
        resolver.stop()


MODES = ["close", "garbage", "hang", "drip", "huge", "redirect", "truncated", "not-json"]


@pytest.mark.parametrize("mode", MODES)
def test_hostile_engine_answers_are_errors_within_the_deadline(socket_path, mode):
    server = UnixServer(socket_path, hostile(mode)).start()
    try:
        # hang and drip would hold the call ten minutes: it ends at its deadline instead
        with pytest.raises(SourceError):
            EngineSource("docker", socket_path, max_answer_bytes=1 << 20).fetch([], 1.0)
    finally:
        server.stop()


def test_missing_socket(tmp_path):
    with pytest.raises(SourceError, match="no socket"):
        EngineSource("podman", str(tmp_path / "none.sock")).fetch([], 1.0)


def test_resolver_counts_engine_errors_and_keeps_id_names(socket_path):
    server = UnixServer(socket_path, hostile("garbage")).start()
    resolver = MetadataResolver([EngineSource("docker", socket_path)], min_list_seconds=0.0)
    resolver.start()
    try:
        consumer = Consumer("container", f"docker/{hex_id('x')[:12]}")
        assert resolver.lookup(consumer).consumer == consumer
        deadline = time.monotonic() + 10
        while resolver.errors()["docker"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert resolver.errors() == {"cri": 0, "podresources": 0, "docker": 1, "podman": 0,
                                     "slurm": 0}
        identity = resolver.lookup(consumer)
        assert identity.consumer == consumer
        assert identity.metadata.labels() == {"container_id": hex_id("x")[:12],
                                              "runtime": "docker"}
    finally:
        resolver.stop()
        server.stop()


@pytest.mark.parametrize(("name", "named"), [
    ("ok-name", "docker/ok-name"),
    ("a/b", None),  # would pass for another name
    ("tab\there", None),
    ("\udcff", None),  # JSON can carry a lone surrogate
    ("", None),
    ("\u00e9t\u00e9", "docker/\u00e9t\u00e9"),
])
def test_any_name_becomes_a_valid_name_or_none(name, named):
    body = json.dumps([docker_container("x") | {"Names": [f"/{name}"]}]).encode()
    (metadata,) = parse_containers("docker", body).values()
    consumer = Consumer("container", f"docker/{hex_id('x')[:12]}")
    assert name_of(consumer, metadata) == (Consumer("container", named) if named else consumer)
    for value in clean(metadata).labels().values():
        value.encode("utf-8")  # valid UTF-8, whatever the engine sent
        assert "\t" not in value


@pytest.mark.parametrize("body", [b"{}", b"[1, 2]", b'[{"Id": "short"}]', b"[" * 100000,
                                  b'"text"', b"\xff\xfe"])
def test_answers_that_are_not_container_lists(body):
    try:
        table = parse_containers("docker", body)
    except SourceError:
        return
    assert table == {}
