"""`carbond reload` (the unit's ExecReload, issue 23): validate, signal, and wait until the new
configuration is in force, without systemd.

The real `carbond run` takes real SIGHUPs from the real `carbond reload`; a refusal that only
the daemon can see (a token file its user cannot read) is made by running the daemon as an
unprivileged user, as the unit does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.commands.reload import run_reload, timeout_for
from carbond.config import load
from carbond.runtime.applied import (
    APPLIED_FILE,
    Applied,
    read_applied,
    record_applied,
    record_refused,
)
from tests.helpers import Carbond, carbond_run, free_port, scrape, total, wait_for
from tests.powercap import FakePowercap

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
BUDGET_1KG = "budgets: [{name: b, match: {}, period: month, limit: 1kg}]\n"
BUDGET_2KG = "budgets: [{name: b, match: {}, period: month, limit: 2kg}]\n"


def reload(config: Path, pid: int, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carbond", "reload", "--pid", str(pid), "--config", str(config),
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)


def limit_grams(samples: dict) -> float:
    return total(samples, "carbond_budget_limit_grams", budget="b")


@contextlib.contextmanager
def daemon(tmp_path: Path, text: str) -> Iterator[tuple[Carbond, Path, Path]]:
    FakePowercap(str(tmp_path / "powercap")).add("intel-rapl:0", "package-0")
    config, state = tmp_path / "carbond.yaml", tmp_path / "state"
    config.write_text(text)
    with carbond_run("--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
                     "--interval", "1s", "--state-dir", str(state)) as running:
        yield running, config, state


def test_reload_returns_once_the_new_file_is_in_force(tmp_path):
    with daemon(tmp_path, BUDGET_1KG) as (running, config, state):
        assert limit_grams(running.wait_ticks(1)) == 1000.0
        started = read_applied(str(state))
        assert started is not None and started.pid == running.process.pid
        assert started.sha256 == hashlib.sha256(config.read_bytes()).hexdigest()

        config.write_text(BUDGET_2KG)
        done = reload(config, running.process.pid, state)
        assert done.returncode == 0, done.stderr
        digest = hashlib.sha256(config.read_bytes()).hexdigest()
        assert f"sha256 {digest[:12]}" in done.stdout and done.stderr == ""
        # In force when reload returned: every tick the daemon completes from now on was
        # computed with the new budget (the daemon records the digest after applying it,
        # before its next tick).
        assert limit_grams(running.wait_ticks(1)) == 2000.0
        record = read_applied(str(state))
        assert record == Applied(running.process.pid, started.serial + 1, digest)

        # The same bytes again: still a round trip through the daemon, a newer serial.
        again = reload(config, running.process.pid, state)
        assert again.returncode == 0, again.stderr
        assert read_applied(str(state)).serial == started.serial + 2
        assert running.process.poll() is None


def test_an_invalid_file_fails_with_one_line_and_nothing_is_signalled(tmp_path):
    with daemon(tmp_path, BUDGET_1KG) as (running, config, state):
        running.wait_ticks(1)
        before = read_applied(str(state))
        config.write_text("intervall: 5s\n" + BUDGET_2KG)
        done = reload(config, running.process.pid, state)
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            "carbond: error: intervall: unknown key 'intervall' (did you mean 'interval'?)"]
        assert done.stdout == ""
        # Not signalled: no reload attempt recorded; the old budget stays in force.
        assert limit_grams(running.wait_ticks(2)) == 1000.0
        assert read_applied(str(state)) == before
        assert running.process.poll() is None

        config.write_text("intensity: {providers: [{electricitymaps: "
                          f"{{token_file: {tmp_path / 'missing.token'}}}}}]}}\n")
        done = reload(config, running.process.pid, state)
        assert done.returncode == 2
        assert "intensity.providers[0].electricitymaps.token_file" in done.stderr
        assert len(done.stderr.splitlines()) == 1
        assert read_applied(str(state)) == before


@contextlib.contextmanager
def nobody_daemon(shared: Path, text: str, for_others: tuple[str, Path]
                  ) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`carbond run` as uid 65534, the dynamic user's stand-in, on a state dir it owns, from
    a copy of carbond that user can read (the clone may sit in a 0700 directory)."""
    python, site = for_others
    state = shared / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    (shared / "carbond.yaml").write_text(text)
    port = free_port()
    process = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env",
         f"PYTHONPATH={site}", python, "-m", "carbond", "run", "--config",
         str(shared / "carbond.yaml"),
         "--listen", f"127.0.0.1:{port}", "--interval", "1s", "--state-dir", str(state),
         "--powercap-root", str(shared / "powercap")],
        cwd=shared, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def serving() -> bool:
            with contextlib.suppress(OSError):
                return bool(scrape(port))
            return process.poll() is not None
        assert wait_for(serving, 30), "carbond did not serve /metrics"
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        yield process, port
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="carbond-reload-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_a_file_only_the_daemon_cannot_take_fails_with_the_daemons_reason(shared_dir,
                                                                          for_others):
    """The reload validates as root; the daemon runs as its own user and cannot read the
    token file: the daemon keeps its configuration, and the reload says so and why."""
    FakePowercap(str(shared_dir / "powercap")).add("intel-rapl:0", "package-0")
    token = shared_dir / "em.token"
    token.write_text("secret-token\n")
    token.chmod(0o600)  # root's
    with nobody_daemon(shared_dir, BUDGET_1KG, for_others) as (process, port):
        state = shared_dir / "state"
        config = shared_dir / "carbond.yaml"
        # the daemon serves before it records what it applied: wait for the record
        assert wait_for(lambda: read_applied(str(state)) is not None)
        before = read_applied(str(state))
        assert before is not None and before.pid == process.pid
        config.write_text(BUDGET_2KG + "intensity: {zone: DE, providers: [{electricitymaps: "
                          f"{{token_file: {token}}}}}]}}\n")
        done = reload(config, process.pid, state)
        assert done.returncode == 1, done
        assert done.stderr.startswith("carbond: error: carbond kept its running configuration: "
                                      "intensity.providers[0].electricitymaps.token_file")
        assert "secret-token" not in done.stderr
        record = read_applied(str(state))
        assert record is not None and record.serial == before.serial + 1
        assert record.sha256 == before.sha256 and record.refused
        assert wait_for(lambda: limit_grams(scrape(port)) == 1000.0)
        assert process.poll() is None


