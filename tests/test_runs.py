"""The daemon's exec socket (carbond/runs/): an unprivileged user in an SSH-like login
(a root-owned ``user-UID.slice/session-N.scope`` holding the user's process) gets a run
cgroup from the daemon; the daemon checks with the kernel who asks and refuses other users'
processes, reused pids, hostile names, slow and garbage requests.

Every cgroup lives in a private `TestTree`, every process is killed and every tree removed,
also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.runs.client import RunsClient, RunsRefused
from carbond.runs.server import ExecSocket
from carbond.workloads.cgroups import detect_cgroup_root
from carbond.workloads.naming import EXEC_PARENT, decode_project, encode_project
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


@pytest.fixture(params=["v2", "v1"])
def login(request: pytest.FixtureRequest) -> Iterator[Login]:
    why = available(request.param)
    if why:
        pytest.skip(why)
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run as nobody")
    tree = TestTree(request.param)
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


def cgroup_of(pid: int, hierarchy: str = "v2") -> str:
    """The line of /proc/PID/cgroup for the v2 tree, or the v1 cpuacct tree."""
    with open(f"/proc/{pid}/cgroup") as handle:
        lines = [line.strip() for line in handle]
    if hierarchy == "v2":
        return next(line for line in lines if line.startswith("0::"))
    return next(line for line in lines if "cpuacct" in line.split(":")[1].split(","))


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
    shown = [line.split(":", 2) for line in result.stdout.splitlines() if line.count(":") >= 2]
    inside = [path for _, controllers, path in shown
              if (controllers == "" if login.tree.hierarchy == "v2"
                  else "cpuacct" in controllers.split(","))]
    assert inside == [run["cgroup"][len(login.tree.base):]], result.stdout
    assert run["energy_joules"]["total"] > 0 and run["emissions_grams"] > 0
    assert run["cgroup_removed"] is True and not os.path.exists(run["cgroup"])
    recorded = report_projects(state)[f"nobody/{project}"]
    print("exec", run["energy_joules"]["total"], "J, report", recorded["joules"], "J")
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
        before = cgroup_of(victim.pid, login.tree.hierarchy)
        with ConstantPower(str(tmp_path / "powercap")), carbond_run(
                *daemon_args(login, tmp_path)):
            wait_for_socket(login.socket)
            result = login.as_nobody(str(script), login.socket, "steal", str(victim.pid),
                                     site=site, python=python)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["ok"] is False and "not yours" in answer["error"]
        assert cgroup_of(victim.pid, login.tree.hierarchy) == before
        assert not os.path.exists(os.path.join(login.tree.root, "user.slice",
                                               f"user-{NOBODY}.slice", EXEC_PARENT,
                                               encode_project("nobody/steal")))
    finally:
        victim.kill()
        victim.wait()


# ---- the socket itself, hostile input ------------------------------------------------------


SOCKET_EXAMPLES = settings(max_examples=40, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Served:
    """An ExecSocket in this process over a private tree, with this process moved into the
    tree's ``work.scope`` (and back afterwards) so that it may ask."""

    tree: TestTree
    server: ExecSocket
    client: RunsClient
    child: subprocess.Popen[bytes]  # a descendant to move


