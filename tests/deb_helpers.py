"""Building and reading the .deb of `make deb` (scripts/build-deb.sh), for the package tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_DEB = ROOT / "scripts" / "build-deb.sh"


@dataclass(frozen=True)
class Deb:
    path: Path
    version: str
    build_seconds: float  # reported by the tests that use it, never asserted


def cannot_build() -> str | None:
    """Why `make deb` cannot run here, in one line; None when it can."""
    missing = [tool for tool in ("dpkg-deb", "dpkg-shlibdeps", "strip")
               if shutil.which(tool) is None]
    if missing or not os.access("/usr/bin/python3", os.X_OK):
        return (f"{', '.join(missing) or '/usr/bin/python3'} missing: the .deb is built on "
                "Debian (scripts/test-deps.sh installs dpkg-dev and python3-venv)")
    return None


def build(out_dir: Path, work_dir: Path, suffix: str = "") -> Deb:
    """scripts/build-deb.sh into `out_dir`: the wheels come from PyPI (or the configured
    index), as on a build machine."""
    started = time.monotonic()
    env = {**os.environ, "OUT_DIR": str(out_dir), "WORK_DIR": str(work_dir),
           "VERSION_SUFFIX": suffix}
    done = subprocess.run([str(BUILD_DEB)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, f"build-deb.sh failed:\n{done.stdout}\n{done.stderr}"
    path = Path(done.stdout.strip().splitlines()[-1])
    return Deb(path, field(path, "Version"), time.monotonic() - started)


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def contents(deb: Path) -> dict[str, str]:
    """Every path in the package ('./opt/...' without the dot) and its link target or ''."""
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    paths: dict[str, str] = {}
    for line in listing.splitlines():
        name = line.split(None, 5)[5]
        path, _, target = name.partition(" -> ")
        paths[path.removeprefix(".").rstrip("/") or "/"] = target
    return paths


def version_greater(newer: str, older: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", newer, "gt", older]).returncode == 0
