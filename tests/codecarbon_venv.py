"""A virtual environment holding the real CodeCarbon 3.3 from PyPI (and the pandas it brings),
apart from carbond's own: the coexistence tests run CodeCarbon there and read the CSV with its
pandas. Made once and kept under ~/.cache/carbond-tests (CARBOND_TEST_CACHE overrides), so a
suite pays for the install once; parallel sessions wait on one lock.

`python tests/codecarbon_venv.py` makes it ahead of time (CI's cache step)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

REQUIREMENT = "codecarbon==3.3.*"
NAME = "codecarbon-3.3"


def cache_dir() -> Path:
    base = os.environ.get("CARBOND_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "carbond-tests")
    return Path(base)


def codecarbon_python() -> Path:
    """The venv's interpreter, installing it first if needed; RuntimeError (with pip's own
    words) when it cannot be made."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / NAME
    stamp = venv / ".installed"
    python = venv / "bin" / "python"
    with open(root / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if stamp.exists() and python.exists():
            return python
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  REQUIREMENT]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {done.stderr.strip()[-2000:]}")
        stamp.write_text(REQUIREMENT + "\n")
    return python


if __name__ == "__main__":
    print(codecarbon_python())
