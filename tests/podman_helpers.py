"""A real rootful Podman container for tests, in a store of its own, always cleaned up.

No registry is reachable, so the image is a root file system of busybox-static and its links,
`podman import`ed. The container runs with runc (crun refuses hybrid cgroup hosts), no
network, and ulimits within this machine's hard limits. `podman system service` serves the
engine API on a socket in the test's directory. The store (`--root`, `--runroot`) is private
to the test, so nothing of anyone else's is touched; teardown removes the service, the
container, the image, the store and the container's cgroups, also when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.cgroup_helpers import remove_tree

IMAGE = "localhost/carbond-test-busybox:1"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "sleep", "true", "cat")


def unavailable() -> str | None:
    """Why a rootful Podman container cannot run here, or None."""
    if os.geteuid() != 0:
        return "rootful Podman needs root"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test-deps.sh installs it)"
    if not os.path.isfile(BUSYBOX):
        return "busybox-static is not installed (scripts/test-deps.sh installs it)"
    return None


@dataclass
class PodmanContainer:
    ident: str
    name: str
    socket_path: str
    labels: dict[str, str]

    def cgroup(self, hierarchy_root: str) -> str:
        return os.path.join(hierarchy_root, "libpod_parent", f"libpod-{self.ident}")


class Podman:
    def __init__(self) -> None:
        # short: the API socket's path must fit a sockaddr_un
        self.directory = tempfile.mkdtemp(prefix="cbpm-", dir="/tmp")
        self.base = ["podman", "--root", f"{self.directory}/storage",
                     "--runroot", f"{self.directory}/run", "--cgroup-manager", "cgroupfs",
                     "--events-backend", "none"]
        self.service: subprocess.Popen[bytes] | None = None
        self.containers: list[str] = []

    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"podman {args[0]}: {done.stderr.strip()[-500:]}")
        return done.stdout.strip()

    def image(self) -> None:
        rootfs = os.path.join(self.directory, "rootfs")
        os.makedirs(os.path.join(rootfs, "bin"))
        shutil.copy(BUSYBOX, os.path.join(rootfs, "bin", "busybox"))
        for applet in APPLETS:
            os.symlink("busybox", os.path.join(rootfs, "bin", applet))
        tarball = os.path.join(self.directory, "rootfs.tar")
        subprocess.run(["tar", "-C", rootfs, "-cf", tarball, "."], check=True)
        self.run("import", tarball, IMAGE)

    def start(self, name: str, labels: dict[str, str], command: str) -> PodmanContainer:
        label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
        ident = self.run("--runtime", "runc", "run", "-d", "--name", name, *label_args,
                         "--network", "none", "--ulimit", "nofile=1024:1024",
                         "--ulimit", "nproc=4096:4096", IMAGE, "/bin/sh", "-c", command)
        self.containers.append(ident)
        return PodmanContainer(ident, name, self.serve(), labels)

    def serve(self) -> str:
        socket_path = os.path.join(self.directory, "api.sock")
        if self.service is None:
            self.service = subprocess.Popen(
                [*self.base, "system", "service", "--time=0", f"unix://{socket_path}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while not os.path.exists(socket_path):
                if self.service.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("podman system service did not start")
                time.sleep(0.05)
        return socket_path

    def cleanup(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        for ident in self.containers:
            with contextlib.suppress(Exception):
                self.run("rm", "-f", "-t", "0", ident)
        # What podman made in every hierarchy (each v1 controller, and v2): the containers'
        # cgroups, then conmon's and libpod_parent once nothing is left in them.
        for root in hierarchies():
            parent = os.path.join(root, "libpod_parent")
            leftovers = [os.path.join(parent, f"libpod-{ident}") for ident in self.containers]
            for path in [*leftovers, os.path.join(parent, "conmon"), parent]:
                if os.path.isdir(path):
                    with contextlib.suppress(OSError):
                        remove_tree(path)
        with contextlib.suppress(Exception):
            self.run("rmi", "-f", IMAGE)
        with contextlib.suppress(Exception):
            self.run("system", "reset", "-f")
        shutil.rmtree(self.directory, ignore_errors=True)


def hierarchies() -> list[str]:
    """Every mounted cgroup hierarchy's root (v1 controllers and the v2 tree)."""
    roots = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):
                roots.append(fields[4])
    return roots


@contextlib.contextmanager
def podman_container(name: str, labels: dict[str, str],
                     command: str = "while :; do :; done") -> Iterator[PodmanContainer]:
    podman = Podman()
    try:
        podman.image()
        yield podman.start(name, labels, command)
    finally:
        podman.cleanup()
