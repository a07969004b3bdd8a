"""The caller's end of the exec socket (`carbond exec` without a cgroup of its own,
`carbond.track`)."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from carbond.runs.protocol import (
    MAX_REPLY_BYTES,
    REQUEST_SECONDS,
    ProtocolError,
    encode,
    read_message,
)
from carbond.web.client import Unreachable

REPLY_SECONDS = 15.0  # `end` may wait for exiting tasks to leave the cgroup


class RunsUnavailable(Exception):
    """No daemon answers on the socket (absent, refused, gone mid-request)."""


class RunsRefused(Exception):
    """The daemon answered and refused; the message is its reason."""


@dataclass(frozen=True)
class Started:
    run: str
    project: str  # as the daemon records it (USER/PROJECT for a user other than root)
    cgroup: str  # below the daemon's cgroup root


class RunsClient:
    def __init__(self, path: str, timeout_seconds: float = REPLY_SECONDS) -> None:
        self.path = path
        self.timeout_seconds = timeout_seconds

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(REQUEST_SECONDS)
            sock.connect(self.path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(message))  # a busy daemon answers and closes at once
            reply = read_message(sock, MAX_REPLY_BYTES, self.timeout_seconds)
        except (OSError, ProtocolError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RunsUnavailable(f"{self.path}: {why}") from None
        finally:
            sock.close()
        if reply.get("ok") is not True:
            raise RunsRefused(str(reply.get("error", "refused"))[:500])
        return reply

    def start(self, project: str, pid: int | None = None, enter: bool = True) -> Started:
        reply = self.request({"op": "start", "project": project, "pid": pid, "enter": enter})
        try:
            return Started(str(reply["run"]), str(reply["project"]), str(reply["cgroup"]))
        except KeyError as exc:
            raise RunsUnavailable(f"{self.path}: reply without {exc}") from None

    def join(self, run: str, pid: int | None = None) -> None:
        self.request({"op": "join", "run": run, "pid": pid})

    def leave(self, run: str, pid: int | None = None) -> None:
        self.request({"op": "leave", "run": run, "pid": pid})

    def end(self, run: str) -> bool:
        return bool(self.request({"op": "end", "run": run}).get("removed"))

    def consumers(self, project: str) -> dict[str, Any]:
        document = self.request({"op": "consumers", "project": project}).get("document")
        if not isinstance(document, dict):
            raise RunsUnavailable(f"{self.path}: reply without a document")
        return document


class SocketDocuments:
    """A project's consumers document over the socket, shaped like `web.client.Client` for
    `exec.remote` (`get_json`, `base`)."""

    def __init__(self, client: RunsClient, project: str) -> None:
        self.client = client
        self.project = project
        self.base = f"unix://{client.path}"

    def get_json(self, path: str) -> Any:
        try:
            return self.client.consumers(self.project)
        except (RunsUnavailable, RunsRefused) as exc:
            raise Unreachable(str(exc)) from None