@pytest.fixture(params=["v2", "v1"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    why = available(request.param)
    if why:
        pytest.skip(why)
    tree = TestTree(request.param)
    shared = Path(tempfile.mkdtemp(prefix="carbond-runs-"))
    home = cgroup_of(os.getpid(), request.param).split(":", 2)[2]
    server = None
    child = None
    try:
        work = tree.make("work.slice/work.scope")
        Path(work, "cgroup.procs").write_text(str(os.getpid()))
        child = subprocess.Popen(["sleep", "300"])
        server = ExecSocket(str(shared / "exec.sock"), detect_cgroup_root(tree.root))
        server.start()
        yield Served(tree, server, RunsClient(str(shared / "exec.sock")), child)
    finally:
        Path(tree.base, home.lstrip("/"), "cgroup.procs").write_text(str(os.getpid()))
        if server is not None:
            server.stop()
        if child is not None:
            child.kill()
            child.wait()
        tree.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


@SOCKET_EXAMPLES
@given(st.one_of(st.binary(max_size=300).map(os.fsdecode), st.text(max_size=120)))
def test_any_project_name_is_one_run_directory_or_refused(served: Served, name: str) -> None:
    """Any bytes (and any text, lone surrogates included) either name exactly one run
    directory that decodes back to the name, or are refused with a reason."""
    try:
        encoded = encode_project(name)
    except ValueError:
        encoded = None
    try:
        started = served.client.start(name, pid=served.child.pid)
    except RunsRefused as exc:
        assert encoded is None, exc
        return
    assert encoded is not None
    path = os.path.join(served.tree.root, started.cgroup)
    assert os.path.dirname(started.cgroup) == os.path.join("work.slice", EXEC_PARENT, encoded)
    assert decode_project(encoded) == name and started.project == name
    assert str(served.child.pid) in Path(path, "cgroup.procs").read_text().split()
    served.client.leave(started.run, pid=served.child.pid)
    assert served.client.end(started.run) is True
    assert not os.path.exists(path)
    assert cgroup_of(served.child.pid, served.tree.hierarchy).endswith("/work.slice/work.scope")


@SOCKET_EXAMPLES
@given(st.binary(min_size=1, max_size=5000))
def test_garbage_gets_one_refusal_and_the_socket_serves_on(served: Served, garbage: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(served.client.path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(garbage + b"\n")
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                reply += chunk
    answer = json.loads(reply)
    assert answer["ok"] is False and answer["error"]
    started = served.client.start("after-garbage", pid=served.child.pid)
    served.client.leave(started.run, pid=served.child.pid)
    assert served.client.end(started.run)


def test_a_client_that_never_finishes_holds_one_handler_for_a_bounded_time(
        served: Served) -> None:
    """Slow clients: each is answered with an error once its time is up; while they hang,
    others are served, and past the connection limit a client is told the daemon is busy."""
    from carbond.runs.server import MAX_CONNECTIONS

    slow = []
    try:
        for _ in range(MAX_CONNECTIONS - 1):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(served.client.path)
            sock.sendall(b'{"op": "start", "proj')  # and nothing more
            slow.append(sock)
        started = served.client.start("meanwhile", pid=served.child.pid)  # the last slot
        served.client.leave(started.run, pid=served.child.pid)
        served.client.end(started.run)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(served.client.path)  # the last slot taken too
        slow.append(sock)
        with pytest.raises(RunsRefused, match="busy"):  # accepted in order: after that one
            served.client.end(started.run)
        for sock in slow:
            sock.settimeout(60)
            answer = json.loads(sock.recv(4096))
            assert answer["ok"] is False and "no whole message" in answer["error"]
    finally:
        for sock in slow:
            sock.close()


def test_runs_of_one_caller_are_not_anothers(served: Served, login: Login,
                                             for_others: tuple[str, Path]) -> None:
    """Run ids are not capabilities: nobody cannot end, leave or join root's run."""
    python, site = for_others
    started = served.client.start("roots", pid=served.child.pid)
    try:
        script = login.shared / "other.py"
        script.write_text(
            "import sys\nfrom carbond.runs.client import RunsClient, RunsRefused\n"
            "client = RunsClient(sys.argv[1])\n"
            "for op in ('end', 'leave', 'join'):\n"
            "    try:\n"
            "        client.request({'op': op, 'run': sys.argv[2]})\n"
            "        print(op, 'done')\n"
            "    except RunsRefused as exc:\n"
            "        print(op, 'refused', exc)\n")
        os.chmod(script, 0o644)
        os.chmod(os.path.dirname(served.client.path), 0o755)
        result = login.as_nobody(str(script), served.client.path, started.run, site=site,
                                 python=python)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["end", "refused"], ["leave", "refused"], ["join", "refused"]], lines
        assert os.path.isdir(os.path.join(served.tree.root, started.cgroup))
    finally:
        served.client.leave(started.run, pid=served.child.pid)
        served.client.end(started.run)


REUSE = """
import os, subprocess, sys, time
from carbond.runs.client import RunsClient, RunsRefused
child = subprocess.Popen(["true"])
child.wait()  # exited and reaped: its pid is free for anyone
print(child.pid, flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.02)
try:
    RunsClient(sys.argv[1]).start("reuse", pid=child.pid)
    print("moved")
except RunsRefused as exc:
    print("refused", exc)
"""


def test_a_pid_that_exited_and_was_reused_by_another_user_is_refused(
        login: Login, tmp_path: Path, for_others: tuple[str, Path]) -> None:
    """nobody's child exits; root's new process gets its pid (ns_last_pid); nobody names the
    pid: refused, root's process stays where it was."""
    python, site = for_others
    script = login.shared / "reuse.py"
    script.write_text(REUSE)
    os.chmod(script, 0o644)
    go = login.shared / "go"
    squatter = None
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(*daemon_args(login, tmp_path)):
        wait_for_socket(login.socket)
        inner = shlex.join(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", "env", f"PYTHONPATH={site}", python, str(script),
                            login.socket, str(go)])
        move = f"echo $$ > {shlex.quote(os.path.join(login.scope, 'cgroup.procs'))}"
        client = subprocess.Popen(["sh", "-c", f"{move} && exec {inner}"], cwd="/",
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None
            freed = int(client.stdout.readline())
            for _ in range(50):  # other processes on the host may take the pid first
                Path("/proc/sys/kernel/ns_last_pid").write_text(str(freed - 1))
                squatter = subprocess.Popen(["sleep", "120"])
                if squatter.pid == freed:
                    break
                squatter.kill()
                squatter.wait()
                squatter = None
            if squatter is None:
                pytest.skip("could not give the freed pid to a new process")
            before = cgroup_of(squatter.pid, login.tree.hierarchy)
            go.write_text("")
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0, err
            assert out.startswith("refused") and "not yours" in out, out
            assert cgroup_of(squatter.pid, login.tree.hierarchy) == before
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            if squatter is not None:
                squatter.kill()
                squatter.wait()


def test_a_second_daemon_leaves_a_served_socket_alone(served: Served) -> None:
    """A socket that answers is another daemon's: a second one neither unlinks nor takes it."""
    second = ExecSocket(served.client.path, served.server.root)
    second.start()
    try:
        assert second._sock is None
        started = served.client.start("still-served", pid=served.child.pid)
        served.client.leave(started.run, pid=served.child.pid)
        assert served.client.end(started.run)
    finally:
        second.stop()
    assert os.path.exists(served.client.path)  # stop of the idle second one removed nothing


def test_without_a_daemon_a_session_user_gets_125_and_both_reasons(
        login: Login, tmp_path: Path, for_others: tuple[str, Path]) -> None:
    python, site = for_others
    config = login.shared / "carbond.yaml"
    config.write_text(f"exec_socket: {login.socket}\n")  # nothing listens there
    os.chmod(config, 0o644)
    result = login.as_nobody(
        "-m", "carbond", "exec", "--config", str(config), "--cgroup-root", login.tree.root,
        "--listen", "127.0.0.1:1", "--state-dir", str(login.shared / "none"), "--project",
        f"nod-{SESSION}", "--", "true", site=site, python=python)
    assert result.returncode == 125, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "Permission denied" in line and f"exec socket: {login.socket}" in line


def test_a_run_whose_caller_is_killed_is_swept(served: Served) -> None:
    """A caller SIGKILLed mid-run never ends its run: the next request removes its cgroup
    once empty, so the uid's open-run limit is not used up by the dead."""
    code = ("import sys, time\nfrom carbond.runs.client import RunsClient\n"
            "print(RunsClient(sys.argv[1]).start('killed').cgroup, flush=True)\n"
            "time.sleep(300)\n")
    caller = subprocess.Popen([sys.executable, "-c", code, served.client.path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        path = os.path.join(served.tree.root, caller.stdout.readline().strip())
        assert str(caller.pid) in Path(path, "cgroup.procs").read_text().split()
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 10
    while Path(path, "cgroup.procs").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = served.client.start("next", pid=served.child.pid)  # any request sweeps
    served.client.leave(started.run, pid=served.child.pid)
    served.client.end(started.run)
    assert not os.path.exists(path)
