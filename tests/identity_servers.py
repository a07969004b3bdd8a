"""Stand-ins for the metadata sources, on Unix sockets the tests make.

- `CriServer`, `PodResourcesServer`: real gRPC servers speaking the vendored `runtime.v1`
  RuntimeService and kubelet `v1` PodResourcesLister, answering what containerd and the kubelet
  answer for a `Node` of pods (labels and annotations as the kubelet sets them).
- `EngineServer`: an HTTP/1.1 server on a Unix socket answering `GET /containers/json` in the
  Docker engine's shape.
- `RawServer`: hostile peers at the byte level: close at once, garbage, hang, drip, huge.

Every server is stopped by its fixture, also when the test failed; a hanging handler waits on
an Event the fixture sets, so no thread outlives the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from carbond.workloads.identity.proto import cri_runtime_v1_pb2 as cri
from carbond.workloads.identity.proto import podresources_v1_pb2 as pr


def hex_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def pod_uid(seed: str) -> str:
    h = hashlib.md5(seed.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class Container:
    name: str
    id: str
    gpus: tuple[str, ...] = ()  # device IDs the kubelet allocated (UUIDs, UUID::N, indices)


@dataclass
class Pod:
    namespace: str
    name: str
    uid: str
    sandbox_id: str
    containers: list[Container] = field(default_factory=list)


def pod(namespace: str, name: str, containers: dict[str, tuple[str, ...]]) -> Pod:
    seed = f"{namespace}/{name}"
    return Pod(namespace, name, pod_uid(seed), hex_id(seed + "/sandbox"),
               [Container(c, hex_id(f"{seed}/{c}"), gpus) for c, gpus in containers.items()])


def three_namespaces() -> list[Pod]:
    """Pods in three namespaces, as on a small GPU node."""
    return [
        pod("team-a", "web-7d4b9c", {"nginx": (), "sidecar": ()}),
        pod("team-a", "trainer-0", {"pytorch": ("GPU-11111111-2222-3333-4444-555555555555",)}),
        pod("ml-prod", "infer-5f6", {"triton": ("GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee::0",)}),
        pod("ml-prod", "infer-9x2", {"triton": ("GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee::1",)}),
        pod("kube-system", "coredns-abc", {"coredns": ()}),
    ]


# ---- gRPC ------------------------------------------------------------------------------------


def _sandbox(p: Pod) -> Any:
    labels = {"io.kubernetes.pod.name": p.name, "io.kubernetes.pod.namespace": p.namespace,
              "io.kubernetes.pod.uid": p.uid, "app": p.name.split("-")[0]}
    return cri.PodSandbox(
        id=p.sandbox_id, state=cri.SANDBOX_READY, created_at=1_700_000_000_000_000_000,
        metadata=cri.PodSandboxMetadata(name=p.name, uid=p.uid, namespace=p.namespace),
        labels=labels, annotations={"kubernetes.io/config.source": "api"},
        runtime_handler="")


def _container(p: Pod, c: Container) -> Any:
    labels = {"io.kubernetes.container.name": c.name, "io.kubernetes.pod.name": p.name,
              "io.kubernetes.pod.namespace": p.namespace, "io.kubernetes.pod.uid": p.uid}
    return cri.Container(
        id=c.id, pod_sandbox_id=p.sandbox_id, state=cri.CONTAINER_RUNNING,
        metadata=cri.ContainerMetadata(name=c.name, attempt=0),
        image=cri.ImageSpec(image="sha256:" + hex_id(c.name)),
        image_ref="sha256:" + hex_id(c.name), created_at=1_700_000_000_000_000_000,
        labels=labels, annotations={"io.kubernetes.container.hash": "5d3c1a2b",
                                    "io.kubernetes.container.restartCount": "0",
                                    "io.kubernetes.container.terminationMessagePath":
                                        "/dev/termination-log"})


class Behaviour:
    """What a stand-in does with a call: answer, hang until released, or break."""

    def __init__(self) -> None:
        self.mode = "answer"  # answer, hang, unavailable, garbage, huge
        self.release = threading.Event()
        self.calls: list[str] = []

    def serve(self, method: str, answer: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        self.calls.append(method)
        if self.mode == "hang":
            self.release.wait(600)
            context.abort(grpc.StatusCode.CANCELLED, "released")
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "runtime is restarting")
        if self.mode == "garbage":
            return os.urandom(64) + b"\xff\xff\xff\xff"  # sent as is: not a valid message
        if self.mode == "huge":
            return b"\x0a\x80\x80\x80\x10" + b"\x00" * (33 * 1024 * 1024)
        return answer().SerializeToString()


class GrpcServer:
    """A gRPC server on a Unix socket with raw-bytes handlers (so tests can send garbage)."""

    def __init__(self, socket_path: str, service: str,
                 methods: dict[str, Callable[[], Any]]) -> None:
        self.socket_path = socket_path
        self.behaviour = Behaviour()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_send_message_length", 64 << 20)])
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._handler(name, answer),
                request_deserializer=lambda data: data, response_serializer=lambda data: data)
            for name, answer in methods.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_insecure_port(f"unix:{socket_path}")

    def _handler(self, name: str, answer: Callable[[], Any]) -> Callable[[bytes, Any], bytes]:
        return lambda request, context: self.behaviour.serve(name, answer, context)

    def start(self) -> GrpcServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self.behaviour.release.set()
        self._server.stop(grace=0).wait(10)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


class CriServer(GrpcServer):
    """containerd's CRI plugin for a node of `pods` (mutable: tests add and remove pods)."""

    def __init__(self, socket_path: str, pods: list[Pod]) -> None:
        self.pods = pods
        super().__init__(socket_path, "runtime.v1.RuntimeService", {
            "Version": lambda: cri.VersionResponse(version="0.1.0", runtime_name="containerd",
                                                   runtime_version="v1.7.24",
                                                   runtime_api_version="v1"),
            "ListPodSandbox": lambda: cri.ListPodSandboxResponse(
                items=[_sandbox(p) for p in self.pods]),
            "ListContainers": lambda: cri.ListContainersResponse(
                containers=[_container(p, c) for p in self.pods for c in p.containers]),
        })


