"""`carbond.track` for real: blocks around burners measured by a `carbond run` on a fake
powercap tree through its exec socket, compared with the daemon's own counters; a shared GPU
(the stand-in libnvidia-ml) split between two tracked processes; nested, repeated and forking
blocks; a daemon that goes away mid-block; no daemon at all.

Cgroups live in a private `TestTree`; every process and cgroup is removed afterwards.
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

from tests.cgroup_helpers import TestTree, available
from tests.fakes.nvml import FakeGpu, FakeProcess, Scenario, samples_for
from tests.helpers import carbond_run
from tests.powercap import ConstantPower

SESSION = f"s{os.getpid()}"
GIB = 1 << 30


@dataclass
class Place:
    tree: TestTree
    work: str  # the cgroup the tracked scripts start in
    shared: Path

    @property
    def socket(self) -> str:
        return str(self.shared / "exec.sock")

    @property
    def config(self) -> str:
        return str(self.shared / "carbond.yaml")

    def script(self, code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.Popen[str]:
        path = self.shared / f"script-{os.urandom(4).hex()}.py"
        path.write_text(code)
        move = f"echo $$ > {shlex.quote(os.path.join(self.work, 'cgroup.procs'))}"
        command = shlex.join([sys.executable, str(path), *args])
        return subprocess.Popen(["sh", "-c", f"{move} && exec {command}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Place]:
    why = available("v2")
    if why:
        pytest.skip(why)
    tree = TestTree("v2")
    shared = Path(tempfile.mkdtemp(prefix="carbond-track-"))
    try:
        made = Place(tree, tree.make("work.slice/work.scope"), shared)
        Path(made.config).write_text(
            f"ledger: {{flush: 1s}}\ninterval: 1s\nexec_socket: {made.socket}\n"
            f"cgroup_root: {tree.root}\nstate_dir: {shared / 'client-state'}\n")
        yield made
    finally:
        tree.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def daemon(place: Place, tmp_path: Path, env: dict[str, str] | None = None):
    return carbond_run("--config", place.config, "--powercap-root", str(tmp_path / "powercap"),
                       "--state-dir", str(tmp_path / "state"), env=env)


def wait_for_socket(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no socket at {path}"
        time.sleep(0.05)


def finished(process: subprocess.Popen[str], timeout: float = 120) -> list[dict]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def report_projects(state: Path) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "carbond", "report", "--by", "project", "--format", "json",
         "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["project"]: row for row in json.loads(result.stdout)["rows"]}


BURN = """
import dataclasses, json, subprocess, sys, time
import carbond

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def show(run):
    print(json.dumps(dataclasses.asdict(run.result)), flush=True)
"""

BLOCK = BURN + """
with carbond.track(sys.argv[1], config=sys.argv[2]) as run:
    burn(1.5)
    child = subprocess.Popen([sys.executable, "-c",
        "import time\\nend = time.process_time() + 1.0\\nwhile time.process_time() < end: pass"])
    child.wait()
show(run)
"""


def test_a_block_equals_the_daemons_counter_for_its_project(place: Place,
                                                             tmp_path: Path) -> None:
    """The block (this process and a child it starts) is the project's: what the result says
    is what the daemon recorded, within 2%; its CPU seconds hold the child's too."""
    project = f"block-{SESSION}"
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        (result,) = finished(place.script(BLOCK, project, place.config))
        carbond.wait_ticks(2)
    assert result["measured_by"] == "daemon", result["notes"]
    assert result["project"] == project  # root's projects are not keyed by user
    assert result["cpu_seconds"] >= 2.4
    joules = result["cpu_joules"] + result["dram_joules"] + result["gpu_joules"]
    assert joules > 0 and result["grams"] > 0
    assert result["provider"] and result["grams_per_kwh"] > 0
    recorded = report_projects(tmp_path / "state")[project]
    print("track", joules, "J, daemon", recorded["joules"], "J")
    assert recorded["joules"] == pytest.approx(joules, rel=0.02)
    assert recorded["grams"] == pytest.approx(result["grams"], rel=0.02)
    leftovers = [d for d, _, _ in os.walk(place.tree.root) if "carbond.exec" in d]
    assert leftovers == []  # the run cgroup, its project and carbond.exec directories gone


