"""Small kernel files read every tick (cpu.stat, /proc/PID/stat), kept open between ticks, and
the one parser each of /proc/PID/mountinfo and /proc/PID/cgroup.

Opening a file costs a path lookup and two more system calls; cgroup and /proc files are
seq_files that regenerate their content on every read at offset 0, so an open descriptor read
with `pread(fd, n, 0)` gives the same fresh figures for one system call. A descriptor of a
removed cgroup or an exited process fails (ENODEV, ESRCH) instead of answering stale data,
and is then reopened once by path. This only holds on the kernel's own file systems, so a
tree that is not mounted as one (the tests' fake trees) is read by path every time.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass

PROC_CGROUP_BYTES = 65536  # /proc/PID/cgroup: one line per hierarchy, paths up to PATH_MAX

_OCTAL_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo, its path fields unescaped."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the directory of its file system mounted here ("/": the whole of it)
    mount_point: str
    options: tuple[str, ...]  # per-mount: rw, nosuid, relatime ...
    tags: tuple[str, ...]  # the optional fields: shared:N, master:N, unbindable ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per file system: for cgroup v1, its controllers


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mountinfo as \\ooo (\\040)."""
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape")
    raw = _OCTAL_ESCAPE.sub(lambda found: bytes([int(found[1], 8)]), raw)
    return raw.decode("utf-8", "surrogateescape")


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo text, in order (a line that is not is skipped).

    Fields are separated by single spaces (an empty mount source stays a field); a variable
    number of optional fields ends at a lone "-", after which come type, source, options.
    """
    mounts = []
    for line in text.split("\n"):
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            if len(fields) < sep + 4:
                continue
            mounts.append(
                Mount(
                    int(fields[0]),
                    int(fields[1]),
                    fields[2],
                    _unescape(fields[3]),
                    _unescape(fields[4]),
                    tuple(fields[5].split(",")),
                    tuple(fields[6:sep]),
                    _unescape(fields[sep + 1]),
                    _unescape(fields[sep + 2]),
                    tuple(_unescape(o) for o in fields[sep + 3].split(",")),
                )
            )
        except ValueError:
            continue
    return mounts


def read_mountinfo(proc_root: str = "/proc") -> list[Mount]:
    """Our own mount table; empty when it can't be read (every caller then knows nothing)."""
    try:
        with open(
            os.path.join(proc_root, "self", "mountinfo"), encoding="utf-8", errors="surrogateescape"
        ) as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount `path` (absolute, links resolved) lies on: the deepest mount point above it,
    and of mounts on the same point the last listed, which hides the ones before it."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = mount
    return best


def mount_fstype(path: str, proc_root: str = "/proc") -> str | None:
    """File-system type of the mount holding `path`, from mountinfo (None when unknown)."""
    mount = mount_of(os.path.realpath(path), read_mountinfo(proc_root))
    return mount.fstype if mount is not None else None


@dataclass(frozen=True)
class CgroupLine:
    """One line of /proc/PID/cgroup: a hierarchy and the task's cgroup in it."""

    hierarchy_id: int  # 0 with no controllers: the v2 (unified) hierarchy
    controllers: tuple[str, ...]  # v1: "cpu", "cpuacct", "name=systemd" ...
    path: str  # as the kernel writes it, "/a/b", without " (deleted)"
    deleted: bool  # v2 only: the cgroup was removed (its task is a zombie by now)

    @property
    def unified(self) -> bool:
        return self.hierarchy_id == 0 and not self.controllers


DELETED_SUFFIX = " (deleted)"


def parse_proc_cgroup(text: str) -> list[CgroupLine]:
    """Every line of a /proc/PID/cgroup text; "id:controllers:path", the path may hold ':'.

    The kernel marks a removed cgroup by appending " (deleted)" on the v2 line only
    (proc_cgroup_show); it is taken off the path there and kept as `deleted`, so the path
    names the cgroup the task was in. A live v2 cgroup really named "x (deleted)" can't be told
    from a removed "x"; a v1 path is always taken as written.
    """
    lines = []
    for line in text.split("\n"):  # not splitlines(): a cgroup name may hold \x85, \u2028 ...
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        try:
            hierarchy_id = int(hierarchy)
        except ValueError:
            continue
        names = tuple(controllers.split(",")) if controllers else ()
        deleted = hierarchy_id == 0 and not names and path.endswith(DELETED_SUFFIX)
        if deleted:
            path = path[: -len(DELETED_SUFFIX)]
        lines.append(CgroupLine(hierarchy_id, names, path, deleted))
    return lines


def cgroup_line(lines: Iterable[CgroupLine], controller: str | None = None) -> CgroupLine | None:
    """The v2 line (`controller` None), else the v1 line of the hierarchy holding
    `controller`; None when the task is in no such hierarchy."""
    for line in lines:
        if line.unified if controller is None else controller in line.controllers:
            return line
    return None


def read_proc_cgroup(pid: int | str, proc_root: str = "/proc") -> str | None:
    """/proc/PID/cgroup's text (`pid` may be "self"); None when the pid is gone."""
    data = read_head(os.path.join(proc_root, str(pid), "cgroup"), PROC_CGROUP_BYTES)
    return data.decode("utf-8", "surrogateescape") if data is not None else None


def descriptor_budget(share: int = 4, reserve: int = 256) -> int:
    """How many descriptors one cache may hold: a `share`-th of RLIMIT_NOFILE after `reserve`
    for sockets, the ledger and the rest, so caching can never starve the daemon."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, soft - reserve) // share


def read_head(path: str, size: int) -> bytes | None:
    """The first `size` bytes of a file, by path; None when it can't be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size) or None
    except OSError:
        return None
    finally:
        os.close(fd)


class OpenFiles:
    """Reads by key; keeps up to `capacity` descriptors open (0: open, read, close each time)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fds: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._fds)

    def read(self, key: Hashable, path: str, size: int) -> bytes | None:
        """The file's first `size` bytes; None when it can't be read (gone, unreadable)."""
        fd = self._fds.get(key)
        if fd is not None:
            try:
                data = os.pread(fd, size, 0)
                if data:
                    return data
            except OSError:
                pass
            del self._fds[key]  # removed, exited or replaced: try its path once more
            os.close(fd)
        if len(self._fds) >= self.capacity:
            return read_head(path, size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.read(fd, size)
        except OSError:
            data = b""
        if data:
            self._fds[key] = fd
        else:
            os.close(fd)
        return data or None

    def retain(self, keys: Collection[Hashable]) -> None:
        """Close the descriptors of everything not in `keys` (vanished cgroups, exited pids)."""
        for key in self._fds.keys() - keys:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