def test_a_daemon_with_another_state_dir_is_not_signalled(tmp_path):
    with daemon(tmp_path, BUDGET_1KG) as (running, config, state):
        running.wait_ticks(1)
        before = read_applied(str(state))
        elsewhere = tmp_path / "elsewhere"
        done = reload(config, running.process.pid, elsewhere)
        assert done.returncode == 1
        assert "holds no record of carbond pid" in done.stderr and "not signalled" in done.stderr
        assert read_applied(str(state)) == before
        assert running.process.poll() is None


def test_a_daemon_that_exits_on_sighup_fails_the_reload(tmp_path):
    """A process that dies of the signal (not carbond, or a carbond that crashed)."""
    config = tmp_path / "carbond.yaml"
    config.write_text(BUDGET_1KG)
    # SIGHUP's default back: under nohup (or a runner that ignores it) sleep inherits SIG_IGN
    victim = subprocess.Popen(["sleep", "60"],
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        record_applied(str(tmp_path), None, pid=victim.pid)
        done = reload(config, victim.pid, tmp_path)
        assert victim.wait(timeout=10) == -signal.SIGHUP
        assert done.returncode == 1
        assert done.stderr.strip() == (f"carbond: error: carbond pid {victim.pid} exited "
                                       "during the reload")
    finally:
        victim.kill()
        victim.wait()


def test_no_such_process(tmp_path):
    config = tmp_path / "carbond.yaml"
    config.write_text(BUDGET_1KG)
    gone = subprocess.Popen(["true"])
    gone.wait()
    record_applied(str(tmp_path), None, pid=gone.pid)
    done = reload(config, gone.pid, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"carbond: error: no process {gone.pid}"


class FakeDaemon:
    """Stands where the daemon's answer would come from: the test's own process (never
    signalled: `send` is this object) writes the record a daemon would."""

    def __init__(self, state: Path, answer: str | None, refused: str | None = None) -> None:
        self.state, self.answer, self.refused = state, answer, refused
        self.signals: list[tuple[int, int]] = []

    def send(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))
        if self.refused is not None:
            record_refused(str(self.state), self.refused, pid=pid)
        elif self.answer is not None:
            record_applied(str(self.state), self.answer, pid=pid)


def test_run_reload_outcomes_through_the_record(tmp_path, capsys):
    config_path = tmp_path / "carbond.yaml"
    config_path.write_text(BUDGET_1KG + "interval: 5s\n")
    config = load(str(config_path), {"--state-dir": str(tmp_path / "state")})
    state = tmp_path / "state"
    pid = os.getpid()  # alive; never signalled here
    record_applied(str(state), "0" * 64, pid=pid)

    ok = FakeDaemon(state, config.source_sha256)
    assert run_reload(config, pid, send=ok.send) == 0
    assert ok.signals == [(pid, signal.SIGHUP)]
    assert "in force" in capsys.readouterr().out

    other = FakeDaemon(state, "f" * 64)
    assert run_reload(config, pid, send=other.send) == 1
    assert "changed during the reload" in capsys.readouterr().err

    refused = FakeDaemon(state, None, refused="pue: must be >= 1, got 0.5")
    assert run_reload(config, pid, send=refused.send) == 1
    assert capsys.readouterr().err.strip().endswith("pue: must be >= 1, got 0.5")

    # No answer: the wait ends at 2 x interval + 10 s of the clock it is given.
    now = [0.0]

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    silent = FakeDaemon(state, None)
    assert timeout_for(config) == 20.0
    assert run_reload(config, pid, send=silent.send, clock=clock, sleep=sleep) == 1
    assert "did not confirm the reload" in capsys.readouterr().err
    assert now[0] == pytest.approx(20.0, abs=0.2)


def test_records_count_attempts_and_a_refusal_keeps_the_digest_in_force(tmp_path):
    state = str(tmp_path)
    assert read_applied(state) is None
    assert record_applied(state, "a" * 64, pid=100)
    assert record_refused(state, "bad\nkey:   reason", pid=100)
    assert read_applied(state) == Applied(100, 1, "a" * 64, "bad key: reason")
    assert record_applied(state, "b" * 64, pid=100)
    assert read_applied(state) == Applied(100, 2, "b" * 64)
    assert record_applied(state, None, pid=200)  # a new process starts at 0
    assert read_applied(state) == Applied(200, 0, None)
    assert (tmp_path / APPLIED_FILE).stat().st_mode & 0o777 == 0o640


def test_an_unwritable_state_dir_is_a_warning_not_a_failure(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert record_applied(str(blocked), None) is False
    assert "cannot record the configuration in force" in caplog.text


# Each example writes a file: on a loaded machine that is slow, not wrong.
RECORD_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@RECORD_SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_in_the_record_read_as_none_or_a_record(data):
    with tempfile.TemporaryDirectory() as state:
        Path(state, APPLIED_FILE).write_bytes(data)
        record = read_applied(state)
        assert record is None or isinstance(record, Applied)


@RECORD_SETTINGS
@given(st.dictionaries(st.sampled_from(["pid", "serial", "sha256", "refused", "x"]),
                       st.one_of(st.none(), st.integers(), st.text(), st.booleans(),
                                 st.lists(st.integers()))))
def test_any_json_in_the_record_reads_as_none_or_a_well_typed_record(data):
    with tempfile.TemporaryDirectory() as state:
        Path(state, APPLIED_FILE).write_text(json.dumps(data))
        record = read_applied(state)
        if record is not None:
            assert isinstance(record.pid, int) and isinstance(record.serial, int)
            assert record.sha256 is None or isinstance(record.sha256, str)
