"""The sdist and wheel (`python -m build`, issue 23): PEP 639 licence metadata without a
warning, the package data inside, and a wheel that a real pipx installs offline from a
wheelhouse and that runs away from the source tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from carbond import __version__

ROOT = Path(__file__).resolve().parent.parent
DATA = ("carbond/carbon/data/grid-intensity-by-country.csv",
        "carbond/carbon/data/cloud-regions.csv")
# pip's own notes on this machine's index configuration (a find-links directory that does not
# exist), printed while it installs the build backend: about the machine, not the build.
PIP_LOCATION_NOTE = re.compile(r"^WARNING: Location '.*' is ignored")


def build_env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE makes setuptools say "byte-compiling is disabled" (a warning of
    # the environment, not of the project): builds run without it, as a release would.
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600, env=build_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout + done.stderr


def test_build_makes_sdist_and_wheel_without_a_warning(dist):
    out, log = dist
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"carbond-{__version__}-py3-none-any.whl", f"carbond-{__version__}.tar.gz"]
    noise = [line for line in log.splitlines()
             if re.search(r"(?i)warn|deprecat", line) and not PIP_LOCATION_NOTE.match(line)]
    assert noise == [], "\n".join(noise)


def test_the_wheel_has_the_licence_expression_and_the_package_data(dist):
    out, _ = dist
    with zipfile.ZipFile(out / f"carbond-{__version__}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
        meta = wheel.read(f"carbond-{__version__}.dist-info/METADATA").decode()
    assert set(DATA) <= names
    assert f"carbond-{__version__}.dist-info/licenses/LICENSE" in names
    headers = meta.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
    assert not [h for h in headers if h.startswith(("License: ", "Classifier: License"))]
    assert "Metadata-Version: 2.4" in headers  # the version PEP 639 defines these fields in
    with tarfile.open(out / f"carbond-{__version__}.tar.gz") as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"LICENSE", "pyproject.toml", "README.md", *DATA} <= members


def test_pipx_installs_the_wheel_offline_and_it_runs_outside_the_tree(dist, tmp_path):
    """pipx itself comes from PyPI into a throwaway venv, and the dependencies (and pip) into
    a wheelhouse (both at "build time"); the install then reads nothing but the wheelhouse."""
    out, _ = dist
    wheel = out / f"carbond-{__version__}-py3-none-any.whl"
    wheelhouse = tmp_path / "wheelhouse"
    # pip too: pipx keeps a shared pip of its own, installed from the same place.
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheelhouse),
                    str(wheel), "pip"], check=True, timeout=600)
    tools = tmp_path / "tools"
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True, timeout=120)
    subprocess.run([tools / "bin" / "python", "-m", "pip", "install", "-q", "pipx>=1.4,<2"],
                   check=True, timeout=600)
    env = {**build_env(), "PIPX_HOME": str(tmp_path / "pipx"),
           "PIPX_BIN_DIR": str(tmp_path / "bin"), "PIPX_MAN_DIR": str(tmp_path / "man"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
    done = subprocess.run([tools / "bin" / "pipx", "install", str(wheel)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    carbond = tmp_path / "bin" / "carbond"
    version = subprocess.run([carbond, "--version"], capture_output=True, text=True,
                             check=True, cwd=tmp_path)
    assert version.stdout.strip() == f"carbond {__version__}"
    # The embedded per-country table: package data read from the installed wheel.
    now = subprocess.run([carbond, "intensity", "--zone", "FR", "--state-dir",
                          str(tmp_path / "state")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert now.returncode == 0, now.stderr
    assert re.match(r"^[\d.]+ gCO2e/kWh  zone FR  provider static", now.stdout), now.stdout
    where = subprocess.run([tmp_path / "pipx" / "venvs" / "carbond" / "bin" / "python", "-c",
                            "import carbond; print(carbond.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path)
    assert where.stdout.startswith(str(tmp_path / "pipx" / "venvs" / "carbond"))