WAIT_IN_BLOCK = BURN + """
import os
from pathlib import Path
with carbond.track(sys.argv[1], config=sys.argv[2]) as run:
    Path(sys.argv[3]).write_text(str(os.getpid()))
    deadline = time.monotonic() + 90
    while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
        time.sleep(0.02)
show(run)
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc needed to build the fake NVML")
def test_two_tracked_processes_sharing_a_gpu_get_their_sm_shares(
        place: Place, tmp_path: Path, fake_lib: Path) -> None:
    """Two processes, each in a block of its own project, on one GPU at 75/25 SM: through
    the real pynvml over the stand-in libnvidia-ml.so.1 the daemon gives their blocks 75/25
    of the GPU's energy (memory 1:3 points the other way)."""
    scenario_file = tmp_path / "scenario.txt"
    gpu = FakeGpu(0, "GPU-44444444-dddd-4000-8000-000000000000", "NVIDIA Fake H100",
                  energy_millijoules=1_000_000)
    scenario = Scenario(gpus=[gpu])
    scenario.write(scenario_file)
    env = {"LD_LIBRARY_PATH": str(fake_lib), "FAKE_NVML_SCENARIO": str(scenario_file)}
    go = tmp_path / "go"
    projects = [f"gpu-a-{SESSION}", f"gpu-b-{SESSION}"]
    pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]
    scripts: list[subprocess.Popen[str]] = []
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path, env) as carbond:
        wait_for_socket(place.socket)
        try:
            for project, pid_file in zip(projects, pid_files, strict=True):
                scripts.append(place.script(WAIT_IN_BLOCK, project, place.config,
                                            str(pid_file), str(go)))
            deadline = time.monotonic() + 60
            while not all(p.exists() and p.read_text() for p in pid_files):
                assert time.monotonic() < deadline
                assert all(s.poll() is None for s in scripts)
                time.sleep(0.05)
            a, b = (int(p.read_text()) for p in pid_files)
            scenario.processes = [FakeProcess(0, a, 1 * GIB), FakeProcess(0, b, 3 * GIB)]
            stamp = 1_700_000_000_000_000
            for _ in range(3):
                carbond.wait_ticks(1)
                gpu.energy_millijoules += 400_000  # 400 J
                scenario.samples += [*samples_for(0, a, 75, stamp, 6),
                                     *samples_for(0, b, 25, stamp, 6)]
                stamp += 1_000_000
                scenario.write(scenario_file)
            carbond.wait_ticks(2)  # the last change read while both blocks still run
            go.write_text("")
            results = [finished(s)[0] for s in scripts]
        finally:
            for script in scripts:
                if script.poll() is None:
                    script.kill()
                    script.wait()
    assert all(r["measured_by"] == "daemon" for r in results), [r["notes"] for r in results]
    gpu_a, gpu_b = (r["gpu_joules"] for r in results)
    print("gpu", gpu_a, gpu_b, gpu_a / (gpu_a + gpu_b))
    assert gpu_a + gpu_b == pytest.approx(1200.0, rel=0.01)
    assert gpu_a / (gpu_a + gpu_b) == pytest.approx(0.75, abs=0.02)


NESTED = BURN + """
with carbond.track(sys.argv[1] + "-outer", config=sys.argv[2]) as outer:
    burn(1.0)
    with carbond.track(sys.argv[1] + "-inner", config=sys.argv[2]) as inner:
        burn(1.0)
    burn(0.5)
show(inner)
show(outer)
again = carbond.track(sys.argv[1] + "-again", config=sys.argv[2])

@again
def work():
    burn(0.5)

for _ in range(2):
    work()
    print(json.dumps(dataclasses.asdict(again.result)), flush=True)
"""


