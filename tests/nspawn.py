"""A real systemd as PID 1 in a container, for tests/test_deploy_package.py (issue 23).

A minimal Debian root of the host's own release is made with debootstrap from the mirror apt
already uses on this machine (read from /etc/apt at test time), cached as a tarball under
/var/cache/carbond-tests/, unpacked afresh for each run and booted with `systemd-nspawn --boot`
and no network. Commands run inside through nsenter, so every systemctl talks to the
container's systemd, never the host's. The container lives in a cgroup of its own that is
killed and removed at the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.cgroup_helpers import remove_tree
from tests.helpers import wait_for

CACHE_DIR = Path("/var/cache/carbond-tests")
CACHE_MAX_AGE_SECONDS = 30 * 86400  # a root older than this is made again (security updates)
# What the root holds beyond minbase: a booting systemd, D-Bus, and the package's one
# dependency, python3 (so installing it needs no network).
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3")
CONTAINER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                 "DEBIAN_FRONTEND": "noninteractive", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
                 "TERM": "dumb"}


@dataclass(frozen=True)
class Mirror:
    uri: str
    suite: str
    keyring: str | None


def os_release(path: str = "/etc/os-release") -> dict[str, str]:
    values: dict[str, str] = {}
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep:
                values[key] = value.strip().strip('"')
    return values


def _deb822_entries(text: str) -> Iterator[dict[str, str]]:
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields:
            yield fields


def _one_line_entries(text: str) -> Iterator[dict[str, str]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^(deb)\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)"
                         r"\s+(?P<comps>.+)$", line)
        if match:
            options = dict(opt.split("=", 1) for opt in (match["opts"] or "").split()
                           if "=" in opt)
            yield {"types": "deb", "uris": match["uri"], "suites": match["suite"],
                   "components": match["comps"], "signed-by": options.get("signed-by", "")}


def apt_mirror(suite: str, apt_dir: str = "/etc/apt") -> Mirror | None:
    """The first `deb` source of this machine's apt that carries `suite` main."""
    files = [os.path.join(apt_dir, "sources.list")]
    parts = os.path.join(apt_dir, "sources.list.d")
    with contextlib.suppress(OSError):
        files += sorted(os.path.join(parts, name) for name in os.listdir(parts))
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        entries = _deb822_entries(text) if path.endswith(".sources") else (
            _one_line_entries(text) if path.endswith(".list") else iter(()))
        for entry in entries:
            if ("deb" in entry.get("types", "").split() and suite in entry.get("suites", "").split()
                    and "main" in entry.get("components", "").split()):
                uri = next((u for u in entry.get("uris", "").split()
                            if u.startswith(("http://", "https://", "file:/"))), None)
                keyring = entry.get("signed-by") or None
                if uri:
                    return Mirror(uri, suite, keyring if keyring and os.path.isfile(keyring)
                                  else None)
    return None


def cannot_run_containers() -> str | None:
    """Why this machine cannot boot a container, in one line; None when it can (probed)."""
    if os.geteuid() != 0:
        return "needs root to boot a container with systemd-nspawn"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} missing (scripts/test-deps.sh installs systemd-container "
                "and debootstrap)")
    if os_release().get("ID") != "debian" or not os_release().get("VERSION_CODENAME"):
        return "not a Debian host: the package is built for this host's Debian release"
    if os.path.isdir("/run/systemd/system"):
        # There the container's cgroup would be the host systemd's to give (systemd-run
        # --scope or machined); CI and the development machines do not boot systemd.
        return "the host runs systemd itself: this test boots containers on hosts without it"
    if not any(os.access(path.parent, os.W_OK) for path in own_cgroup_dirs("probe")):
        return "no writable cgroup2 hierarchy for the container"
    # What systemd-nspawn needs of the kernel and our privileges: new namespaces of each kind.
    probe = subprocess.run(["unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork",
                            "--mount-proc", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces for a container: {probe.stderr.strip()}"
    return None


def nspawn_env() -> dict[str, str]:
    return {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}


def cached_root(mirror: Mirror, arch: str, cache_dir: Path = CACHE_DIR) -> tuple[Path, bool]:
    """The tarball of a minbase root with INCLUDE, made once (True when made now)."""
    key = hashlib.sha256(" ".join(["minbase", *INCLUDE]).encode()).hexdigest()[:12]
    tarball = cache_dir / f"debian-{mirror.suite}-{arch}-{key}.tar"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's root
        if tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_MAX_AGE_SECONDS:
            return tarball, False
        with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=cache_dir) as work:
            root = Path(work, "root")
            command = ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                       f"--arch={arch}"]
            if mirror.keyring:
                command.append(f"--keyring={mirror.keyring}")
            done = subprocess.run([*command, mirror.suite, str(root), mirror.uri],
                                  capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                raise RuntimeError(f"debootstrap failed: {done.stdout[-2000:]}{done.stderr}")
            # Empty the caches debootstrap leaves: the root is about 100 MB smaller.
            for name in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / name).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = Path(work, "root.tar")
            subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial),
                            "."], check=True)
            os.replace(partial, tarball)
    return tarball, True


