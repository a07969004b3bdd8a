"""carbond for a test that runs it as another user (nobody), wherever the clone lives.

A clone in a directory only root may enter (/root is 0700) left the dropped user without the
package ("No module named carbond"): the repository, the venv and its site-packages were out of
reach. `install_for_others` copies what `python -m carbond` needs (the carbond package and the
distributions it depends on, file by file as their RECORDs list them) into a fresh directory
every user can read, for PYTHONPATH; `interpreter_for_others` picks a Python that user can run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """carbond's run-time requirements, recursively (extras, i.e. the test tools, left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = ["carbond"]
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a marker excluded it here
        found[key] = dist
        for requirement in dist.requires or ():
            if "extra ==" not in requirement:
                match = _NAME.match(requirement)
                if match:
                    pending.append(match.group(0))
    return list(found.values())


def _readable_by_all(top: Path) -> None:
    for directory, _, files in os.walk(top):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, os.stat(path).st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def install_for_others() -> Path:
    """A new 0755 directory holding carbond and its dependencies; the caller removes it."""
    site = Path(tempfile.mkdtemp(prefix="carbond-site-"))
    for dist in _runtime_distributions():
        if dist.metadata["Name"] == "carbond":
            continue  # installed editable: its files are the repository's, copied below
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            if file.parts[0] == ".." or not source.is_file() or "__pycache__" in file.parts:
                continue  # console scripts live outside site-packages
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shutil.copytree(ROOT / "carbond", site / "carbond",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _readable_by_all(site)
    return site


def _reachable_by_others(path: str) -> bool:
    """Whether every directory on the way to `path` (links resolved) lets others through."""
    real = Path(os.path.realpath(path))
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in real.parents)


def interpreter_for_others() -> str | None:
    """This Python if another user can reach it and its standard library, else the system's
    Python of the same version (the copied extension modules are built for it); None if
    neither exists."""
    if _reachable_by_others(sys.executable) and _reachable_by_others(
            os.path.join(sys.base_prefix, "lib")):
        return sys.executable
    system = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    return system if os.path.exists(system) else None
