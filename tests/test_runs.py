"""The daemon's exec socket (carbond/runs/): an unprivileged user in an SSH-like login
(a root-owned ``user-UID.slice/session-N.scope`` holding the user's process) gets a run
cgroup from the daemon; the daemon checks with the kernel who asks and refuses other users'
processes, reused pids, hostile names, slow and garbage requests.

Every cgroup lives in a private `TestTree`, every process is killed and every tree removed,
also when a test fails.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carbond.workloads.naming import EXEC_PARENT, encode_project
from tests.cgroup_helpers import TestTree, available
from tests.helpers import carbond_run
from tests.powercap import ConstantPower

NOBODY = 65534
BUSY = "i=0; while [ $i -lt {n} ]; do i=$((i+1)); done"
SESSION = f"s{os.getpid()}"


@dataclass
class Login:
    """A login as logind leaves it: root-owned slice and session scope, in a private tree;
    `shared` is a directory every user can read (socket, config, scripts)."""

    tree: TestTree
    scope: str
    shared: Path

    @property
    def socket(self) -> str:
        return str(self.shared / "exec.sock")

    def as_nobody(self, *argv: str, site: Path, python: str,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """argv run as nobody inside the session scope (moved there by root, then dropped)."""
        inner = shlex.join(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", "env", f"PYTHONPATH={site}", python, *argv])
        move = f"echo $$ > {shlex.quote(os.path.join(self.scope, 'cgroup.procs'))}"
        return subprocess.run(["sh", "-c", f"{move} && exec {inner}"], capture_output=True,
                              text=True, timeout=timeout, cwd="/")


@pytest.fixture
def login() -> Iterator[Login]:
    why = available("v2")
    if why:
        pytest.skip(why)
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as nobody")
    tree = TestTree("v2")
    shared = Path(tempfile.mkdtemp(prefix="carbond-runs-"))
    os.chmod(shared, 0o755)
    try:
        scope = tree.make(f"user.slice/user-{NOBODY}.slice/session-1.scope")
        yield Login(tree, scope, shared)
    finally:
        tree.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def daemon_args(login: Login, tmp_path: Path) -> list[str]:
    config = login.shared / "carbond.yaml"
    config.write_text(f"ledger: {{flush: 1s}}\nexec_socket: {login.socket}\n")
    os.chmod(config, 0o644)
    return ["--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
            "--cgroup-root", login.tree.root, "--interval", "1s"]


def wait_for_socket(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no socket at {path}"
        time.sleep(0.05)


def report_projects(state: Path) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "carbond", "report", "--by", "project", "--format", "json",
         "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["project"]: row for row in json.loads(result.stdout)["rows"]}


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as handle:
        return next(line for line in handle if line.startswith("0::")).strip()


# ---- done when: exec from a session scope --------------------------------------------------


def test_a_user_in_a_session_scope_runs_exec_through_the_daemon(
        login: Login, tmp_path: Path, for_others: tuple[str, Path]) -> None:
    """nobody, in a root-owned session scope, cannot make a cgroup; the daemon makes the run
    under the user's slice, keyed USER/PROJECT; status passes through; the ledger holds
    what exec printed within 5%."""
    python, site = for_others
    state = tmp_path / "state"
    args = daemon_args(login, tmp_path)
    project = f"demo-{SESSION}"
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
            *args, "--state-dir", str(state)) as daemon:
        wait_for_socket(login.socket)
        result = login.as_nobody(
            "-m", "carbond", "exec", "--json", *args, "--listen", f"127.0.0.1:{daemon.port}",
            "--state-dir", str(login.shared / "none"), "--project", project, "--", "sh", "-c",
            f"{BUSY.format(n=2_000_000)}; cat /proc/self/cgroup; exit 3",
            site=site, python=python)
        daemon.wait_ticks(2)
    assert result.returncode == 3, result.stderr
    run = json.loads(result.stderr.strip().splitlines()[-1])
    assert run["measured_by"] == "daemon", run["notes"]
    assert run["project"] == f"nobody/{project}"
    slice_dir = os.path.join(login.tree.root, "user.slice", f"user-{NOBODY}.slice")
    assert run["cgroup"].startswith(
        os.path.join(slice_dir, EXEC_PARENT, encode_project(f"nobody/{project}")) + "/")
    inside = [line for line in result.stdout.splitlines() if line.startswith("0::")]
    assert inside and inside[0].endswith(run["cgroup"][len(login.tree.base):])
    assert run["energy_joules"]["total"] > 0 and run["emissions_grams"] > 0
    assert run["cgroup_removed"] is True and not os.path.exists(run["cgroup"])
    recorded = report_projects(state)[f"nobody/{project}"]
    assert recorded["joules"] == pytest.approx(run["energy_joules"]["total"], rel=0.05)
    assert recorded["grams"] == pytest.approx(run["emissions_grams"], rel=0.05)


ASK = """
import json, sys
from carbond.runs.client import RunsClient, RunsRefused
client = RunsClient(sys.argv[1])
try:
    started = client.start(sys.argv[2], pid=int(sys.argv[3]))
    print(json.dumps({"ok": True, "cgroup": started.cgroup}))
except RunsRefused as exc:
    print(json.dumps({"ok": False, "error": str(exc)}))
"""


def test_a_user_cannot_have_another_users_process_counted(
        login: Login, tmp_path: Path, for_others: tuple[str, Path]) -> None:
    python, site = for_others
    script = login.shared / "ask.py"
    script.write_text(ASK)
    os.chmod(script, 0o644)
    victim = subprocess.Popen(["sleep", "120"])  # root's process
    try:
        before = cgroup_of(victim.pid)
        with ConstantPower(str(tmp_path / "powercap")), carbond_run(
                *daemon_args(login, tmp_path)):
            wait_for_socket(login.socket)
            result = login.as_nobody(str(script), login.socket, "steal", str(victim.pid),
                                     site=site, python=python)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["ok"] is False and "not yours" in answer["error"]
        assert cgroup_of(victim.pid) == before
        assert not os.path.exists(os.path.join(login.tree.root, "user.slice",
                                               f"user-{NOBODY}.slice", EXEC_PARENT,
                                               encode_project("nobody/steal")))
    finally:
        victim.kill()
        victim.wait()