def unpack(tarball: Path, into: Path) -> None:
    into.mkdir(mode=0o755)
    subprocess.run(["tar", "--numeric-owner", "-C", str(into), "-xf", str(tarball)], check=True)


def own_cgroup_dirs(name: str, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """Where the container's cgroup goes: beside ours in the unified hierarchy and in the
    named systemd one (systemd-nspawn places its payload below its own cgroup in both)."""
    bases = []
    with open(mountinfo, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[-1]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
                bases.append(Path(fields[4]))
    return [base / name for base in bases]


class Container:
    """One booted container; `run` executes inside it. Use through `booted()`."""

    def __init__(self, root: Path, name: str, log: Path) -> None:
        self.root, self.name, self.log = root, name, log
        self.cgroups = own_cgroup_dirs(name)
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def start(self) -> None:
        for path in self.cgroups:
            path.mkdir()

        def enter_cgroup() -> None:  # in the child, before exec: nspawn and all it starts
            for path in self.cgroups:
                (path / "cgroup.procs").write_text("0")

        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
                 "--private-network", "--link-journal=no", "--resolv-conf=off",
                 "--timezone=off", f"--machine={self.name}", f"--directory={self.root}",
                 "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=nspawn_env(), preexec_fn=enter_cgroup)
        assert wait_for(self._find_leader, 60, 0.1) and self.leader, self.tail()
        # Booted: the container's systemd has reached its default target (until its private
        # socket exists, systemctl cannot connect at all).
        states: list[subprocess.CompletedProcess[str]] = []

        def booted() -> bool:
            states.append(self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                   timeout=180))
            return bool(states[-1].stdout.strip())

        assert wait_for(booted, 120, 0.2), (states[-1:], self.tail())
        assert states[-1].stdout.strip() in ("running", "degraded"), (states[-1], self.tail())

    def _find_leader(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited: {self.tail()}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError):
                stat = (entry / "stat").read_bytes()
                fields = stat[stat.rfind(b")") + 2:].split()
                if int(fields[1]) == self.process.pid and (entry / "comm").read_text() == \
                        "systemd\n":
                    self.leader = int(entry.name)
                    return True
        return False

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def run(self, command: Sequence[str], *, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`command` inside the container, as its root, with a clean environment."""
        assert self.leader is not None
        done = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "env", "-i",
             *(f"{k}={v}" for k, v in CONTAINER_ENV.items()), *command],
            capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def stop(self) -> None:
        """Power off (SIGTERM to nspawn is a clean shutdown); kill what is left; remove the
        container's cgroups and what nspawn left under /run/systemd/nspawn."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._kill_all()
                self.process.wait(timeout=30)
        self._kill_all()
        for path in self.cgroups:
            if path.exists():
                remove_tree(str(path), timeout=10)
        propagate = Path("/run/systemd/nspawn/propagate") / self.name
        with contextlib.suppress(OSError):
            propagate.rmdir()

    def _kill_all(self) -> None:
        for path in self.cgroups:
            kill = path / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
        for path in self.cgroups:
            if not path.exists():
                continue
            for directory, _, _ in os.walk(path):
                with contextlib.suppress(OSError):
                    for pid in Path(directory, "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            wait_for(lambda p=path: not any(
                Path(d, "cgroup.procs").read_text().strip() for d, _, _ in os.walk(p)
                if Path(d, "cgroup.procs").exists()), 10)


@contextlib.contextmanager
def booted(tarball: Path, workdir: Path, files: Sequence[Path] = ()) -> Iterator[Container]:
    """A fresh root from `tarball` with `files` in /root, booted; gone afterwards."""
    root = workdir / "root"
    unpack(tarball, root)
    for path in files:
        shutil.copy2(path, root / "root" / path.name)
    container = Container(root, f"carbond-test-{secrets.token_hex(4)}", workdir / "console.log")
    lock = None
    try:
        lock = Path("/run/systemd/nspawn/locks") / f"inode-{root.stat().st_dev}:" \
            f"{root.stat().st_ino}"
        container.start()
        yield container
    finally:
        container.stop()
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.unlink()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
