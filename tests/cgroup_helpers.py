"""Real cgroups for tests, in both hierarchies of the test machine, always cleaned up.

`TestTree` makes a private directory (`carbond-test-<random>`) under the v2 unified tree or the
v1 cpuacct tree; the tests create real-world-named cgroups inside it and point the reader's
cgroup root there. Teardown moves any leftover task out, then removes every directory
bottom-up, even when the test failed.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable

UNIFIED = "/sys/fs/cgroup/unified"
CPUACCT = "/sys/fs/cgroup/cpuacct"


def hierarchy_path(hierarchy: str) -> str:
    return UNIFIED if hierarchy == "v2" else CPUACCT


def available(hierarchy: str) -> str | None:
    """None when usable, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    base = hierarchy_path(hierarchy)
    marker = "cpu.stat" if hierarchy == "v2" else "cpuacct.usage"
    if not os.path.isfile(os.path.join(base, marker)):
        return f"no {hierarchy} hierarchy at {base}"
    if not os.access(base, os.W_OK):
        return f"{base} is not writable"
    return None


def random_id(length: int = 64) -> str:
    return secrets.token_hex(length // 2)


def random_uid() -> str:
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def remove_tree(top: str, timeout: float = 5.0,
                evict: Callable[[str], None] | None = None) -> None:
    """rmdir a cgroup and everything below it, deepest first, waiting for dying tasks to
    leave (EBUSY); `evict` may move tasks out of a directory that stays busy."""
    for directory in sorted((d for d, _, _ in os.walk(top)), key=len, reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                if evict is not None:
                    evict(directory)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class TestTree:
    __test__ = False  # not a test class, despite the name

    def __init__(self, hierarchy: str) -> None:
        self.hierarchy = hierarchy
        self.base = hierarchy_path(hierarchy)
        self.root = os.path.join(self.base, f"carbond-test-{secrets.token_hex(4)}")
        os.mkdir(self.root)

    @property
    def usage_file(self) -> str:
        return "cpu.stat" if self.hierarchy == "v2" else "cpuacct.usage"

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def make(self, rel: str) -> str:
        os.makedirs(self.path(rel), exist_ok=True)
        return self.path(rel)

    def procs(self, rel: str) -> str:
        return os.path.join(self.path(rel), "cgroup.procs")

    def usage_seconds(self, rel: str) -> float:
        """The kernel's own cumulative counter for one cgroup, read directly."""
        with open(os.path.join(self.path(rel), self.usage_file)) as f:
            if self.hierarchy == "v2":
                return int(f.readline().split()[1]) / 1e6
            return int(f.read()) / 1e9

    def remove(self, rel: str, timeout: float = 5.0) -> None:
        """rmdir a cgroup and everything below it, moving out tasks that are still there."""
        remove_tree(self.path(rel), timeout, self._evict)

    def _evict(self, directory: str) -> None:
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                pids = f.read().split()
        except OSError:
            return
        for pid in pids:
            try:
                with open(os.path.join(self.base, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass

    def cleanup(self) -> None:
        if os.path.isdir(self.root):
            self.remove("")
