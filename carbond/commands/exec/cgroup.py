"""The cgroup of one `carbond exec` run: made, entered, read and removed; stale ones cleaned.

Layout under the cgroup root carbond uses (the v2 tree, the unified tree on hybrid hosts, or v1
cpuacct where there is no v2): ``carbond.exec/<encoded project>/run.<pid>.<starttime>.<run-id>``.
The project directory is `naming.encode_project` of the name, so the daemon's namer gives
``kind="project"`` and the name back. pid and start time (clock ticks since boot, field 22 of
/proc/PID/stat) name the `exec` process that owns the run: a run directory whose owner is gone
and which holds no task is stale (its `exec` was SIGKILLed) and the next `exec` removes it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass

from carbond.runs.client import RunsClient, RunsRefused, RunsUnavailable
from carbond.workloads.cgroups import V2, CgroupRoot, read_counter
from carbond.workloads.kernfiles import cgroup_line, parse_proc_cgroup, read_proc_cgroup
from carbond.workloads.naming import EXEC_PARENT, decode_project, encode_project, project_name

log = logging.getLogger(__name__)

RUN_PREFIX = "run"
CREATE_ATTEMPTS = 5  # a concurrent cleaner may remove an empty project directory under us
EMPTY_WAIT_SECONDS = 2.0  # exiting tasks may take a moment to leave the cgroup


class CgroupUnavailable(Exception):
    """No cgroup could be made for the run; the message says where and why. `denied`: for
    want of permission (the daemon's exec socket may help)."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def process_starttime(pid: int, proc_root: str = "/proc") -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None when gone."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as handle:
            data = handle.read(4096)
    except OSError:
        return None
    try:  # comm (field 2) may hold spaces and parentheses: split after its last ')'
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def run_leaf(pid: int, starttime: int, run_id: str) -> str:
    return f"{RUN_PREFIX}.{pid}.{starttime}.{run_id}"


def parse_leaf(name: str) -> tuple[int, int] | None:
    """(owner pid, owner start time) of a run directory name; None for any other name."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != RUN_PREFIX:
        return None
    if not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1]), int(parts[2])


def owner_alive(pid: int, starttime: int, proc_root: str = "/proc") -> bool:
    """Whether the `exec` that made a run directory still runs (pid reuse is told apart by
    the start time)."""
    return process_starttime(pid, proc_root) == starttime


def _has_tasks(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "cgroup.procs"), "rb") as handle:
            return bool(handle.read(1))
    except OSError:
        return False


def _subdirs(directory: str) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def remove_tree(top: str, wait_seconds: float = 0.0) -> bool:
    """rmdir `top` and its sub-cgroups, deepest first; a cgroup that still holds tasks is left
    (with everything above it). True when `top` is gone."""
    for directory in sorted((d for d, _, _ in os.walk(top)), key=len, reverse=True):
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                busy = exc.errno in (errno.EBUSY, errno.ENOTEMPTY)
                if not busy or _has_tasks(directory) or time.monotonic() >= deadline:
                    log.debug("cannot remove %s: %s", directory, exc.strerror)
                    break
                time.sleep(0.02)
    return not os.path.isdir(top)


def clean_stale(parent: str, proc_root: str = "/proc") -> list[str]:
    """Remove run cgroups under `parent` (a carbond.exec directory) whose `exec` is gone and
    that hold no task, then project directories left empty. A run whose tasks outlived its
    `exec` stays (it is still measured, under its project) until a later clean finds it
    empty. Names not made by `exec` are left alone. Returns the paths removed."""
    removed: list[str] = []
    for project in _subdirs(parent):
        project_dir = os.path.join(parent, project)
        for leaf in _subdirs(project_dir):
            owner = parse_leaf(leaf)
            if owner is None or owner_alive(*owner, proc_root=proc_root):
                continue
            path = os.path.join(project_dir, leaf)
            if remove_tree(path):
                removed.append(path)
        if not _subdirs(project_dir) and not _has_tasks(project_dir):
            with contextlib.suppress(OSError):  # a concurrent exec may be using it already
                os.rmdir(project_dir)
                removed.append(project_dir)
    return removed


def pids_below(top: str) -> list[int]:
    """Tasks in a cgroup or below it."""
    found: list[int] = []
    for directory, _, _ in os.walk(top):
        try:
            with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as handle:
                found += [int(line) for line in handle if line.strip().isdigit()]
        except OSError:
            continue
    return found


def _own_cgroup_v2(proc_root: str) -> str | None:
    text = read_proc_cgroup("self", proc_root)
    line = cgroup_line(parse_proc_cgroup(text)) if text is not None else None
    return line.path if line is not None else None


def delegated_parent(root: CgroupRoot, proc_root: str = "/proc") -> str | None:
    """Where an unprivileged user may make cgroups on v2: the highest ancestor of our own
    cgroup, below the root, whose directory and cgroup.procs we may write (systemd delegates
    ``user@UID.service`` to its user). None when there is no such place."""
    if root.hierarchy != V2:
        return None
    own = _own_cgroup_v2(proc_root)
    if own is None:
        return None
    rel = root.rel.strip("/")
    path = own.strip("/")
    if rel:
        if path != rel and not path.startswith(rel + "/"):
            return None
        path = path[len(rel):].strip("/")
    parts = [p for p in path.split("/") if p]
    for depth in range(1, len(parts) + 1):
        candidate = os.path.join(root.path, *parts[:depth])
        if os.access(candidate, os.W_OK) and os.access(
            os.path.join(candidate, "cgroup.procs"), os.W_OK
        ):
            return candidate
    return None


@dataclass
class RunCgroup:
    """One run's cgroup. `path` on disk; `rel` below the cgroup root, as the daemon's namer
    and `/proc/PID/cgroup` (minus the root's own path) show it."""

    root: CgroupRoot
    path: str
    rel: str
    project_dir: str

    @classmethod
    def create(cls, root: CgroupRoot, project: str, run_id: str,
               proc_root: str = "/proc") -> RunCgroup:
        """Make the run's cgroup, cleaning stale runs first; CgroupUnavailable when neither
        the root nor (v2, unprivileged) a delegated sub-tree takes it. `proc_root` is this
        process's own /proc: owners are pids as `exec` itself sees them."""
        pid = os.getpid()
        starttime = process_starttime(pid, proc_root)
        if starttime is None:
            raise CgroupUnavailable(f"cannot read {proc_root}/{pid}/stat")
        encoded = encode_project(project)
        leaf = run_leaf(pid, starttime, run_id)
        try:
            return cls._make(root, os.path.join(root.path, EXEC_PARENT), encoded, leaf,
                             proc_root)
        except OSError as exc:
            error = exc
        denied = error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        if denied:
            delegated = delegated_parent(root, proc_root)
            if delegated is not None and delegated != root.path:
                try:
                    return cls._make(root, os.path.join(delegated, EXEC_PARENT), encoded,
                                     leaf, proc_root)
                except OSError:
                    pass
        where = os.path.join(root.path, EXEC_PARENT)
        raise CgroupUnavailable(
            f"cannot create a cgroup under {where}: {error.strerror or error}"
            + (" (run as root, or where systemd delegates a cgroup sub-tree to you)"
               if denied else ""), denied)

    @classmethod
    def _make(cls, root: CgroupRoot, parent: str, encoded: str, leaf: str,
              proc_root: str) -> RunCgroup:
        os.makedirs(parent, exist_ok=True)
        clean_stale(parent, proc_root)
        project_dir = os.path.join(parent, encoded)
        path = os.path.join(project_dir, leaf)
        for attempt in range(CREATE_ATTEMPTS):
            try:
                os.makedirs(project_dir, exist_ok=True)
                os.mkdir(path)
                break
            except FileNotFoundError:  # a cleaner removed the empty project dir meanwhile
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
        rel = os.path.relpath(path, root.path)
        return cls(root, path, rel, project_dir)

    @property
    def project(self) -> str:
        """The name the daemon records the run under (naming.project_name of its path)."""
        return project_name(self.rel.split(os.sep)) or decode_project(
            os.path.basename(self.project_dir))

    def spawned(self) -> None:
        """After the fork: nothing to undo (the child entered the cgroup itself)."""

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def open_procs(self) -> int:
        """A descriptor on cgroup.procs, opened before the fork so the child only has to
        write to it (close-on-exec: CMD never sees it)."""
        return os.open(self.procs_file, os.O_WRONLY | os.O_CLOEXEC)

    def cpu_seconds(self) -> float | None:
        """The run's cumulative CPU seconds (its descendants included); None if unreadable."""
        return read_counter(os.path.join(self.path, self.root.usage_file),
                            self.root.hierarchy == V2)

    def pids(self) -> list[int]:
        """Tasks still in the run's cgroup or below it."""
        return pids_below(self.path)

    def remove(self) -> bool:
        """Remove the run's cgroup and, when empty, its project directory. False (and the
        cgroup left in place, still measured under its project) while tasks of the run
        outlive CMD; a later `exec` removes it once they are gone."""
        gone = remove_tree(self.path, EMPTY_WAIT_SECONDS)
        if gone and not _subdirs(self.project_dir) and not _has_tasks(self.project_dir):
            with contextlib.suppress(OSError):  # another run of the project just started
                os.rmdir(self.project_dir)
        return gone


@dataclass
class DaemonRunCgroup:
    """A run cgroup the daemon made over its exec socket (runs/), for a caller that may not
    make one (an SSH session). The daemon moves `exec` itself in just before the fork, so the
    command is born inside, and out again once it has started: `exec`'s own CPU time in
    between (the fork) is the run's. `project` is the name the daemon records it under."""

    root: CgroupRoot
    path: str
    rel: str
    project: str
    client: RunsClient
    run: str

    @classmethod
    def create(cls, root: CgroupRoot, project: str, socket_path: str) -> DaemonRunCgroup:
        client = RunsClient(socket_path)
        try:
            started = client.start(project, enter=False)
        except (RunsUnavailable, RunsRefused) as exc:
            raise CgroupUnavailable(f"the daemon's exec socket: {exc}") from None
        return cls(root, os.path.join(root.path, started.cgroup), started.cgroup,
                   started.project, client, started.run)

    def open_procs(self) -> int:
        """Joins the run (this process, for the fork) and returns a descriptor the child's
        `write(fd, "0")` goes to harmlessly: it is inside already."""
        try:
            self.client.join(self.run)
        except (RunsUnavailable, RunsRefused) as exc:
            raise CgroupUnavailable(f"the daemon's exec socket: {exc}") from None
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def spawned(self) -> None:
        """After the fork (or a failed one): `exec` back where it was."""
        with contextlib.suppress(RunsUnavailable, RunsRefused):
            self.client.leave(self.run)

    def cpu_seconds(self) -> float | None:
        return read_counter(os.path.join(self.path, self.root.usage_file),
                            self.root.hierarchy == V2)

    def pids(self) -> list[int]:
        return pids_below(self.path)

    def remove(self) -> bool:
        """The daemon removes the run's cgroup once empty (now, or at a later request)."""
        try:
            return self.client.end(self.run)
        except (RunsUnavailable, RunsRefused):
            return not os.path.isdir(self.path)


def create_run_cgroup(root: CgroupRoot, project: str, run_id: str,
                      socket_path: str | None) -> RunCgroup | DaemonRunCgroup:
    """The run's own cgroup where this process may make one, else one from the daemon's exec
    socket; CgroupUnavailable naming both reasons when neither works."""
    try:
        return RunCgroup.create(root, project, run_id)
    except CgroupUnavailable as exc:
        if not exc.denied or not socket_path:
            raise
        mine = str(exc)
    try:
        return DaemonRunCgroup.create(root, project, socket_path)
    except CgroupUnavailable as exc:
        raise CgroupUnavailable(f"{mine}; {exc}", denied=True) from None