def test_nested_and_repeated_blocks_are_each_their_projects(place: Place,
                                                            tmp_path: Path) -> None:
    """An inner block is its own project's (the outer one's result leaves it out); a decorated
    function called twice is two blocks; each agrees with the daemon's counters within 2%."""
    project = f"nest-{SESSION}"
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        inner, outer, first, second = finished(place.script(NESTED, project, place.config))
        carbond.wait_ticks(2)
    for result in (inner, outer, first, second):
        assert result["measured_by"] == "daemon", result["notes"]
    assert inner["cpu_seconds"] == pytest.approx(1.0, abs=0.3)
    assert outer["cpu_seconds"] == pytest.approx(1.5, abs=0.3)  # without the inner block's
    recorded = report_projects(tmp_path / "state")

    def joules(result: dict) -> float:
        return result["cpu_joules"] + result["dram_joules"] + result["gpu_joules"]

    assert recorded[f"{project}-inner"]["joules"] == pytest.approx(joules(inner), rel=0.02)
    assert recorded[f"{project}-outer"]["joules"] == pytest.approx(joules(outer), rel=0.02)
    assert recorded[f"{project}-again"]["joules"] == pytest.approx(
        joules(first) + joules(second), rel=0.02)
    assert joules(first) > 0 and joules(second) > 0


FORKS = BURN + """
import os
with carbond.track(sys.argv[1], config=sys.argv[2]) as run:
    child = os.fork()
    if child == 0:
        burn(1.0)  # then leaves the block itself, while the parent waits inside it
    else:
        os.waitpid(child, 0)
if child == 0:  # the child's exit from the block did nothing
    with open(sys.argv[3], "w") as handle:
        handle.write(repr(run.result))
    os._exit(0)
show(run)
"""


def test_a_block_that_forks_counts_the_child_once(place: Place, tmp_path: Path) -> None:
    project = f"fork-{SESSION}"
    marker = tmp_path / "child-result"
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        (result,) = finished(place.script(FORKS, project, place.config, str(marker)))
        carbond.wait_ticks(2)
    assert marker.read_text() == "None"  # the forked child reported nothing of its own
    assert result["measured_by"] == "daemon", result["notes"]
    assert result["cpu_seconds"] >= 0.9  # the child's CPU time is the block's
    joules = result["cpu_joules"] + result["dram_joules"] + result["gpu_joules"]
    assert report_projects(tmp_path / "state")[project]["joules"] == pytest.approx(joules,
                                                                                   rel=0.02)


def test_a_daemon_that_goes_away_mid_block_leaves_a_result_that_says_so(
        place: Place, tmp_path: Path) -> None:
    project = f"gone-{SESSION}"
    inside, go = tmp_path / "inside", tmp_path / "go"
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        script = place.script(WAIT_IN_BLOCK, project, place.config, str(inside), str(go))
        try:
            deadline = time.monotonic() + 60
            while not inside.exists():
                assert time.monotonic() < deadline and script.poll() is None
                time.sleep(0.05)
            carbond.process.kill()
            carbond.process.wait()
            go.write_text("")
            (result,) = finished(script)
        finally:
            if script.poll() is None:
                script.kill()
                script.wait()
    assert result["measured_by"] == "alone"
    assert any("went away" in note for note in result["notes"]), result["notes"]
    assert result["duration_seconds"] > 0 and result["cpu_seconds"] is not None


LISTEN = BURN + """
with carbond.track(sys.argv[1], config=sys.argv[2], listen=sys.argv[3]) as run:
    burn(1.0)
show(run)
"""


def test_counters_can_come_from_the_http_api(place: Place, tmp_path: Path) -> None:
    """`listen=`: the moves over the socket, the counters from /api/v1/consumers."""
    project = f"http-{SESSION}"
    with ConstantPower(str(tmp_path / "powercap")), daemon(place, tmp_path) as carbond:
        wait_for_socket(place.socket)
        (result,) = finished(place.script(LISTEN, project, place.config,
                                          f"127.0.0.1:{carbond.port}"))
        carbond.wait_ticks(2)
    assert result["measured_by"] == "daemon", result["notes"]
    joules = result["cpu_joules"] + result["dram_joules"] + result["gpu_joules"]
    assert report_projects(tmp_path / "state")[project]["joules"] == pytest.approx(joules,
                                                                                   rel=0.02)


def test_without_a_daemon_the_block_is_measured_alone(place: Place) -> None:
    """No socket answers: as root the block gets a cgroup of its own and the daemon's
    pipeline run in-process (the power model here: no RAPL) measures it."""
    (result,) = finished(place.script(BLOCK, f"alone-{SESSION}", place.config))
    assert result["measured_by"] == "alone"
    assert any("no daemon" in note for note in result["notes"]), result["notes"]
    assert result["cpu_seconds"] >= 2.4
    assert result["cpu_joules"] > 0 and result["grams"] > 0
