"""`carbond top`: the frame from a real `carbond run` with real burners in real cgroups (the
busiest first, hostile names escaped, found at the `--listen` address of the flag or config
file), a clear exit 1 without a daemon, and the live view in a real terminal (tmux): `q`
quits, SIGTERM too, and the terminal settings are restored either way."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.commands.top import api_url, connect_host, frame_lines, rows, table_lines
from tests.cgroup_helpers import TestTree
from tests.helpers import Carbond, carbond_run, free_port
from tests.powercap import ConstantPower

HOSTILE = "evil\x1b[2J\x07name"


def top(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", "top", *args],
                          capture_output=True, text=True, timeout=timeout)


def consumers(daemon: Carbond) -> dict:
    url = f"http://127.0.0.1:{daemon.port}/api/v1/consumers"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def poll(check: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def daemon_config(tmp_path: Path) -> str:
    config = tmp_path / "carbond.yaml"
    config.write_text("attribution: {idle_watts: {cpu: 0}}\n"  # all power follows CPU time
                      "intensity: {zone: DE, providers: [{constant: {grams_per_kwh: 400}}]}\n"
                      "pue: 1.25\n")
    return str(config)


@contextlib.contextmanager
def busy_daemon(tree: TestTree, tmp_path: Path) -> Iterator[Carbond]:
    """Burners at 100 %, 20 % and 5 % duty (the last one under a hostile name), a fake RAPL
    package at 60 W, and `carbond run` ticking every second; yields once the daemon reports
    power for the busy one."""
    for name, duty in (("busy", 1.0), ("light", 0.2), (HOSTILE, 0.05)):
        tree.make(name)
        tree.burners.start(duty, tree.procs(name))
    with ConstantPower(str(tmp_path / "powercap"), package_watts=60.0), carbond_run(
            "--config", daemon_config(tmp_path), "--powercap-root", str(tmp_path / "powercap"),
            "--cgroup-root", tree.root, "--interval", "1s") as daemon:
        daemon.wait_ticks(3)

        def busy_has_power() -> bool:
            found = {c["name"]: c for c in consumers(daemon)["consumers"]}
            return (found.get("busy", {}).get("watts", {}).get("total") or 0) > 0

        poll(busy_has_power, "no power for the busy cgroup")
        yield daemon


def consumer_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONSUMER"))
    return [line.split() for line in lines[start + 1:] if line.strip()]


def test_once_lists_the_busiest_consumer_first(tree: TestTree, tmp_path: Path) -> None:
    with busy_daemon(tree, tmp_path) as daemon:
        before = {n: tree.usage_seconds(n) for n in ("busy", "light")}
        result = top("--once", "--listen", f"127.0.0.1:{daemon.port}")
        after = {n: tree.usage_seconds(n) for n in ("busy", "light")}
    # The kernel agrees which one is busiest.
    assert after["busy"] - before["busy"] > after["light"] - before["light"]
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout  # plain text to a pipe
    lines = result.stdout.splitlines()
    assert lines[0].startswith("carbond top  127.0.0.1:")
    assert "grid 400 g/kWh DE (constant" in lines[1] and "PUE 1.25" in lines[1]
    table = consumer_rows(result.stdout)
    assert table[0][:2] == ["busy", "cgroup"]
    names = [row[0] for row in table]
    assert names.index("busy") < names.index("light")
    assert "evil\\x1b[2J\\x07name" in names  # the hostile name, escaped
    busy = table[0]
    total_w, cpu_w, gpu_w, dram_w, rate = busy[2:7]
    assert float(total_w) > 0 and float(cpu_w) > 0 and float(dram_w) > 0 and gpu_w == "-"
    # One poll: estimated from power x intensity x PUE, marked "~".
    assert rate.startswith("~")
    assert float(rate[1:]) == pytest.approx(float(total_w) / 1000 * 400 * 1.25, rel=0.05,
                                            abs=0.1)


def test_found_through_the_config_files_listen_key(tmp_path: Path) -> None:
    """`listen: 0.0.0.0:PORT` in the file: top connects to 127.0.0.1:PORT."""
    with ConstantPower(str(tmp_path / "powercap")), carbond_run(
            "--powercap-root", str(tmp_path / "powercap"), "--interval", "1s") as daemon:
        config = tmp_path / "top.yaml"
        config.write_text(f'listen: "0.0.0.0:{daemon.port}"\n')
        result = top("--once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"carbond top  127.0.0.1:{daemon.port}")
    assert "CONSUMER" in result.stdout


def test_no_daemon_is_one_line_and_exit_1() -> None:
    port = free_port()
    result = top("--once", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"no carbond answers at http://127.0.0.1:{port}/api/v1/consumers" in result.stderr
    assert "refused" in result.stderr


def test_a_daemon_that_never_answers_times_out_with_exit_1() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel completes the connection; nobody ever answers
        port = server.getsockname()[1]
        result = top("--once", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "timed out" in result.stderr


def test_live_view_needs_a_terminal() -> None:
    result = top("--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "--once" in result.stderr


# ---- in a real terminal -------------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket), killed with everything in it at the end."""

    def __init__(self) -> None:
        self.socket = f"carbond-test-{secrets.token_hex(4)}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10, check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("no tmux: run scripts/test-deps.sh")
    server = Tmux()
    try:
        yield server
    finally:
        server.kill()


