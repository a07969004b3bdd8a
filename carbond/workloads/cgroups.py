"""CPU time per cgroup, per tick, from the kernel's cumulative counters.

The kernel's counters are cumulative and every parent includes its descendants, so the work of
exited tasks and of removed cgroups is never lost from the tree: a cgroup's *own* time is its
growth minus its live children's growth, and time of a child that vanished since the last tick
shows up in the nearest live ancestor's own time. That remainder is given to the vanished child's
consumer (known from the last walk, or from an inotify create event for cgroups that lived and
died between two ticks), so a short-lived container still gets its energy.

`workloads/cpu.py` combines this walk with root-cgroup processes and their exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from carbond.types import ConfigError, Consumer
from carbond.workloads.kernfiles import (
    OpenFiles,
    descriptor_budget,
    mount_fstype,
    mount_of,
    read_head,
    read_mountinfo,
)

V1, V2, HYBRID = "v1", "v2", "hybrid"


@dataclass(frozen=True)
class CgroupRoot:
    """Where to walk and how to read it.

    `path`: directory on disk; `mode`: v2 | hybrid | v1 (what `carbond check` shows);
    `hierarchy`: v2 or v1, which decides the counter file; `rel`: the root's own path inside its
    hierarchy as /proc/PID/cgroup shows it (``/`` unless a sub-tree was configured).
    """

    path: str
    mode: str
    hierarchy: str
    rel: str = "/"

    @property
    def usage_file(self) -> str:
        return "cpu.stat" if self.hierarchy == V2 else "cpuacct.usage"

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")


def _mount_rel(path: str, proc_root: str) -> str:
    """Path of `path` inside its cgroup mount (``/`` for a mount point), from mountinfo."""
    real = os.path.realpath(path)
    cgroup_mounts = [m for m in read_mountinfo(proc_root) if m.fstype in ("cgroup", "cgroup2")]
    mount = mount_of(real, cgroup_mounts)
    if mount is None:
        return "/"
    return "/" + real[len(mount.mount_point) :].strip("/")


def cgroup_root(path: str, proc_root: str = "/proc", key: str = "cgroup_root") -> CgroupRoot:
    """Classify a configured root; a directory without a CPU counter is a ConfigError."""
    if os.path.isfile(os.path.join(path, "cpuacct.usage")):
        return CgroupRoot(path, V1, V1, _mount_rel(path, proc_root))
    if os.path.isfile(os.path.join(path, "cpu.stat")):
        mode = HYBRID if os.sep + "unified" in os.path.realpath(path) else V2
        return CgroupRoot(path, mode, V2, _mount_rel(path, proc_root))
    raise ConfigError(key, f"{path} has neither cpu.stat (v2) nor cpuacct.usage (v1)")


def detect_cgroup_root(
    override: str | None = None, sys_root: str = "/sys/fs/cgroup", proc_root: str = "/proc"
) -> CgroupRoot:
    """`--cgroup-root` if given; else pure v2, else the hybrid unified tree, else v1 cpuacct."""
    if override:
        return cgroup_root(override, proc_root)
    if os.path.isfile(os.path.join(sys_root, "cgroup.controllers")):
        return CgroupRoot(sys_root, V2, V2, "/")
    unified = os.path.join(sys_root, "unified")
    if os.path.isfile(os.path.join(unified, "cpu.stat")):
        return CgroupRoot(unified, HYBRID, V2, "/")
    for name in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu"):
        candidate = os.path.join(sys_root, name)
        if os.path.isfile(os.path.join(candidate, "cpuacct.usage")):
            return CgroupRoot(candidate, V1, V1, "/")
    raise ConfigError("cgroup_root", f"no cgroup v2 or v1 cpuacct hierarchy under {sys_root}")


def _parse_counter(data: bytes, v2: bool) -> float | None:
    try:
        if v2:  # first line is "usage_usec N"
            line = data.split(b"\n", 1)[0]
            if not line.startswith(b"usage_usec "):
                return None
            return int(line[11:]) / 1e6
        return int(data) / 1e9
    except ValueError:
        return None


def read_counter(path: str, v2: bool) -> float | None:
    """One cgroup's cumulative CPU seconds; None when it vanished mid-walk."""
    data = read_head(path, 96)
    return None if data is None else _parse_counter(data, v2)


def list_subdirs(directory: str) -> list[str] | None:
    """Names of a directory's subdirectories; None when it can't be listed (it vanished)."""
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return None


