"""Issue 21 item 1: no `attribution.rules` pattern and no cgroup name can freeze a tick.

`(a+)+$` against a cgroup named `rp-` + 40 x `a` + `!` took exponential time in Python's
backtracking `re` (ticks stopped, SIGTERM ignored); `^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\\.scope$`
is cubic (0.84 s on a 1,000-character path). Rules are compiled with RE2, which matches in time
linear in the path, and patterns RE2 cannot run that way are refused at load.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.config import load
from carbond.types import ConfigError, Consumer
from carbond.workloads.naming import MAX_RULE_PATH_CHARS, CgroupNamer, compile_rules
from tests.cgroup_helpers import TestTree
from tests.helpers import carbond_run, select, total
from tests.powercap import ConstantPower

CATASTROPHIC = {"match": "(a+)+$", "kind": "project", "name": "never"}
CUBIC = {"match": r"^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\.scope$", "kind": "unit", "name": "{z}"}
EVIL_NAME = "rp-" + "a" * 40 + "!"


def _deep_path(chars: int) -> str:
    """A path of `chars` characters in components a real cgroupfs accepts (<= 255 bytes),
    that neither rule matches (the slow case for a backtracking engine)."""
    parts, left = [], chars
    while left > 0:
        size = min(200, left)
        parts.append(("a-" * size)[:size])
        left -= size + 1
    return "/".join(parts)[:chars - 1] + "!"


NAMER_SCRIPT = """
import json, sys
from carbond.workloads.naming import CgroupNamer, compile_rules
rules, paths = json.loads(sys.argv[1])
namer = CgroupNamer(compile_rules(rules))
print(json.dumps([list(namer(path)) for path in paths]))
"""


def _name_in_child(rules: list[dict[str, str]], paths: list[str]) -> list[list[str]]:
    """The real namer in a child process: a backtracking engine would hold the GIL for hours,
    so only a separate process can be given up on (the bound is a hang detector)."""
    result = subprocess.run([sys.executable, "-c", NAMER_SCRIPT, json.dumps([rules, paths])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_catastrophic_and_the_cubic_rule_name_hostile_paths_promptly() -> None:
    paths = [EVIL_NAME, f"system.slice/{EVIL_NAME}", _deep_path(1000), _deep_path(4000),
             "system.slice/web-blue-eu.scope"]
    assert len(paths[2]) == 1000 and len(paths[3]) == 4000
    named = _name_in_child([CATASTROPHIC, CUBIC], paths)
    assert named[0] == ["cgroup", EVIL_NAME]  # no rule matched: the built-in name
    assert named[1] == ["cgroup", f"system.slice/{EVIL_NAME}"]
    assert named[2] == ["cgroup", paths[2]]
    assert named[3] == ["cgroup", paths[3]]
    assert named[4] == ["unit", "eu"]  # the cubic rule still works where it matches


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a)\1", "invalid escape sequence"),  # a backreference
    (r"^x(?=y)", "invalid perl operator"),  # lookahead
    (r"(?<!x)y", "invalid perl operator"),  # lookbehind
    (r"x\Z", "invalid escape sequence"),
    (r"((((a{1000}){1000}){1000}){1000})", "invalid repetition size"),
])
def test_patterns_re2_cannot_match_in_linear_time_are_refused_at_load(pattern, why) -> None:
    with pytest.raises(ConfigError) as info:
        compile_rules([{"match": "^ok$", "kind": "unit", "name": "x"},
                       {"match": pattern, "kind": "unit", "name": "x"}])
    assert info.value.key == "attribution.rules[1].match"
    assert "RE2" in info.value.problem and why in info.value.problem


def test_a_refused_rule_is_exit_2_naming_the_rule(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution:\n  rules:\n    - {match: '(a)\\1', kind: unit, name: x}\n")
    result = subprocess.run([sys.executable, "-m", "carbond", "check", "--config", str(config),
                             "--state-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "attribution.rules[0].match" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_rules_compare_by_their_text_so_a_reload_keeps_the_namer() -> None:
    one = compile_rules([CUBIC])
    two = compile_rules([dict(CUBIC)])
    assert one == two and one != compile_rules([CATASTROPHIC])


def test_paths_beyond_the_length_bound_skip_user_rules_and_are_counted() -> None:
    namer = CgroupNamer(compile_rules([{"match": "^a", "kind": "project", "name": "p"}]))
    assert namer("a/b") == Consumer("project", "p")
    assert namer.rules_skipped == 0
    long = "a" * (MAX_RULE_PATH_CHARS + 1) + ".service"
    assert namer(long) == Consumer("unit", long)  # the built-in rules still name it
    assert namer.rules_skipped == 1
    namer(long)  # cached: counted once per path named, not per lookup
    assert namer.rules_skipped == 1


# -- fuzz: the matcher against Python's own engine on patterns both run in linear time -------

_ATOMS = st.sampled_from(["a", "b", "-", r"\.", ".", "[ab]", "[^/]", r"\w", r"\d", "/",
                          "x", "é"])
_PIECE = st.tuples(_ATOMS, st.sampled_from(["", "*", "+", "?", "{2}"])).map("".join)


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(_PIECE, min_size=1, max_size=6))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(pieces) - 1))
        pieces[cut] = f"(?P<g>{pieces[cut]})"
    return ("^" if draw(st.booleans()) else "") + "".join(pieces) + (
        "$" if draw(st.booleans()) else "")


_PATH_TEXT = st.text(alphabet=st.sampled_from("ab-./x1é_"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_patterns(), _PATH_TEXT)
def test_fuzz_rule_matching_agrees_with_pythons_engine(pattern: str, path: str) -> None:
    """ASCII-only paths without a newline: where RE2 and `re` are meant to agree."""
    path = path.encode("ascii", "ignore").decode()
    rule = compile_rules([{"match": pattern, "kind": "project",
                           "name": "{g}" if "(?P<g>" in pattern else "n"}])[0]
    expected = re.search(pattern, path.strip("/"))
    got = CgroupNamer([rule])(path)
    if expected is not None and (expected.groupdict().get("g", "n") or ""):
        assert got == Consumer("project", expected.groupdict().get("g", "n"))
    else:
        assert got.kind != "project"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=30), max_size=4),
       st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=3))
def test_fuzz_any_pattern_and_any_path_name_or_refuse_never_crash(patterns, paths) -> None:
    """Any text as a pattern is compiled or refused with a ConfigError; any text as a path
    (lone surrogates included, as os.fsdecode makes them) is named."""
    rules = []
    for pattern in patterns:
        try:
            rules.extend(compile_rules([{"match": pattern or "x", "kind": "cgroup",
                                         "name": "fixed"}]))
        except ConfigError as exc:
            assert exc.key == "attribution.rules[0].match"
    namer = CgroupNamer(rules)
    for path in paths:
        consumer = namer(path)
        assert isinstance(consumer, Consumer) and consumer.name
        consumer.name.encode("utf-8")


# -- the real daemon on a real cgroup so named -------------------------------------------------


def test_the_daemon_keeps_ticking_and_stops_on_sigterm_with_the_catastrophic_rule(
        tree: TestTree, tmp_path) -> None:
    evil = tree.make(EVIL_NAME)
    deep = tree.make(_deep_path(1000))
    assert len(os.path.relpath(deep, tree.root)) == 1000
    tree.burners.start(0.3, os.path.join(evil, "cgroup.procs"))
    tree.burners.start(0.2, os.path.join(deep, "cgroup.procs"))
    config = tmp_path / "carbond.yaml"
    config.write_text(json.dumps({"attribution": {"rules": [CATASTROPHIC, CUBIC],
                                                  "idle_watts": {"cpu": 0}}}))
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
            "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
            "--cgroup-root", tree.root, "--interval", "1s") as daemon:
        first = daemon.wait_ticks(2)
        last = daemon.wait_ticks(3)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=10) == 0
        stopped_seconds = time.monotonic() - started
    assert stopped_seconds < 2.0
    energy = "carbond_consumer_energy_joules_total"
    assert select(last, energy, consumer=EVIL_NAME, kind="cgroup")
    assert total(last, energy, consumer=EVIL_NAME) > total(first, energy, consumer=EVIL_NAME)
    assert total(last, "carbond_tick_failures_total") == 0
    assert "Traceback" not in daemon.process.stderr.read()


def test_load_reads_rules_through_the_same_check(tmp_path) -> None:
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {rules: [{match: 'x(?=y)', kind: unit, name: x}]}\n")
    with pytest.raises(ConfigError) as info:
        load(str(config), {})
    assert info.value.key == "attribution.rules[0].match"
    assert os.path.exists(config)
