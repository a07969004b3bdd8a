"""`make install` / `make uninstall` with DESTDIR and PREFIX, and the sample configuration
(issue 13, item 1).

The layout tests pass INSTALL_VENV=no (the venv step needs PyPI); the full install, venv
included, runs when CARBOND_TEST_INSTALL=1 and is then started from its final path inside a
private mount namespace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from carbond import __version__, config

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "deploy" / "carbond.yaml"


def make(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make missing")
    result = subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def exec_start(unit: Path) -> str:
    return next(line.split("=", 1)[1] for line in unit.read_text().splitlines()
                if line.startswith("ExecStart="))


def test_install_lays_out_unit_sample_config_and_never_overwrites_it(tmp_path):
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", "INSTALL_VENV=no")
    unit = dest / "etc" / "systemd" / "system" / "carbond.service"
    conf = dest / "etc" / "carbond" / "carbond.yaml"
    shipped = dest / "opt" / "carbond" / "share" / "carbond" / "carbond.yaml"
    assert unit.read_text() == (ROOT / "deploy" / "systemd" / "carbond.service").read_text()
    assert conf.read_text() == SAMPLE.read_text() == shipped.read_text()
    assert {p.name for p in (dest / "opt" / "carbond" / "share" / "carbond").iterdir()} == {
        "carbond.yaml", "README.md", "deploy.md"}
    assert oct(unit.stat().st_mode & 0o777) == "0o644"

    # Upgrade: an edited configuration survives a second install; the unit is replaced.
    conf.write_text("interval: 10s\n")
    unit.write_text("stale\n")
    make("install", f"DESTDIR={dest}", "INSTALL_VENV=no")
    assert conf.read_text() == "interval: 10s\n"
    assert "Type=notify" in unit.read_text()

    # Uninstall removes the program and the unit, keeps configuration and state.
    make("uninstall", f"DESTDIR={dest}")
    assert not unit.exists() and not (dest / "opt" / "carbond").exists()
    assert conf.read_text() == "interval: 10s\n"


def test_prefix_and_confdir_reach_the_unit(tmp_path):
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", "INSTALL_VENV=no", "PREFIX=/srv/carbond",
         "CONFDIR=/srv/etc/carbond")
    unit = dest / "etc" / "systemd" / "system" / "carbond.service"
    assert exec_start(unit) == "/srv/carbond/bin/carbond run --config /srv/etc/carbond/carbond.yaml"
    assert "file:///srv/carbond/share/carbond/README.md" in unit.read_text()
    assert (dest / "srv" / "etc" / "carbond" / "carbond.yaml").exists()
    make("uninstall", f"DESTDIR={dest}", "PREFIX=/srv/carbond")
    assert not (dest / "srv" / "carbond").exists()


def test_uninstall_refuses_a_prefix_that_is_not_carbonds(tmp_path):
    dest = tmp_path / "dest"
    (dest / "usr").mkdir(parents=True)
    result = subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}", "PREFIX=/usr"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "refusing" in result.stderr
    assert (dest / "usr").is_dir()
    unit = dest / "etc" / "systemd" / "system" / "carbond.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}", "PREFIX=/usr"], cwd=ROOT,
                   capture_output=True, text=True)
    assert unit.exists()  # refused before touching anything


# ---- the sample configuration -------------------------------------------------------------------


def uncomment(text: str) -> str:
    """Turn every commented setting on: a line starting "#" directly followed by a key, and
    the "#  "-indented lines under it. Prose comments ("# text") stay comments."""
    lines, in_setting = [], False
    for line in text.splitlines():
        if re.match(r"^#[^ #]", line):
            in_setting, line = True, line[1:]
        elif in_setting and line.startswith("#  "):
            line = line[1:]
        else:
            in_setting = False
        lines.append(line)
    return "\n".join(lines) + "\n"


def schema_keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, spec in schema.items():
        keys.add(prefix + name)
        if isinstance(spec, dict):
            keys |= schema_keys(spec, f"{prefix}{name}.")
    return keys


def tree_keys(tree: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Keys set in a config tree, descending where the schema has a section."""
    keys = set()
    for name, value in tree.items():
        keys.add(prefix + name)
        if isinstance(schema.get(name), dict) and isinstance(value, dict):
            keys |= tree_keys(value, schema[name], f"{prefix}{name}.")
    return keys


def test_sample_config_is_inert_as_installed_and_lists_every_key_with_its_default(tmp_path):
    # As installed, every setting is a comment: the file is the built-in defaults.
    as_installed = config.load(str(SAMPLE), {})
    assert dataclasses.replace(as_installed, source=None, source_sha256=None) == config.Config()

    # Uncommented, it is still exactly the defaults, and it names every key carbond has.
    on = tmp_path / "carbond.yaml"
    on.write_text(uncomment(SAMPLE.read_text()))
    loaded = config.load(str(on), {})
    assert dataclasses.replace(loaded, source=None, source_sha256=None) == config.Config()
    tree = yaml.safe_load(on.read_text())
    assert tree_keys(tree, config.SCHEMA) == schema_keys(config.SCHEMA)


def test_uncomment_turns_on_settings_only():
    text = "# prose: not a key\n#listen: x\n#meters:\n#  rapl: y\n# more prose\n#   e.g. z\n"
    assert uncomment(text) == "# prose: not a key\nlisten: x\nmeters:\n  rapl: y\n" \
                              "# more prose\n#   e.g. z\n"


# ---- the real install, venv included ------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("CARBOND_TEST_INSTALL") != "1",
                    reason="needs PyPI; set CARBOND_TEST_INSTALL=1 to run")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_real_install_runs_from_its_final_path(tmp_path):
    """The staged venv, moved to /opt/carbond by a bind mount in a private mount namespace
    (nothing on this machine changes), starts and checks this host."""
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}")
    venv = dest / "opt" / "carbond"
    assert str(dest) not in (venv / "bin" / "carbond").read_text()
    script = (f"mount -t tmpfs none /opt && mkdir /opt/carbond && "
              f"mount --bind {venv} /opt/carbond && "
              "/opt/carbond/bin/carbond --version && "
              f"/opt/carbond/bin/carbond check --config {dest}/etc/carbond/carbond.yaml "
              f"--state-dir {tmp_path}/state")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert __version__ in result.stdout
    assert "result: at least one meter works" in result.stdout