def read_usage_tree(
    root: CgroupRoot,
    subdirs: Callable[[str], list[str] | None] = list_subdirs,
    read: Callable[[str, str], bytes | None] | None = None,
) -> dict[str, float]:
    """Cumulative CPU seconds of every cgroup under the root, keyed by relative path.

    Post-order (children before their parent) so a parent is read after its children and
    its own time never comes out negative from read skew. `subdirs(abs_dir)` lists a
    directory's children; `read(rel, abs_file)` returns a counter file's bytes (default: open
    and read it by path).
    """
    v2 = root.hierarchy == V2
    name = root.usage_file
    usage: dict[str, float] = {}

    def walk(directory: str, rel: str) -> None:
        names = subdirs(directory)
        if names is None:
            return
        for sub in names:
            walk(directory + "/" + sub, f"{rel}/{sub}" if rel else sub)
        if read is None:
            value = read_counter(directory + "/" + name, v2)
        else:
            data = read(rel, directory + "/" + name)
            value = None if data is None else _parse_counter(data, v2)
        if value is not None:
            usage[rel] = value

    walk(root.path.rstrip("/") or "/", "")
    return usage


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass
class TreeDelta:
    """Own CPU seconds per live cgroup for one interval, and whose time each one absorbed.

    `vanished[p]`: the deepest cgroups that disappeared (or were recreated) since the last
    walk and whose remaining time is therefore inside `own[p]`.
    """

    own: dict[str, float]
    vanished: dict[str, list[str]]


def tree_delta(
    prev: Mapping[str, float], cur: Mapping[str, float], born: Iterable[str] = ()
) -> TreeDelta:
    """Pure core of the walk: per-cgroup own time from two cumulative snapshots."""
    born_set = set(born)
    growth: dict[str, float] = {}
    recreated: set[str] = set()
    for path, value in cur.items():
        before = prev.get(path)
        if before is None:
            growth[path] = value
        elif value < before or (path in born_set and path):
            growth[path] = value  # a new cgroup under an old name: its counter began at 0
            recreated.add(path)
        else:
            growth[path] = value - before
    children: dict[str, float] = {}
    for path, grew in growth.items():
        if path:
            parent = _parent(path)
            children[parent] = children.get(parent, 0.0) + grew
    own = {p: max(0.0, g - children.get(p, 0.0)) for p, g in growth.items()}

    gone = {p for p in prev if p not in cur} | {p for p in born_set if p not in cur} | recreated
    gone.discard("")
    vanished: dict[str, list[str]] = {}
    if gone:
        prefixes = {_parent(p) for p in gone}
        for path in sorted(gone):
            # Only the deepest ones: a removed pod slice's container names the time better.
            if path in prefixes and any(q.startswith(path + "/") for q in gone):
                continue
            ancestor = _parent(path)
            while ancestor and ancestor not in cur:
                ancestor = _parent(ancestor)
            if ancestor in cur:
                vanished.setdefault(ancestor, []).append(path)
    return TreeDelta(own, vanished)