class PodResourcesServer(GrpcServer):
    """The kubelet's PodResources v1 List for `pods`."""

    def __init__(self, socket_path: str, pods: list[Pod]) -> None:
        self.pods = pods
        super().__init__(socket_path, "v1.PodResourcesLister",
                         {"List": self._list})

    def _list(self) -> Any:
        return pr.ListPodResourcesResponse(pod_resources=[
            pr.PodResources(name=p.name, namespace=p.namespace, containers=[
                pr.ContainerResources(name=c.name, devices=[pr.ContainerDevices(
                    resource_name="nvidia.com/gpu", device_ids=list(c.gpus),
                    topology=pr.TopologyInfo(nodes=[pr.NUMANode(ID=0)]))] if c.gpus else [],
                    cpu_ids=[]) for c in p.containers]) for p in self.pods])


# ---- bytes on a socket -------------------------------------------------------------------------


class UnixServer:
    """Accepts connections on a Unix socket and hands each to `serve(conn)` on a thread."""

    def __init__(self, socket_path: str, serve: Callable[[socket.socket, threading.Event], None]):
        self.socket_path = socket_path
        self.release = threading.Event()
        self.connections = 0
        self._serve = serve
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(socket_path)
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> UnixServer:
        self._accepting.start()
        return self

    def _accept(self) -> None:
        while not self.release.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._serve(conn, self.release)

    def stop(self) -> None:
        self.release.set()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)
        self._sock.close()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


def read_request(conn: socket.socket) -> bytes:
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def http_answer(status: str, body: bytes, headers: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def hostile(mode: str) -> Callable[[socket.socket, threading.Event], None]:
    """A byte-level peer: close, garbage, hang, drip, huge, redirect, chunked-truncated."""

    def serve(conn: socket.socket, release: threading.Event) -> None:
        if mode == "close":
            return
        read_request(conn)
        if mode == "garbage":
            conn.sendall(os.urandom(4096))
        elif mode == "hang":
            release.wait(600)
        elif mode == "drip":
            for byte in http_answer("200 OK", b"[" + b" " * 100000 + b"]"):
                if release.wait(0.05):
                    return
                conn.sendall(bytes((byte,)))
        elif mode == "huge":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            chunk = b"[" + b"{}," * 20000
            while not release.is_set():
                conn.sendall(chunk)
        elif mode == "redirect":
            conn.sendall(http_answer("301 Moved Permanently", b"",
                                     ("Location: http://127.0.0.1:1/containers/json",)))
        elif mode == "truncated":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n[{\"Id\":")
        elif mode == "not-json":
            conn.sendall(http_answer("200 OK", b"<html>hello</html>"))

    return serve


def engine(containers: list[dict[str, Any]],
           seen: list[bytes] | None = None) -> Callable[[socket.socket, threading.Event], None]:
    """The engine API's `GET /containers/json?all=true` for `containers` (Docker's shape)."""

    def serve(conn: socket.socket, release: threading.Event) -> None:
        request = read_request(conn)
        if seen is not None:
            seen.append(request)
        if request.startswith(b"GET /containers/json"):
            conn.sendall(http_answer("200 OK", json.dumps(containers).encode()))
        else:
            conn.sendall(http_answer("404 Not Found", b'{"message":"page not found"}'))

    return serve


def docker_container(name: str, labels: dict[str, str] | None = None,
                     ident: str | None = None) -> dict[str, Any]:
    """One entry of Docker's /containers/json answer."""
    return {"Id": ident or hex_id(name), "Names": [f"/{name}"], "Image": "busybox",
            "ImageID": "sha256:" + hex_id("busybox"), "Command": "sleep 1d",
            "Created": 1700000000, "Ports": [], "Labels": labels or {}, "State": "running",
            "Status": "Up 2 hours", "HostConfig": {"NetworkMode": "none"},
            "NetworkSettings": {"Networks": {}}, "Mounts": []}
