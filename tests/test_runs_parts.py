"""The exec socket's pure parts (where runs go, how projects are keyed) and the systemd
drop-in that turns the socket on (deploy/systemd/carbond-exec-socket.conf)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from carbond.runs.server import project_key, run_parent
from carbond.workloads.naming import EXEC_PARENT

# ---- the systemd drop-in -------------------------------------------------------------------


def test_the_exec_socket_drop_in_costs_what_it_says(tmp_path: Path) -> None:
    """The unit with deploy/systemd/carbond-exec-socket.conf applied: still at most 3.0, and the
    score its comment states; the socket's directory and the cgroup tree are what changed."""
    from tests.test_deploy_systemd import MAX_EXPOSURE, UNIT, exposure, systemd_analyze

    drop_in = UNIT.parent / "carbond-exec-socket.conf"
    settings_lines = [line for line in drop_in.read_text().splitlines()
                      if line and not line.startswith(("#", "["))]
    assert "RuntimeDirectory=carbond" in settings_lines
    merged = tmp_path / "carbond.service"
    merged.write_text(UNIT.read_text().replace(
        "[Install]", "\n".join(settings_lines) + "\n\n[Install]"))
    score = exposure(systemd_analyze(), merged)
    assert score <= MAX_EXPOSURE
    stated = re.search(r"2\.1 without it, ([0-9.]+) with it", drop_in.read_text())
    assert stated and float(stated.group(1)) == score


# ---- pure parts ----------------------------------------------------------------------------

COMPONENT = st.text(st.sampled_from("abcz.-_@%"), min_size=1, max_size=8).filter(
    lambda c: c not in (".", ".."))


@given(st.lists(st.one_of(COMPONENT, st.just(EXEC_PARENT)), max_size=8))
def test_a_run_goes_next_to_its_callers_cgroup_never_inside_a_run(parts: list[str]) -> None:
    parent = run_parent("/".join(parts))
    assert EXEC_PARENT not in parent
    assert parts[:len(parent)] == parent
    if EXEC_PARENT not in parts and parts:
        assert parent == parts[:-1]


@given(st.integers(min_value=0, max_value=1 << 31), st.text(min_size=1, max_size=40))
def test_only_roots_projects_are_recorded_as_given(uid: int, project: str) -> None:
    key = project_key(uid, project)
    if uid == 0:
        assert key == project
    else:
        user, _, rest = key.partition("/")
        assert rest == project and user and "/" not in user
