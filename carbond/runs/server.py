"""The daemon's end of the exec socket: a Service started and stopped with the daemon.

Each connection is one request on a thread of its own (at most `MAX_CONNECTIONS` at a time;
more are told the daemon is busy), read within `protocol.REQUEST_SECONDS`. Who asks comes from
the kernel (SO_PEERCRED for the uid, SO_PEERPIDFD for the process), never from the request.

Where runs go: next to the caller's own cgroup, ``<its parent>/carbond.exec/<project>/<run>``
(for an SSH login ``user.slice/user-UID.slice/carbond.exec/…``), so the run stays under the
limits of the caller's slice; the namer gives ``kind="project"`` from the carbond.exec part.
Project names of callers other than root are keyed by user, ``USER/PROJECT``: no user can add
to another user's project counters (docs/exec.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import socket
import stat
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from carbond.commands.exec.cgroup import (
    clean_stale,
    owner_alive,
    process_starttime,
    remove_tree,
    run_leaf,
)
from carbond.config import Config
from carbond.runs.moves import Refused, cgroup_of, check_target, move
from carbond.runs.protocol import (
    MAX_REQUEST_BYTES,
    REQUEST_SECONDS,
    ProtocolError,
    encode,
    read_message,
)
from carbond.types import ConfigError, name_text
from carbond.workloads.cgroups import CgroupRoot, detect_cgroup_root
from carbond.workloads.naming import EXEC_PARENT, encode_project

log = logging.getLogger(__name__)

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
MAX_CONNECTIONS = 16
MAX_RUNS_PER_UID = 256
EMPTY_WAIT_SECONDS = 2.0

Documents = Callable[[], dict[str, Any]]


@dataclass
class Run:
    id: str
    uid: int
    project: str
    path: str
    owner: tuple[int, int] = (0, 0)  # the caller that started it: pid, start time
    origins: dict[int, str] = field(default_factory=dict)  # pid -> cgroup it came from


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    pidfd: int


def project_key(uid: int, project: str) -> str:
    """The project name the daemon records: the caller's own for root, else USER/PROJECT."""
    if uid == 0:
        return project
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"{user}/{project}"


def run_parent(origin: str) -> list[str]:
    """The cgroup (as parts below the root) a run for a process in `origin` goes under: the
    origin's parent, or for a process already in a run, that run's own parent."""
    parts = [p for p in origin.split("/") if p]
    if EXEC_PARENT in parts:
        return parts[:parts.index(EXEC_PARENT)]
    return parts[:-1]