class _TreeWatch:
    """inotify on cgroup directories: which cgroups were born, which directories changed.

    Born cgroups name the ones that live and die between two ticks. A directory with no
    create, delete or move event since it was listed still has the same children, so the walk
    reuses its listing instead of reading the directory again. Best effort: without inotify
    (or past `max_watches`) directories are listed every tick, and the time of cgroups born
    and gone between ticks still reaches the parent's consumer, it just can't be named.
    """

    IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
    IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
    IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000
    MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO

    def __init__(self, root_path: str, max_watches: int = 8192) -> None:
        self.root = root_path.rstrip("/") or "/"
        self.max_watches = max_watches
        self.fd = -1
        self.wd_dir: dict[int, str] = {}
        self.watched: set[str] = set()
        name = ctypes.util.find_library("c")
        try:
            self.libc = ctypes.CDLL(name, use_errno=True)
            self.fd = self.libc.inotify_init1(self.IN_NONBLOCK_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = -1

    def add(self, directory: str) -> bool:
        """Watch `directory`; True when it is watched (now or already)."""
        if directory in self.watched:
            return True
        if self.fd < 0 or len(self.watched) >= self.max_watches:
            return False
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), self.MASK)
        if wd < 0:
            return False
        self.wd_dir[wd] = directory
        self.watched.add(directory)
        return True

    def drain(self) -> tuple[list[str], set[str] | None]:
        """Relative paths of directories created since the last drain, and the absolute
        directories whose children may have changed (None: events were lost, all may have)."""
        born: list[str] = []
        changed: set[str] | None = set()
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # BlockingIOError: nothing more to read
                break
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].split(b"\0", 1)[0]
                offset += 16 + length
                if mask & self.IN_Q_OVERFLOW:
                    changed = None
                    continue
                directory = self.wd_dir.get(wd)
                if directory is None:
                    continue
                if mask & self.IN_IGNORED:
                    del self.wd_dir[wd]
                    self.watched.discard(directory)
                    if changed is not None:
                        changed.add(directory)
                    continue
                if not mask & self.IN_ISDIR:
                    continue
                if changed is not None:
                    changed.add(directory)
                if mask & self.IN_CREATE:
                    full = f"{directory}/{os.fsdecode(name)}"
                    born.append(full[len(self.root) :].strip("/"))
        return born, changed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class CgroupTick:
    """One interval of cgroup CPU time.

    `usage`: CPU seconds per consumer for every live non-root cgroup (0.0 when idle, so live
    consumers stay visible) plus the time of vanished ones; `root_own_cpu_seconds`: the root's
    own time (its tasks, and on v2 also kernel/irq time: the root counter is system-wide);
    `root_vanished`: consumers of vanished top-level cgroups whose time is inside the root's own.
    """

    usage: dict[Consumer, float]
    root_own_cpu_seconds: float
    root_vanished: tuple[Consumer, ...] = ()
    cgroups: int = 0
    baseline: bool = False


def _has_tasks(directory: str) -> bool:
    try:
        with open(directory + "/cgroup.procs", "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


class CgroupReader:
    """Walks the hierarchy each tick and turns counter growth into CPU seconds per consumer."""

    def __init__(
        self,
        root: CgroupRoot,
        namer: Callable[[str], Consumer],
        track_short_lived: bool = True,
    ) -> None:
        self.root = root
        self.namer = namer
        self._prev: dict[str, float] | None = None
        self._watch = _TreeWatch(root.path) if track_short_lived else None
        self._listing: dict[str, list[str]] = {}
        on_kernel_fs = mount_fstype(root.path) in ("cgroup", "cgroup2")
        self._files = OpenFiles(descriptor_budget() if on_kernel_fs else 0)

    def _subdirs(self, directory: str) -> list[str] | None:
        """A directory's children, listed again only when inotify can't vouch for the last
        listing. The watch goes on before the listing, so no creation falls in between."""
        names = self._listing.get(directory)
        if names is not None:
            return names
        watched = self._watch is not None and self._watch.add(directory)
        names = list_subdirs(directory)
        if names is not None and watched:
            self._listing[directory] = names
        return names

    def _read(self, rel: str, path: str) -> bytes | None:
        return self._files.read(rel, path, 96)

    def tick(self) -> CgroupTick:
        born: list[str] = []
        if self._watch is not None:
            born, changed = self._watch.drain()
            if changed is None:
                self._listing.clear()
            else:
                for directory in changed:
                    self._listing.pop(directory, None)
        cur = read_usage_tree(self.root, self._subdirs, self._read)
        self._files.retain(cur)
        prev, self._prev = self._prev, cur
        if prev is None:
            return CgroupTick({self.namer(p): 0.0 for p in cur if p}, 0.0, (), len(cur), True)
        delta = tree_delta(prev, cur, born)
        usage: dict[Consumer, float] = {}
        root_vanished: tuple[Consumer, ...] = ()
        for path, seconds in delta.own.items():
            gone = delta.vanished.get(path)
            if not path:
                if gone:
                    root_vanished = tuple(dict.fromkeys(self.namer(p) for p in gone))
                continue
            if gone and not _has_tasks(f"{self.root.path}/{path}"):
                # No tasks of its own: the growth is the vanished children's last work.
                owners = list(dict.fromkeys(self.namer(p) for p in gone))
                usage.setdefault(self.namer(path), 0.0)
                for owner in owners:
                    usage[owner] = usage.get(owner, 0.0) + seconds / len(owners)
            else:
                consumer = self.namer(path)
                usage[consumer] = usage.get(consumer, 0.0) + seconds
        return CgroupTick(usage, delta.own.get("", 0.0), root_vanished, len(cur))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._files.close()
