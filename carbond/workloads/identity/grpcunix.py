"""Unary gRPC calls over a Unix socket, for the Kubernetes sources (CRI, PodResources).

`grpc` and the generated protobuf modules are imported on first use only, so a host without
Kubernetes never loads them. Calls are made by method path, taken from the vendored proto's
service descriptor (no generated stub module): carbond can only ever call the read-only RPCs
that proto declares. Every call has the caller's deadline and a receive limit; whatever goes
wrong (no socket, refused, not gRPC, too large, a message that does not parse, the deadline)
is one SourceError.
"""

from __future__ import annotations

import importlib
import os
import time
from types import ModuleType
from typing import Any

from carbond.workloads.identity.errors import SourceError

PROTO_PACKAGE = "carbond.workloads.identity.proto"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # what the kubelet allows its CRI answers


def load(module: str) -> tuple[ModuleType, ModuleType]:
    """(grpc, the generated module `module`), imported now."""
    try:
        grpc = importlib.import_module("grpc")
        generated = importlib.import_module(f"{PROTO_PACKAGE}.{module}")
    except ImportError as exc:
        raise SourceError(f"gRPC support is not installed ({exc.name})") from None
    return grpc, generated


def method_path(generated: ModuleType, service: str, method: str) -> str:
    """`/package.Service/Method`, from the proto's own descriptor."""
    descriptor = generated.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    return f"/{descriptor.containing_service.full_name}/{descriptor.name}"


class UnixChannel:
    """One channel to one socket for a round of calls sharing one deadline."""

    def __init__(self, grpc: ModuleType, socket_path: str, timeout_seconds: float,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if not os.path.exists(socket_path):
            raise SourceError(f"no socket at {socket_path}")
        self._grpc = grpc
        self._deadline = time.monotonic() + timeout_seconds
        self._channel = grpc.insecure_channel(
            f"unix://{socket_path}",
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", 4096),
                     ("grpc.enable_http_proxy", 0),
                     ("grpc.enable_retries", 0)])

    def __enter__(self) -> UnixChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def call(self, path: str, request: Any, response_type: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise SourceError("deadline passed before the call")
        stub = self._channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                         response_deserializer=response_type.FromString)
        try:
            return stub(request, timeout=remaining)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = getattr(code, "name", "UNKNOWN")
            raise SourceError(f"{path.rsplit('/', 1)[-1]}: {name}") from None
