"""Configuration: precedence, every key accepted, each class of bad input exits 2 naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from carbond import config
from carbond.types import ConfigError

FULL = """
listen: "127.0.0.1:9999"
interval: 10s
state_dir: /tmp/carbond-state
cgroup_root: /sys/fs/cgroup/unified
proc_root: /proc
log_level: debug
meters:
  rapl:  {enabled: auto, root: /sys/class/powercap}
  nvml:  {enabled: false}
  model: {enabled: auto, cpu_watts_min: 0.74, cpu_watts_max: 3.5, memory_watts_per_gb: 0.392}
attribution:
  idle: proportional
  idle_watts: {cpu: 12.5, gpu: auto}
  max_consumers: 50
  processes: auto
  rules:
    - match: '^system\\.slice/jupyter-(?P<user>[^.]+)\\.service$'
      kind: user
      name: '{user}'
intensity:
  zone: DE
  refresh: 15m
  max_age: 2h
  providers:
    - electricitymaps: {token_file: /etc/carbond/em.token, url: https://api.electricitymaps.com}
    - static: {}
pue: 1.2
budgets:
  - {name: research, match: {kind: job}, period: month, limit: 250kg}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "carbond.yaml"
    path.write_text(text)
    return str(path)


def test_every_design_key_is_accepted(tmp_path):
    cfg = config.load(write(tmp_path, FULL), {})
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 9999)
    assert cfg.interval_seconds == 10
    assert cfg.nvml_enabled == "off"
    assert cfg.idle_policy == "proportional" and cfg.idle_watts_cpu == 12.5
    assert cfg.idle_watts_gpu is None
    assert cfg.rules[0].kind == "user"
    assert cfg.zone == "DE" and cfg.intensity_refresh_seconds == 900
    assert cfg.intensity_max_age_seconds == 7200
    assert cfg.providers[0][0] == "electricitymaps"
    assert cfg.pue == 1.2
    assert cfg.budgets[0].limit_grams == 250_000


def test_precedence_flags_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "interval: 10s\npue: 1.3\n")
    cfg = config.load(path, {"--interval": "2s", "--pue": None})
    assert cfg.interval_seconds == 2  # flag wins
    assert cfg.pue == 1.3  # file wins over default
    assert cfg.model_cpu_watts_max == 3.5  # default
    assert config.load(None, {}).interval_seconds == 5


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("intervall: 5s\n", "intervall", "did you mean 'interval'"),
        ("meters:\n  rapl: {enabeld: true}\n", "meters.rapl.enabeld", "did you mean 'enabled'"),
        ("interval: -5s\n", "interval", "positive"),
        ("interval: 0s\n", "interval", "positive"),
        ("interval: 5 parsecs\n", "interval", "unknown unit 'parsecs'"),
        ("interval: soon\n", "interval", "cannot parse"),
        ("interval: 5y\n", "interval", "unknown unit"),
        ("interval: [5]\n", "interval", "expected a duration"),
        ("interval: 1ms\n", "interval", "at least 0.1s"),
        ("interval: 0.05s\n", "interval", "at least 0.1s"),
        ("pue: fast\n", "pue", "expected a number"),
        ("pue: 0.5\n", "pue", ">= 1"),
        ("attribution: {max_consumers: -3}\n", "attribution.max_consumers", "positive integer"),
        ("attribution: {idle: sometimes}\n", "attribution.idle", "separate, proportional"),
        ("budgets: [{name: r, limit: 12 tonnes}]\n", "budgets[0].limit", "unknown unit"),
        ("budgets: [{name: r, limit: lots}]\n", "budgets[0].limit", "'lots' as a mass"),
        ("budgets: [{name: r, limit: -1kg}]\n", "budgets[0].limit", "positive"),
        ("intensity: {zone: 'not a zone!'}\n", "intensity.zone", "malformed zone"),
        ("intensity: {providers: [{electricitymap: {}}]}\n", "intensity.providers[0]",
         "did you mean 'electricitymaps'"),
        ("intensity: {providers: [{ukgrid: {region: 18}}]}\n",
         "intensity.providers[0].ukgrid.region", "1..17"),
        ("intensity: {providers: [static, static]}\n", "intensity.providers[1]", "listed twice"),
        ("listen: nowhere\n", "listen", "HOST:PORT"),
        ("meters: 3\n", "meters", "expected a mapping"),
        ("attribution:\n  rules:\n    - {match: '(', kind: unit, name: x}\n",
         "attribution.rules[0].match", "regular expression"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), {})
    assert caught.value.key == key
    assert words in str(caught.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", *args], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--interval=-5s"], "--interval: must be positive"),
        (["--interval", "0"], "--interval: must be positive"),
        (["--interval", "soon"], "--interval: cannot parse"),
        (["--pue", "abc"], "--pue: expected a number"),
        (["--zone", "x y"], "--zone: malformed zone"),
        (["--listen", "localhost"], "--listen: expected HOST:PORT"),
        (["--config", "/nonexistent/carbond.yaml"], "--config: cannot read /nonexistent"),
        (["--interval", "1ms"], "--interval: must be at least 0.1s"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle):
    result = run_cli("check", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and needle in result.stderr


def test_unknown_key_exits_2_with_suggestion(tmp_path):
    result = run_cli("run", "--config", write(tmp_path, "intervall: 5s\n"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "carbond: error: intervall: unknown key 'intervall' (did you mean 'interval'?)"
    )


def test_malformed_yaml_names_the_line(tmp_path):
    result = run_cli("run", "--config", write(tmp_path, "interval: 5s\nmeters:\n  rapl: [\n"))
    assert result.returncode == 2
    assert "malformed YAML" in result.stderr and "line 4" in result.stderr
    assert result.stderr.count("\n") == 1


def test_unreadable_config_file(tmp_path):
    result = run_cli("check", "--config", str(tmp_path))  # a directory: read fails even as root
    assert result.returncode == 2
    assert "--config: cannot read" in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("carbond ")


def test_a_config_file_that_is_not_utf8_exits_2_naming_it(tmp_path):
    path = tmp_path / "carbond.yaml"
    path.write_bytes(b"interval: 5s\nintensity: {zone: \xff\xfe}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"carbond: error: --config: {path} is not UTF-8 text (byte 31)"