def _answers(path: str) -> bool:
    """Whether something listens on the socket file at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class ExecSocket:
    """Listens at `path`; moves callers' processes into run cgroups under `root`."""

    def __init__(self, path: str, root: CgroupRoot, documents: Documents | None = None,
                 proc_root: str = "/proc") -> None:
        self.name = "exec socket"
        self.path = path
        self.root = root
        self.documents = documents
        self.proc_root = proc_root
        self._runs: dict[str, Run] = {}
        self._ended: list[Run] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; a socket that cannot be made is logged (exec and track then
        measure alone) and never stops the daemon."""
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    if _answers(self.path):
                        log.warning("exec socket %s: another carbond serves it; not here",
                                    self.path)
                        return
                    os.unlink(self.path)  # left by a daemon that was killed
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                os.chmod(self.path, 0o666)  # every user may ask; the kernel says who asks
                sock.listen(64)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            # no directory: the unit without its exec-socket drop-in (docs/exec.md)
            level = logging.INFO if isinstance(exc, FileNotFoundError) else logging.WARNING
            log.log(level, "exec socket %s: %s; users' carbond exec and carbond.track measure "
                    "alone", self.path, exc.strerror or exc)
            return
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="carbond-exec-socket",
                                        daemon=True)
        self._thread.start()
        log.info("exec socket at %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("exec socket: accept failed")
                continue
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(encode({"ok": False, "error": "busy: try again"}))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="carbond-exec-request",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer: Peer | None = None
        try:
            try:
                peer = self._peer(conn)
                request = read_message(conn, MAX_REQUEST_BYTES, REQUEST_SECONDS)
                reply = self.handle(request, peer)
            except (ProtocolError, Refused) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # a bug answers this request, never ends the daemon
                log.exception("exec socket: request failed")
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
        finally:
            if peer is not None:
                os.close(peer.pidfd)
            self._slots.release()  # before the reply: the caller's next request finds it free
        try:
            conn.settimeout(REQUEST_SECONDS)
            conn.sendall(encode(reply))
        except OSError:
            pass
        finally:
            conn.close()

    def _peer(self, conn: socket.socket) -> Peer:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        try:
            pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:  # before Linux 6.5: the pid, opened at once
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                raise Refused("the caller is gone") from None
        return Peer(pid, uid, pidfd)

    # ---- requests ----------------------------------------------------------------------

    def handle(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        op = request.get("op")
        self._sweep()
        if op == "start":
            return self._start(request, peer)
        if op == "join":
            return self._join(request, peer)
        if op == "leave":
            return self._leave(request, peer)
        if op == "end":
            return self._end(request, peer)
        if op == "consumers":
            return self._consumers(request, peer)
        raise Refused(f"unknown op {str(op)[:40]!r}: start, join, leave, end or consumers")

    def _target(self, request: dict[str, Any], peer: Peer) -> tuple[int, int, bool]:
        """(pid, pidfd, whether the pidfd is ours to close)."""
        pid = request.get("pid")
        if pid is None or pid == peer.pid:
            return peer.pid, peer.pidfd, False
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 22:
            raise Refused("pid must be a positive integer")
        try:
            return pid, os.pidfd_open(pid), True
        except OSError:
            raise Refused(f"process {pid} does not exist") from None

    def _start(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """A new run next to the caller's cgroup; the caller (or `pid`) moved in unless
        `enter` is false (then `join` moves processes in later)."""
        project = request.get("project")
        if not isinstance(project, str):
            raise Refused("project must be a string")
        key = project_key(peer.uid, project)
        try:
            encoded = encode_project(key)
        except ValueError as exc:
            raise Refused(f"project {key!a}: {exc}") from None
        with self._lock:
            if sum(1 for r in self._runs.values() if r.uid == peer.uid) >= MAX_RUNS_PER_UID:
                raise Refused(f"more than {MAX_RUNS_PER_UID} runs open: end some first")
        origin = cgroup_of(peer.pid, self.root, self.proc_root)
        if origin is None:
            raise Refused(f"the caller is outside {self.root.path}")
        run_id = uuid.uuid4().hex
        owner_start = process_starttime(peer.pid, self.proc_root) or 0
        parent = os.path.join(self.root.path, *run_parent(origin), EXEC_PARENT)
        if os.path.isdir(parent):
            clean_stale(parent, self.proc_root)  # runs left by a daemon that restarted
        path = os.path.join(parent, encoded, run_leaf(peer.pid, owner_start, run_id))
        try:
            os.makedirs(path)
        except OSError as exc:
            raise Refused(f"cannot create {path}: {exc.strerror or exc}") from None
        run = Run(run_id, peer.uid, key, path, (peer.pid, owner_start))
        if request.get("enter", True) is not False:
            try:
                self._move_in(run, request, peer)
            except Refused:
                self._remove(run, 0.0)
                raise
        with self._lock:
            self._runs[run_id] = run
        log.debug("run %s of uid %d: project %r at %s", run_id, peer.uid, key, path)
        return {"ok": True, "run": run_id, "project": key,
                "cgroup": os.path.relpath(path, self.root.path)}

    def _join(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self._move_in(self._run(request, peer), request, peer)
        return {"ok": True}

    def _move_in(self, run: Run, request: dict[str, Any], peer: Peer) -> None:
        pid, pidfd, own = self._target(request, peer)
        try:
            process = check_target(pid, pidfd, peer.pid, peer.uid, self.proc_root)
            origin = cgroup_of(pid, self.root, self.proc_root)
            if origin is None:
                raise Refused(f"process {pid} is outside {self.root.path}")
            move(process, pidfd, run.path, self.root, self.proc_root)
            run.origins.setdefault(pid, origin)
        finally:
            if own:
                os.close(pidfd)

    def _run(self, request: dict[str, Any], peer: Peer) -> Run:
        run_id = request.get("run")
        with self._lock:
            run = self._runs.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.uid != peer.uid:
            raise Refused("no such run of yours (ended, or the daemon restarted)")
        return run

    def _leave(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Move a process of the run back to where it came from (its nearest remaining
        ancestor when that cgroup is gone)."""
        run = self._run(request, peer)
        pid, pidfd, own = self._target(request, peer)
        try:
            process = check_target(pid, pidfd, peer.pid, peer.uid, self.proc_root)
            here = cgroup_of(pid, self.root, self.proc_root)
            rel = os.path.relpath(run.path, self.root.path)
            if here is None or (here != rel and not here.startswith(rel + "/")):
                raise Refused(f"process {pid} is not in run {run.id}")
            origin = run.origins.get(pid, "/".join(run_parent(rel)))
            parts = [p for p in origin.split("/") if p]
            while parts and not os.path.isdir(os.path.join(self.root.path, *parts)):
                parts.pop()
            move(process, pidfd, os.path.join(self.root.path, *parts), self.root,
                 self.proc_root)
        finally:
            if own:
                os.close(pidfd)
        return {"ok": True, "cgroup": "/".join(parts)}

    def _end(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Forget the run; its cgroup goes once empty (now, or at a later request)."""
        run = self._run(request, peer)
        with self._lock:
            self._runs.pop(run.id, None)
        removed = self._remove(run, EMPTY_WAIT_SECONDS)
        if not removed:
            with self._lock:
                self._ended.append(run)
        return {"ok": True, "removed": removed}

    def _remove(self, run: Run, wait_seconds: float) -> bool:
        gone = remove_tree(run.path, wait_seconds)
        project_dir = os.path.dirname(run.path)
        for directory in (project_dir, os.path.dirname(project_dir)):
            try:
                os.rmdir(directory)  # only when empty: another run may use it
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT):
                    log.debug("cannot remove %s: %s", directory, exc.strerror)
                break
        return gone

    def _sweep(self) -> None:
        """Ended runs whose last processes have left since; open runs whose caller is gone
        (killed mid-block) end, so they never count against its uid's limit."""
        with self._lock:
            orphans = [r for r in self._runs.values()
                       if not owner_alive(*r.owner, proc_root=self.proc_root)]
            for run in orphans:
                del self._runs[run.id]
            ended, self._ended = self._ended + orphans, []
        left = [run for run in ended if not self._remove(run, 0.0)]
        with self._lock:
            self._ended.extend(left)

    def _consumers(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The consumers document (/api/v1/consumers) cut to one project, as exec and track
        read their counters."""
        if self.documents is None:
            raise Refused("no counters here")
        document = self.documents()
        project = request.get("project")
        name = name_text(project) if isinstance(project, str) else None
        return {"ok": True, "document": {
            **{k: v for k, v in document.items() if k != "consumers"},
            "consumers": [c for c in document.get("consumers", [])
                          if isinstance(c, dict) and c.get("kind") == "project"
                          and c.get("name") == name]}}


def exec_socket_services(config: Config, documents: Documents) -> list[ExecSocket]:
    """The daemon's exec socket, where `exec_socket` names one and a cgroup tree is found."""
    if not config.exec_socket:
        return []
    try:
        root = detect_cgroup_root(config.cgroup_root, proc_root=config.proc_root)
    except ConfigError:
        return []  # build_cpu_usage already said so
    return [ExecSocket(config.exec_socket, root, documents, config.proc_root)]
