"""What `make deb` builds (issue 23): its control data, its files, and lintian's verdict.

The package's life under a real systemd is tests/test_deploy_package.py; here the .deb is read
as dpkg and lintian read it, and its venv is run from /opt/carbond in a private mount namespace.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from carbond import __version__
from tests.deb_helpers import ROOT, Deb, contents, field, version_greater

DEBIAN = ROOT / "deploy" / "debian"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
SITE = "/opt/carbond/lib/python3.11/site-packages"


def extracted(deb: Deb, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb.path), str(into)], check=True)
    return into


def requirement_names() -> list[str]:
    """carbond's runtime dependencies (pyproject.toml), as the installed metadata lists them."""
    specs = importlib.metadata.requires("carbond") or []
    return [re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0] for spec in specs
            if "extra ==" not in spec]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def test_control_fields_name_the_version_arch_and_what_it_runs_on(carbond_deb):
    assert field(carbond_deb.path, "Package") == "carbond"
    assert carbond_deb.version == f"{__version__}-1"
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert field(carbond_deb.path, "Architecture") == arch
    assert carbond_deb.path.name == f"carbond_{__version__}-1_{arch}.deb"
    depends = [d.strip() for d in field(carbond_deb.path, "Depends").split(",")]
    # The venv's site-packages and binary wheels are this python3 minor's: exactly it.
    assert depends[:2] == ["python3 (>= 3.11)", "python3 (<< 3.12)"]
    assert any(d.startswith("libc6 (>= ") for d in depends)  # dpkg-shlibdeps on the wheels
    assert not any(d.startswith(("python3-venv", "python3-pip")) for d in depends)


