"""Who may be moved where, and the move itself, safe against a pid that exits and is reused.

A pid may be moved for a peer when the process is the peer itself or one of its descendants
and every one of its uids (real, effective, saved, filesystem) is the peer's: a setuid
program the user started, or another user's process, is refused (root's peers may move any
of their descendants). The process is held by a pidfd from before the checks until after the
write to cgroup.procs: while it has not exited its pid cannot name anyone else, so a move that
the pidfd shows alive afterwards moved exactly the checked process. If it exited meanwhile,
the pid may already be another process's: that process is put back in its parent's cgroup
(where a new process starts) and the request refused.
"""

from __future__ import annotations

import contextlib
import os
import select
from dataclasses import dataclass

from carbond.commands.exec.cgroup import process_starttime
from carbond.workloads.cgroups import CgroupRoot
from carbond.workloads.kernfiles import cgroup_line, parse_proc_cgroup, read_proc_cgroup

MAX_ANCESTRY = 4096  # a parent chain longer than this is not followed


class Refused(Exception):
    """The request may not be done; the message (sent to the client) says why."""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    uids: tuple[int, ...]
    starttime: int


def read_process(pid: int, proc_root: str = "/proc") -> Process | None:
    """uids and parent from /proc/PID/status, start time from /proc/PID/stat; None if gone."""
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as handle:
            text = handle.read(16384).decode("ascii", "replace")
    except OSError:
        return None
    fields = {}
    for line in text.split("\n"):
        name, _, value = line.partition(":")
        fields[name] = value.split()
    starttime = process_starttime(pid, proc_root)
    try:
        uids = tuple(int(u) for u in fields["Uid"])
        ppid = int(fields["PPid"][0])
    except (KeyError, IndexError, ValueError):
        return None
    if starttime is None or not uids:
        return None
    return Process(pid, ppid, uids, starttime)


def exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def is_descendant(pid: int, ancestor: int, proc_root: str = "/proc") -> bool:
    current = pid
    for _ in range(MAX_ANCESTRY):
        if current == ancestor:
            return True
        process = read_process(current, proc_root)
        if process is None or process.ppid <= 0:
            return False
        current = process.ppid
    return False


def check_target(pid: int, pidfd: int, peer_pid: int, peer_uid: int,
                 proc_root: str = "/proc") -> Process:
    """The process `pid` (held by `pidfd`) if the peer may move it; Refused otherwise."""
    process = read_process(pid, proc_root)
    if process is None or exited(pidfd):
        raise Refused(f"process {pid} does not exist")
    if peer_uid != 0 and any(uid != peer_uid for uid in process.uids):
        raise Refused(f"process {pid} is not yours (uids {process.uids}, you are {peer_uid})")
    if pid != peer_pid and not is_descendant(pid, peer_pid, proc_root):
        raise Refused(f"process {pid} is neither the caller nor a descendant of it")
    if exited(pidfd):
        raise Refused(f"process {pid} exited during the request")
    return process


def cgroup_of(pid: int, root: CgroupRoot, proc_root: str = "/proc") -> str | None:
    """The process's cgroup in `root`'s hierarchy, relative to the root ('' for the root
    itself); None when gone or outside the root."""
    text = read_proc_cgroup(pid, proc_root)
    if text is None:
        return None
    line = cgroup_line(parse_proc_cgroup(text), None if root.hierarchy == "v2" else "cpuacct")
    if line is None:
        return None
    path, base = line.path.strip("/"), root.rel.strip("/")
    if base:
        if path != base and not path.startswith(base + "/"):
            return None
        path = path[len(base):].strip("/")
    return path


def write_pid(directory: str, pid: int) -> None:
    with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as handle:
        handle.write(str(pid))


def move(process: Process, pidfd: int, directory: str, root: CgroupRoot,
         proc_root: str = "/proc") -> None:
    """Write the checked process into `directory`'s cgroup.procs; Refused (with an innocent
    holder of a reused pid put back) when it exited before the write was known to be its."""
    if exited(pidfd):
        raise Refused(f"process {process.pid} exited during the request")
    try:
        write_pid(directory, process.pid)
    except OSError as exc:
        if exited(pidfd):
            raise Refused(f"process {process.pid} exited during the request") from None
        raise Refused(f"cannot move process {process.pid}: {exc.strerror or exc}") from None
    if not exited(pidfd):
        return
    holder = read_process(process.pid, proc_root)
    if holder is not None and holder.starttime != process.starttime:
        parent = cgroup_of(holder.ppid, root, proc_root)
        if parent is not None and cgroup_of(holder.pid, root, proc_root) == os.path.relpath(
                directory, root.path):
            with contextlib.suppress(OSError):
                write_pid(os.path.join(root.path, parent), holder.pid)
    raise Refused(f"process {process.pid} exited during the request")