def start_top(tmux: Tmux, tmp_path: Path, port: int) -> None:
    """top in a 120x40 terminal, with the terminal settings saved before and after it and its
    exit status written down; the shell then waits so the pane stays inspectable."""
    command = (f"stty -g > {tmp_path}/before; {shlex.quote(sys.executable)} -m carbond top "
               f"--listen 127.0.0.1:{port} --interval 1s; echo $? > {tmp_path}/rc.tmp; "
               f"mv {tmp_path}/rc.tmp {tmp_path}/rc; stty -g > {tmp_path}/after; "
               "echo top-exited; exec sleep 600")
    tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "/bin/sh", "-c", command)


def wait_for_frame(tmux: Tmux) -> str:
    def shown() -> str | None:
        screen = tmux.screen()
        lines = screen.splitlines()
        table = [i for i, line in enumerate(lines) if line.startswith("CONSUMER")]
        if table and len(lines) > table[0] + 1 and lines[table[0] + 1].startswith("busy "):
            return screen
        return None

    return str(poll(shown, "top drew no frame with the busy cgroup first"))


def finished(tmp_path: Path) -> str:
    return str(poll(lambda: (tmp_path / "rc").is_file() and (tmp_path / "rc").read_text(),
                    "top did not exit", timeout=20)).strip()


def assert_terminal_restored(tmux: Tmux, tmp_path: Path) -> None:
    poll(lambda: (tmp_path / "after").is_file() and (tmp_path / "after").read_text(),
         "no terminal settings after top")
    assert (tmp_path / "after").read_text() == (tmp_path / "before").read_text()
    assert tmux("display-message", "-p", "-t", "top", "#{alternate_on}").strip() == "0"
    poll(lambda: "top-exited" in tmux.screen(), "the shell did not go on after top")


def test_live_view_in_tmux_quits_on_q(tree: TestTree, tmp_path: Path, tmux: Tmux) -> None:
    with busy_daemon(tree, tmp_path) as daemon:
        start_top(tmux, tmp_path, daemon.port)
        screen = wait_for_frame(tmux)
        assert screen.startswith(f"carbond top  127.0.0.1:{daemon.port}")
        assert "grid 400 g/kWh DE (constant" in screen
        assert "evil\\x1b[2J\\x07name" in screen
        assert "q quit" in screen
        # After a second tick the rate comes from the emissions counters.
        poll(lambda: "from emissions counters over" in tmux.screen(),
             "no measured CO2e rate")
        tmux("send-keys", "-t", "top", "q")
        assert finished(tmp_path) == "0"
    assert_terminal_restored(tmux, tmp_path)