def test_files_venv_unit_conffile_docs_and_nothing_of_the_build(carbond_deb, tmp_path):
    paths = contents(carbond_deb.path)
    for path in ("/lib/systemd/system/carbond.service", "/etc/carbond/carbond.yaml",
                 "/usr/share/doc/carbond/copyright", "/usr/share/doc/carbond/changelog.Debian.gz",
                 "/usr/share/doc/carbond/README.md", "/usr/share/doc/carbond/deploy.md",
                 "/usr/share/man/man1/carbond.1.gz", "/opt/carbond/bin/carbond",
                 "/opt/carbond/pyvenv.cfg", f"{SITE}/carbond/commands/reload.py",
                 f"{SITE}/carbond/carbon/data/grid-intensity-by-country.csv",
                 f"{SITE}/carbond/carbon/data/cloud-regions.csv"):
        assert path in paths, path
    assert paths["/opt/carbond/bin/python3"] == "/usr/bin/python3"  # Debian's, not a copy
    assert paths["/usr/bin/carbond"] == "/opt/carbond/bin/carbond"
    # Every dependency inside, and no installer left in it; bytecode is made by postinst.
    installed = {normalised(p.split("/")[-1].split("-")[0]) for p in paths
                 if p.startswith(SITE) and p.endswith(".dist-info")}
    assert {normalised(n) for n in requirement_names()} | {"carbond"} <= installed
    assert not installed & {"pip", "setuptools", "wheel"}
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]

    tree = extracted(carbond_deb, tmp_path / "deb")
    assert (tree / "DEBIAN" / "conffiles").read_text().split() == ["/etc/carbond/carbond.yaml"]
    assert (tree / "etc/carbond/carbond.yaml").read_text() == \
        (ROOT / "deploy" / "carbond.yaml").read_text()
    unit = (tree / "lib/systemd/system/carbond.service").read_text()
    assert "Documentation=file:///usr/share/doc/carbond/deploy.md" in unit
    assert "ExecReload=/opt/carbond/bin/carbond reload --pid $MAINPID" in unit
    source = (ROOT / "deploy" / "systemd" / "carbond.service").read_text()
    settings = [line for line in unit.splitlines() if not line.startswith(("#", "Doc"))]
    assert settings == [line for line in source.splitlines()
                        if not line.startswith(("#", "Doc"))]
    # md5sums lists every file, right; no file names the staging tree.
    sums = dict(reversed(line.split("  ", 1)) for line in
                (tree / "DEBIAN" / "md5sums").read_text().splitlines())
    files = {str(p.relative_to(tree)) for p in tree.rglob("*")
             if p.is_file() and not p.is_symlink() and "DEBIAN" not in p.parts}
    assert set(sums) == files
    for name in files:
        data = (tree / name).read_bytes()
        assert hashlib.md5(data).hexdigest() == sums[name], name
        assert b"build/deb" not in data and b"deb-work" not in data, name
    for script in ("postinst", "prerm", "postrm"):
        assert os.stat(tree / "DEBIAN" / script).st_mode & 0o777 == 0o755
        subprocess.run(["sh", "-n", str(tree / "DEBIAN" / script)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")
def test_the_venv_runs_from_its_final_path(carbond_deb, tmp_path):
    """Bind-mounted at /opt/carbond in a mount namespace of its own (the host's /opt is not
    touched): it runs without the build tree, on Debian's python3, with its package data."""
    tree = extracted(carbond_deb, tmp_path / "deb")
    script = (f"mount -t tmpfs none /opt && mkdir /opt/carbond && "
              f"mount --bind {tree}/opt/carbond /opt/carbond && cd / && "
              "/opt/carbond/bin/carbond --version && "
              "/opt/carbond/bin/carbond intensity --zone FR --state-dir "
              f"{tmp_path}/state && /opt/carbond/bin/python -c "
              "'import sys, carbond; print(sys.executable, carbond.__file__)'")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                           script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"carbond {__version__}"
    assert "FR" in done.stdout and "static" in done.stdout  # the embedded per-country table
    assert lines[-1] == f"/opt/carbond/bin/python {SITE}/carbond/__init__.py"


def override_tags() -> list[str]:
    return [line.split(" [")[0].split()[0] for line in
            (DEBIAN / "lintian-overrides").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(shutil.which("lintian") is None,
                    reason="lintian missing (scripts/test-deps.sh installs it)")
def test_lintian_finds_nothing_beyond_the_explained_overrides(carbond_deb):
    done = subprocess.run(["lintian", "--pedantic", "--display-info", str(carbond_deb.path)],
                          capture_output=True, text=True, timeout=300)
    tags = [line for line in (done.stdout + done.stderr).splitlines()
            if re.match(r"^[EWIPX]: ", line)]  # an unused override is a tag of its own
    assert tags == [] and done.returncode == 0, done.stdout + done.stderr
    # Each override is explained in docs/deploy.md, and the table there lists no other.
    doc = DEPLOY_DOC.read_text()
    section = doc[doc.index("#### lintian"):]
    section = section[:section.index("\n#")] if "\n#" in section else section
    documented = {tag for cell in re.findall(r"^\| (.+?) \|", section, re.MULTILINE)
                  for tag in re.findall(r"`([a-z0-9.+-]+)`", cell)}
    assert documented == set(override_tags())


def test_a_version_suffix_makes_a_newer_build_of_the_same_files(carbond_deb,
                                                                carbond_deb_newer):
    assert carbond_deb_newer.version == f"{carbond_deb.version}+test2"
    assert version_greater(carbond_deb_newer.version, carbond_deb.version)
    assert set(contents(carbond_deb_newer.path)) == set(contents(carbond_deb.path))


def test_every_installed_distribution_record_matches_its_files(carbond_deb, tmp_path):
    """pip's RECORD of each distribution, scripts included after their shebangs were pointed
    at /opt/carbond: what `pip check`-style tools and a second build compare against."""
    tree = extracted(carbond_deb, tmp_path / "deb")
    site = tree / SITE.lstrip("/")
    records = sorted(site.glob("*.dist-info/RECORD"))
    assert len(records) >= 1 + len(requirement_names())
    for record in records:
        for row in csv.reader(record.read_text().splitlines()):
            if not row[1]:
                continue  # RECORD itself, and bytecode pip would have written
            path = (site / row[0]).resolve()
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert (row[1], row[2]) == (f"sha256={digest.decode()}", str(len(data))), row[0]
