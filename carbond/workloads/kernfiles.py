"""Small kernel files read every tick (cpu.stat, /proc/PID/stat), kept open between ticks.

Opening a file costs a path lookup and two more system calls; cgroup and /proc files are
seq_files that regenerate their content on every read at offset 0, so an open descriptor read
with `pread(fd, n, 0)` gives the same fresh figures for one system call. A descriptor of a
removed cgroup or an exited process fails (ENODEV, ESRCH) instead of answering stale data,
and is then reopened once by path. This only holds on the kernel's own file systems, so a
tree that is not mounted as one (the tests' fake trees) is read by path every time.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Collection, Hashable


def mount_fstype(path: str, proc_root: str = "/proc") -> str | None:
    """File-system type of the mount holding `path`, from mountinfo (None when unknown)."""
    real = os.path.realpath(path)
    best, fstype = "", None
    try:
        with open(os.path.join(proc_root, "self", "mountinfo")) as f:
            for line in f:
                fields = line.split()
                mount = fields[4]
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(
                    mount
                ) >= len(best):
                    best, fstype = mount, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return None
    return fstype


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