def test_live_view_restores_the_terminal_on_sigterm(tree: TestTree, tmp_path: Path,
                                                    tmux: Tmux) -> None:
    with busy_daemon(tree, tmp_path) as daemon:
        start_top(tmux, tmp_path, daemon.port)
        wait_for_frame(tmux)
        shell = int(tmux("display-message", "-p", "-t", "top", "#{pane_pid}"))
        with open(f"/proc/{shell}/task/{shell}/children") as handle:
            (child,) = [int(pid) for pid in handle.read().split()]
        os.kill(child, signal.SIGTERM)
        assert finished(tmp_path) == str(128 + signal.SIGTERM)
    assert_terminal_restored(tmux, tmp_path)


# ---- the frame, without a daemon ----------------------------------------------------------------


def test_wildcard_listen_addresses_mean_loopback() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1"
    assert connect_host("") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("[::]") == "::1"
    assert connect_host("10.1.2.3") == "10.1.2.3"
    assert api_url("::", 9877) == "http://[::1]:9877/api/v1/consumers"
    assert api_url("0.0.0.0", 9877) == "http://127.0.0.1:9877/api/v1/consumers"


def document(timestamp: float, entries: list[tuple[str, float, float]]) -> dict:
    """(name, total watts, emissions grams) per consumer."""
    return {
        "version": 1, "timestamp": timestamp, "time": None, "pue": 1.5,
        "intensity": {"grams_per_kwh": 200.0, "zone": "DE", "provider": "static",
                      "age_seconds": 3.0, "marginal": False},
        "host": {"watts": {"cpu": 10.0, "total": 10.0}, "joules": {"total": 3600.0},
                 "emissions_grams": 1.0, "devices": []},
        "consumers": [{"kind": "unit", "name": name, "watts": {"cpu": w, "total": w},
                       "joules": {"cpu": 100.0, "total": 100.0}, "emissions_grams": g,
                       "embodied_grams": 0.0} for name, w, g in entries],
    }


def test_rate_from_the_counters_between_two_ticks_else_estimated() -> None:
    first = document(100.0, [("a.service", 10.0, 1.0)])
    second = document(105.0, [("b.service", 50.0, 2.0), ("a.service", 20.0, 1.5)])
    found = {r.name: r for r in rows(second, first)}
    assert [r.name for r in rows(second, first)] == ["b.service", "a.service"]
    assert found["a.service"].measured
    assert found["a.service"].grams_per_hour == pytest.approx(0.5 / 5 * 3600)
    assert not found["b.service"].measured  # new since the last tick
    assert found["b.service"].grams_per_hour == pytest.approx(50 / 1000 * 200 * 1.5)
    # The same tick twice, or a counter that went back (a restart): estimated.
    assert not any(r.measured for r in rows(second, second))
    assert not rows(first, document(99.0, [("a.service", 1.0, 5.0)]))[0].measured


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.floats(0, 1e4)), max_size=10),
       st.text(max_size=12), st.integers(40, 200))
def test_any_names_print_as_text_at_any_width(entries: list[tuple[str, float]], zone: str,
                                              width: int) -> None:
    doc = document(10.0, [(name, watts, 1.0) for name, watts in entries])
    doc["intensity"]["zone"] = zone
    for cols in (width, None):
        lines = frame_lines(doc, None, "127.0.0.1:9877", 12.0, cols)
        for line in lines:
            assert all(ch.isprintable() for ch in line), repr(line)
            if cols is not None:
                assert len(line) <= cols
        assert len(lines) == 5 + max(1, len(entries))
    table = table_lines(rows(doc, None), 80)
    assert all(len(line) <= 80 for line in table)
