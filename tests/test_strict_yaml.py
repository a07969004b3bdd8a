"""Issue 21 items 3 and 6: duplicate keys and alias bombs in carbond.yaml and the web config.

A repeated `tls_server_config: {}` served plain HTTP and a repeated `basic_auth_users: {}`
served /metrics without credentials (PyYAML keeps the last value); a second `budgets:`
replaced the first. A 408-byte alias bomb took 21.6 s and 3.2 GB in `carbond check` and an
802 MB log line on SIGHUP. Both are refused, exit 2, naming the file and line; a reload keeps
the old configuration.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.config import read_file, strict_yaml
from carbond.types import ConfigError
from carbond.web.config import WebConfigWatcher, load_web_config
from tests import powercap
from tests.helpers import carbond_run, free_port, total


def billion_laughs(key: str) -> str:
    """The classic bomb under `key`: nine levels of nine aliases, 9**9 strings."""
    levels = ['  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"  - &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return f"{key}:\n" + "\n".join(levels) + "\n"


def check(config: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`carbond check` with its address space capped at 1 GiB: a bomb expanded in memory
    fails it (a MemoryError, exit 1), as the 3.2 GB it took before would."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [sys.executable, "-m", "carbond", "check", "--config", str(config), "--state-dir",
         str(tmp_path), "--powercap-root", str(tmp_path / "none"), *extra],
        capture_output=True, text=True, timeout=120, preexec_fn=limit)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


# -- duplicate keys ----------------------------------------------------------------------------


def test_a_second_budgets_key_is_exit_2_naming_both_lines(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("interval: 5s\n"
                      "budgets:\n"
                      "  - {name: research, limit: 250kg}\n"
                      "pue: 1.1\n"
                      "budgets: []\n")
    line = one_error_line(check(config, tmp_path))
    assert f"{config}:5: duplicate key 'budgets' (first at line 2)" in line


@pytest.mark.parametrize(("text", "where"), [
    ("meters:\n  rapl:\n    enabled: auto\n    enabled: off\n",
     ":4: duplicate key 'enabled' (first at line 3)"),
    ("budgets:\n  - name: a\n    limit: 1kg\n    name: b\n",
     ":4: duplicate key 'name' (first at line 2)"),
    ("attribution: {rules: [{match: a, kind: unit, name: x, kind: job}]}\n",
     ":1: duplicate key 'kind' (first at line 1)"),
    ("pue: 1.0\n'pue': 2.0\n", ":2: duplicate key 'pue' (first at line 1)"),
])
def test_duplicate_keys_are_refused_at_every_level(tmp_path, text: str, where: str) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_file(str(config))
    assert info.value.key == "--config" and f"{config}{where}" in str(info.value)


def test_merge_keys_may_still_be_overridden(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("budgets:\n"
                      "  - &base {name: a, period: week, limit: 1kg}\n"
                      "  - {<<: *base, name: b}\n")
    tree = read_file(str(config))
    assert [(b.name, b.period) for b in tree["budgets"]] == [("a", "week"), ("b", "week")]


@pytest.mark.parametrize(("text", "where"), [
    ("tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\ntls_server_config: {}\n",
     ":4: duplicate key 'tls_server_config' (first at line 1)"),
    ("basic_auth_users:\n  alice: $2b$04$x\nbasic_auth_users: {}\n",
     ":3: duplicate key 'basic_auth_users' (first at line 1)"),
    ("basic_auth_users:\n  alice: a\n  bob: b\n  alice: c\n",
     ":4: duplicate key 'alice' (first at line 2)"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: deny\n    X-Frame-Options: x\n",
     ":4: duplicate key 'X-Frame-Options' (first at line 3)"),
])
def test_web_config_duplicates_are_refused_before_they_switch_security_off(
        tmp_path, text: str, where: str) -> None:
    web = tmp_path / "web.yml"
    web.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_web_config(str(web))
    assert info.value.key == "--web.config.file" and f"{web}{where}" in str(info.value)


def test_web_config_duplicate_at_start_is_exit_2(tmp_path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {}\nbasic_auth_users: {}\n")
    config = tmp_path / "carbond.yaml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "carbond", "run", "--config", str(config), "--listen",
         f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path), "--web.config.file",
         str(web)],
        capture_output=True, text=True, timeout=60)
    line = one_error_line(result)
    assert "--web.config.file" in line and "duplicate key 'basic_auth_users'" in line


def test_a_changed_web_config_with_a_duplicate_keeps_the_old_one(tmp_path) -> None:
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  alice: '$2b$04$" + "a" * 53 + "'\n")
    now = [0.0]
    watcher = WebConfigWatcher(str(web), check_seconds=1.0, clock=lambda: now[0])
    assert set(watcher.current().users) == {"alice"}
    web.write_text("basic_auth_users:\n  alice: '$2b$04$" + "a" * 53 + "'\nbasic_auth_users: {}\n")
    now[0] = 2.0
    assert set(watcher.current().users) == {"alice"}  # still protected


def test_sighup_with_a_duplicate_key_keeps_the_old_config(tmp_path) -> None:
    powercap.FakePowercap(str(tmp_path / "powercap")).add("intel-rapl:0", "package-0")
    config = tmp_path / "carbond.yaml"
    config.write_text("intensity: {providers: [{constant: {grams_per_kwh: 100}}]}\n")
    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--interval", "1s") as daemon:
        before = daemon.wait_ticks(1)
        config.write_text("intensity: {providers: [{constant: {grams_per_kwh: 200}}]}\n"
                          "intensity: {providers: [{constant: {grams_per_kwh: 300}}]}\n")
        daemon.process.send_signal(signal.SIGHUP)
        kept = daemon.wait_ticks(2)
        assert daemon.process.poll() is None
    log = daemon.process.stderr.read()
    assert total(before, "carbond_grid_intensity_grams_per_kwh") == 100.0
    assert total(kept, "carbond_grid_intensity_grams_per_kwh") == 100.0
    assert "duplicate key 'intensity' (first at line 1)" in log
    assert "not reloaded, the old one stays in force" in log


# -- alias bombs -------------------------------------------------------------------------------


def test_the_billion_laughs_is_refused_in_bounded_memory_with_exit_2(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text(billion_laughs("budgets"))
    assert len(config.read_bytes()) < 500
    line = one_error_line(check(config, tmp_path))
    assert "aliases expand to more than 10,000 nodes" in line
    assert len(line) < 300


def test_the_billion_laughs_in_the_web_config_is_refused(tmp_path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(billion_laughs("basic_auth_users"))
    with pytest.raises(ConfigError) as info:
        load_web_config(str(web))
    assert "aliases expand to more than 10,000 nodes" in str(info.value)


def test_sighup_with_an_alias_bomb_keeps_ticking_and_logs_one_short_line(tmp_path) -> None:
    powercap.FakePowercap(str(tmp_path / "powercap")).add("intel-rapl:0", "package-0")
    config = tmp_path / "carbond.yaml"
    config.write_text("pue: 1.5\n")
    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--interval", "1s") as daemon:
        daemon.wait_ticks(1)
        config.write_text(billion_laughs("budgets"))
        daemon.process.send_signal(signal.SIGHUP)
        kept = daemon.wait_ticks(3)
    log = daemon.process.stderr.read()
    assert total(kept, "carbond_pue_ratio") == 1.5
    assert "aliases expand to more than" in log
    assert max(len(line) for line in log.splitlines()) < 1000


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(strict_yaml.StrictYamlError) as info:
        strict_yaml.load("a: &x [1, *x]\n")
    assert info.value.line == 1 and "recursive alias" in info.value.problem


def test_aliases_that_add_a_few_nodes_are_fine() -> None:
    text = "a: &x {k: [1, 2, 3]}\nb: [*x, *x, *x]\n"
    assert strict_yaml.load(text) == yaml.safe_load(text)


def test_a_huge_refused_value_is_echoed_cut(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("listen: '" + "x" * 100_000 + "'\nlog_level: [" + "1, " * 50_000 + "1]\n")
    with pytest.raises(ConfigError) as info:
        read_file(str(config))
    assert len(str(info.value)) < 300 and "…" in str(info.value)
    config.write_text("y" * 50_000 + ": 1\n")
    with pytest.raises(ConfigError) as info:
        read_file(str(config))
    assert len(str(info.value)) < 600


# -- fuzz: both files, any document ------------------------------------------------------------

_KEYS = st.sampled_from(["interval", "pue", "budgets", "name", "limit", "meters", "rapl",
                         "enabled", "tls_server_config", "basic_auth_users", "alice", "x"])
_SCALARS = st.one_of(st.integers(-5, 5), st.sampled_from(["5s", "1kg", "auto", "on", "", "x"]),
                     st.booleans(), st.none())
_TREES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.lists(st.tuples(_KEYS, inner), max_size=4)), max_leaves=12)


def _render(tree: object, indent: int = 0) -> str:
    """Block YAML of a tree whose mappings are lists of (key, value) pairs: keys may repeat."""
    pad = " " * indent
    if isinstance(tree, list) and tree and all(isinstance(p, tuple) for p in tree):
        return "".join(f"{pad}{k}:\n{_render(v, indent + 2)}" for k, v in tree)
    if isinstance(tree, list):
        return "".join(f"{pad}-\n{_render(v, indent + 2)}" for v in tree) or f"{pad}[]\n"
    return f"{pad}{yaml.safe_dump(tree, default_flow_style=True).strip().removesuffix('...')}\n"


def _has_duplicates(tree: object) -> bool:
    if isinstance(tree, list) and tree and all(isinstance(p, tuple) for p in tree):
        keys = [k for k, _ in tree]
        return len(keys) != len(set(keys)) or any(_has_duplicates(v) for _, v in tree)
    return isinstance(tree, list) and any(_has_duplicates(v) for v in tree)


@settings(max_examples=300, deadline=None)
@given(_TREES)
def test_fuzz_strict_load_refuses_exactly_the_documents_with_duplicate_keys(tree) -> None:
    text = _render(tree)
    if _has_duplicates(tree):
        with pytest.raises(strict_yaml.StrictYamlError, match="duplicate key"):
            strict_yaml.load(text)
    else:
        assert strict_yaml.load(text) == yaml.safe_load(text)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_TREES.map(_render), st.text(max_size=200)))
def test_fuzz_any_text_as_carbond_yaml_loads_or_is_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "carbond.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        read_file(str(path))
    except ConfigError as exc:  # anything else (a TypeError in a validator) fails the test
        assert len(str(exc)) <= 1300


@settings(max_examples=200, deadline=None)
@given(st.one_of(_TREES.map(_render), st.text(max_size=200)))
def test_fuzz_any_text_as_web_config_loads_or_is_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "web.yml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_web_config(str(path))
    except ConfigError as exc:
        assert exc.key == "--web.config.file" and len(str(exc)) <= 1300
